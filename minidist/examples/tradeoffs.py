"""Chapters 09 and 10 in the example script: trade compute, bandwidth or accuracy for memory and bytes.

    --checkpointing full|selective   recompute every block's activations (or its core attention's) in backward
    --offload cpu|disk               ZeRO-Offload: the model trains in bf16 on the device, its fp32 master weights,
                                     Adam moments and update live on the tier (ddp/none: MixedPrecisionOptimizer,
                                     zero1/zero2: ZeroOptimizer); saved activations go to the tier too
    --compress fp16|bf16|topk|powersgd   a communication hook on DataParallel (--strategy ddp)

train.py calls these at five points: the model before wrapping, the wrapped module, the optimizer, each forward,
the end.
"""
import contextlib

import torch

STRATEGIES_FOR = {"--compress": ("ddp",), "--offload": ("ddp", "none", "zero1", "zero2")}


def add_arguments(p) -> None:
    from minidist.args import positive_float, positive_int
    p.add_argument("--checkpointing", choices=["full", "selective"], help="activation checkpointing policy")
    p.add_argument("--offload", choices=["cpu", "disk"], help="optimizer states and activations to this tier")
    p.add_argument("--offload-dir", default=None, help="--offload disk: where the files go (default: a temp dir)")
    p.add_argument("--compress", choices=["fp16", "bf16", "topk", "powersgd"], help="ddp: gradient compression")
    p.add_argument("--topk-ratio", type=positive_float, default=0.01, help="--compress topk: share of entries sent")
    p.add_argument("--powersgd-rank", type=positive_int, default=2, help="--compress powersgd: approximation rank")


def check(args) -> str | None:
    """What is wrong with this combination of flags (None if nothing)."""
    for flag, allowed in STRATEGIES_FOR.items():
        if getattr(args, flag[2:]) and args.strategy not in allowed:
            return f"{flag} works with --strategy {' or '.join(allowed)}, not {args.strategy}"
    if args.checkpointing and args.strategy in ("pp", "3d", "ep"):
        return f"--checkpointing is not wired into --strategy {args.strategy} (its own runtime)"
    if args.checkpointing == "selective" and args.model != "tiny-gpt":
        return "--checkpointing selective needs the tiny GPT's attend(q, k, v); use full for tiny-llama"
    if args.topk_ratio > 1:
        return f"--topk-ratio must be at most 1, got {args.topk_ratio}"
    return None


def prepare_model(model, args):
    """Before wrapping: checkpointing; with --offload, 16-bit weights (the fast tier keeps 2 + 2 bytes/parameter)."""
    if args.checkpointing:
        from minidist.memory.recompute import checkpoint_blocks
        checkpoint_blocks(model, args.checkpointing)
    return model.bfloat16() if args.offload else model


def register_hooks(module, args) -> None:
    """After wrapping: the compression hook."""
    if not args.compress:
        return
    from minidist.compression import (PowerSGDState, TopKState, bf16_compress_hook, fp16_compress_hook,
                                      powersgd_hook, topk_hook)
    state, hook = {"fp16": (None, fp16_compress_hook), "bf16": (None, bf16_compress_hook),
                   "topk": (TopKState(None, args.topk_ratio), topk_hook),
                   "powersgd": (PowerSGDState(None, args.powersgd_rank, start_powerSGD_iter=10), powersgd_hook)
                   }[args.compress]
    module.register_comm_hook(state, hook)


def optimizer(module, args):
    """With --offload: AdamW on fp32 masters that live, with the moments, on the tier (else None: the default)."""
    if not args.offload:
        return None
    from minidist.mixed_precision import LossScaler, MixedPrecisionOptimizer
    from minidist.memory.offload import make_tier, offload_optimizer
    from minidist.zero import ZeroOptimizer
    model = getattr(module, "module", module)
    if args.strategy in ("zero1", "zero2"):
        opt = ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage=int(args.strategy[-1]), lr=args.lr,
                            bucket_cap_mb=args.bucket_cap_mb)
    else:  # bf16 has fp32's range: a loss scale of 1 (no scaling) is enough
        opt = MixedPrecisionOptimizer(model, torch.optim.AdamW, LossScaler(init_scale=1.0), lr=args.lr)
    args._tier = make_tier(args.offload, args.offload_dir)
    offload_optimizer(opt, args._tier)
    return opt


def finish(args) -> None:
    """After training: the disk tier's files go (ranks leave with os._exit, which runs no finalizer)."""
    if getattr(args, "_tier", None) is not None and hasattr(args._tier, "close"):
        args._tier.close()


def forward_context(module, args):
    """Around each forward: the saved activations go to the tier (--offload), else nothing."""
    if not args.offload:
        return contextlib.nullcontext()
    from minidist.memory.offload import offload_activations
    return offload_activations(args._tier, keep=getattr(module, "module", module))
