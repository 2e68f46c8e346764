"""Train the tiny GPT (or a small Hugging Face Llama, --model tiny-llama) on the shipped corpus with a data-, tensor-
or pipeline-parallel strategy.

    torchrun --nproc_per_node=4 -m minidist.examples.train --strategy ddp          # one node, 4 ranks
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
             -m minidist.examples.train --strategy ddp                              # two nodes
    python -m minidist.examples.train --strategy ddp --world-size 2                 # no torchrun: minidist.launch
    torchrun --nproc_per_node=2 -m minidist.examples.train --strategy tp --model tiny-llama --sequence-parallel

    torchrun --nproc_per_node=4 -m minidist.examples.train --strategy pp --schedule interleaved --microbatches 8
    torchrun --nproc_per_node=8 -m minidist.examples.train --strategy 3d --dp 2 --pp 2 --tp 2   # or --cp 2
    torchrun --nproc_per_node=2 -m minidist.examples.train --strategy ddp --checkpointing selective --compress powersgd
    torchrun --nproc_per_node=2 -m minidist.examples.train --strategy zero2 --offload disk --checkpointing full

gloo on CPUs, NCCL when every rank has a GPU. Rank 0 logs the loss averaged over ranks (and shows a progress bar
when stderr is a terminal). Flags are checked before any rank starts (examples/preflight.py): one line, exit code 2.
Strategies: ddp (minidist.DataParallel), torch-ddp (PyTorch's DistributedDataParallel), none (each rank alone: what
goes wrong without gradient averaging), tp (minidist.tensor_parallel: every rank holds 1/N of the model and sees the
whole batch; --sequence-parallel adds sequence parallelism), pp (pipeline parallel, minidist.pipeline: each rank one
stage of the model, the global batch cut into --microbatches, run by --schedule gpipe|1f1b|interleaved|zb), zero1 /
zero2 (minidist.zero.ZeroOptimizer, stage 1 or 2), zero3 (minidist's fully_shard on the whole model), fsdp
(minidist's fully_shard on each block, then the root), torch-fsdp (PyTorch's FSDP2 fully_shard, per block), 3d
(examples/parallel3d.py: a --dp x --pp x --cp x --tp mesh), ep (examples/moe.py: a tiny Mixtral, experts
sharded over --ep ranks). Later chapters add theirs to STRATEGIES.
--checkpointing, --offload and --compress (chapters 09-10, examples/tradeoffs.py) combine with the strategies that
support them.

Checkpoints, restarts and injected failures (--checkpoint-dir, --checkpoint-every, --fail-at-step, --hang-at-step,
--timeout): see minidist/examples/fault_tolerance.py.
    torchrun --standalone --nproc_per_node=2 --max-restarts=3 -m minidist.examples.train --strategy fsdp \\
             --steps 40 --checkpoint-dir ckpt --checkpoint-every 10 --fail-at-step 25
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

from minidist import comm, launch, run_under_torchrun
from minidist.args import nonnegative_float, positive_float, positive_int
from minidist.data import random_batches, token_ids, train_val_split, vocab_size_of
from minidist.data_parallel import DataParallel
from minidist.examples import fault_tolerance as ft
from minidist.examples import preflight, tradeoffs
from minidist.fsdp import fully_shard
from minidist.launch import device
from minidist.models import GPT, GPTConfig, build_llama, lm_loss
from minidist.monitor import Monitor
from minidist.testing import replica_divergence
from minidist.zero import ZeroOptimizer

from . import moe as moe_example
from . import parallel3d
from .progress import log_step, progress_bar


def _torch_ddp(model, args):
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, bucket_cap_mb=args.bucket_cap_mb)


def _tensor_parallel(model, args):
    from minidist.tensor_parallel import GPT_PLAN, LLAMA_PLAN, parallelize
    return parallelize(model, None, LLAMA_PLAN if args.model == "tiny-llama" else GPT_PLAN, args.sequence_parallel)


def _per_block(shard):
    def wrap(model, args):
        for block in (model.blocks if hasattr(model, "blocks") else model.model.layers):  # tiny GPT or HF Llama
            shard(block)
        return shard(model)
    return wrap


def _torch_fully_shard(module):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    return fully_shard(module, mesh=init_device_mesh(device().type, (dist.get_world_size(),)))


STRATEGIES = {
    "ddp": lambda model, args: DataParallel(model, bucket_cap_mb=args.bucket_cap_mb),
    "torch-ddp": _torch_ddp,
    "none": lambda model, args: model,
    "tp": _tensor_parallel,
    "zero1": lambda model, args: model,  # ZeroOptimizer (OPTIMIZERS) owns the gradient reduction
    "zero2": lambda model, args: model,
    "zero3": lambda model, args: fully_shard(model),
    "fsdp": _per_block(fully_shard),
    "torch-fsdp": _per_block(_torch_fully_shard),
}
OPTIMIZERS = {  # the optimizer each strategy trains with (default: AdamW on the module's parameters)
    "zero1": lambda model, args: ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage=1, lr=args.lr,
                                               bucket_cap_mb=args.bucket_cap_mb),
    "zero2": lambda model, args: ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage=2, lr=args.lr,
                                               bucket_cap_mb=args.bucket_cap_mb, module=model),
}
SHARDED = ("zero3", "fsdp", "torch-fsdp")  # each rank holds a shard of the weights: no replicas to compare
MODELS = {  # n_layer: the pipeline's (one block per stage at least); the others keep the model's own
    "tiny-gpt": lambda args, **n: GPT(GPTConfig(block_size=args.block_size, dropout=args.dropout, **n)),
    "tiny-llama": lambda args, n_layer=None: build_llama(max_position_embeddings=max(128, args.block_size),
                                                         **({"num_hidden_layers": n_layer} if n_layer else {}))}


def _loss_fn(args):
    """The loss on this rank's logits: the vocabulary-parallel cross-entropy under tensor parallelism."""
    if args.strategy != "tp":
        return lm_loss
    from minidist.tensor_parallel import vocab_parallel_cross_entropy
    return vocab_parallel_cross_entropy


def _replicas(model, args):
    """What must be identical on every rank: the whole model, or under tensor parallelism its replicated part."""
    if args.strategy != "tp":
        return model
    from minidist.tensor_parallel.plans import sharded_parameters
    sharded = sharded_parameters(model)
    return torch.nn.ParameterList(p for name, p in model.named_parameters() if name not in sharded)


def train(args) -> dict:
    if args.strategy == "pp":
        return train_pp(args)
    if args.strategy == "3d":
        return parallel3d.train_3d(args)
    if args.strategy == "ep":
        return moe_example.train_ep(args)
    rank, n, dev = dist.get_rank(), dist.get_world_size(), device()
    split_batch = args.strategy != "tp"  # data parallel: a slice of the batch per rank; tensor parallel: all of it
    if split_batch and args.batch_size % n:
        raise ValueError(f"global batch size {args.batch_size} is not divisible by the world size {n}")
    torch.manual_seed(args.seed)
    model = STRATEGIES[args.strategy](tradeoffs.prepare_model(MODELS[args.model](args).to(dev), args), args)
    tradeoffs.register_hooks(model, args)
    loss_fn, logits = _loss_fn(args), lambda out: getattr(out, "logits", out).float()  # HF: an output object
    opt = tradeoffs.optimizer(model, args) or \
        OPTIMIZERS.get(args.strategy, lambda m, a: torch.optim.AdamW(m.parameters(), lr=a.lr))(model, args)
    train_ids, val_ids = train_val_split(token_ids())
    batches = random_batches(train_ids, args.batch_size, args.block_size, args.steps, seed=args.seed,
                             vocab_size=vocab_size_of(model))  # every id checked once, on the host
    state = ft.resume(args, model, opt)  # step 0, or the newest checkpoint's
    progress, losses = progress_bar(args, f"{args.strategy} on {n} ranks", state["step"]), state["losses"]
    monitor = Monitor(enabled=args.monitor is not None)  # --monitor PATH: per-rank step telemetry (minidist.monitor)
    for step, (x, y) in enumerate(batches[state["step"]:], start=state["step"]):
        ft.inject(args, step)
        if split_batch:
            x, y = x.chunk(n)[rank], y.chunk(n)[rank]                  # this rank's slice of the global batch
        monitor.begin(tokens=x.numel())
        x, y = x.to(dev), y.to(dev)
        with tradeoffs.forward_context(model, args):
            loss = loss_fn(logits(model(x)), y)
        (opt.scaler.scale_loss(loss) if getattr(opt, "scaler", None) else loss).backward()  # step() unscales
        opt.step()
        opt.zero_grad()
        monitor.end()  # before the log's all-reduce: the monitor times the training step, not the logging
        mean = comm.all_reduce_sum(loss.detach()).item() / n  # the loss averaged over ranks (tp: the same)
        ft.after_step(args, state, step + 1, model, opt, mean)  # the loss logged; maybe a checkpoint
        log_step(progress, args, step, losses[-1])
    monitor.report(args.monitor)
    x, y = random_batches(val_ids, 32, args.block_size, 1, seed=1234)[0]
    with torch.no_grad():
        val = loss_fn(logits(model(x.to(dev))), y.to(dev)).item()
    tradeoffs.finish(args)
    return {"first_loss": losses[0], "last_loss": losses[-1], "val_loss": val, "losses": losses,
            "resumed_at": state["resumed_at"], "digest": ft.digest(ft.full_weights(model, args.strategy)),
            "replica_divergence": None if args.strategy in SHARDED else replica_divergence(_replicas(model, args))}


def train_pp(args) -> dict:
    """Pipeline parallel: rank r holds stage r (chunks r, r + p, ... with interleaving); every rank reads the whole
    global batch (the first stage uses the tokens, the last the targets), the loss lives on the last stage's rank."""
    from minidist.pipeline.runtime import PipelineRuntime
    from minidist.pipeline.schedule import build
    from minidist.pipeline.stages import hidden_size, input_embedding, rank_stages, split_gpt
    rank, p, dev = dist.get_rank(), dist.get_world_size(), device()
    v = args.chunks if args.schedule == "interleaved" else 1
    if args.batch_size % args.microbatches:
        raise ValueError(f"global batch size {args.batch_size} is not divisible by {args.microbatches} micro-batches")
    torch.manual_seed(args.seed)
    model = MODELS[args.model](args, n_layer=args.n_layer or max(2, p * v)).to(dev)
    pipe = PipelineRuntime(rank_stages(model, p, rank, v), build(args.schedule, p, args.microbatches, v),
                           hidden_size(model), track_memory=False)
    opt = torch.optim.AdamW(pipe.parameters(), lr=args.lr)
    train_ids, val_ids = train_val_split(token_ids())
    stages = torch.nn.ModuleList(pipe.stages)  # what this rank checkpoints: its stages, named as in the whole model
    state = ft.resume(args, stages, opt)
    progress, losses = progress_bar(args, f"pp {args.schedule} on {p} ranks", state["step"]), state["losses"]
    monitor = Monitor(enabled=args.monitor is not None)
    batches = random_batches(train_ids, args.batch_size, args.block_size, args.steps, seed=args.seed,
                             vocab_size=vocab_size_of(model))  # every id checked once, on the host
    for step, (x, y) in enumerate(batches[state["step"]:], start=state["step"]):
        ft.inject(args, step)
        monitor.begin(tokens=x.numel())
        loss = pipe.step(x.to(dev), y.to(dev))
        opt.step()
        opt.zero_grad()
        monitor.end()
        loss = loss.detach() if loss is not None else torch.zeros((), device=dev)
        ft.after_step(args, state, step + 1, stages, opt, comm.broadcast(loss, p - 1).item())  # lives on the last
        log_step(progress, args, step, losses[-1])
    monitor.report(args.monitor)
    tied = input_embedding(model).detach().clone()  # the first and the last rank's copies of the tied embedding
    dist.broadcast(tied, src=p - 1)
    divergence = (input_embedding(model).detach() - tied).abs().max().item() if rank == 0 else 0.0
    for s, stage in enumerate(split_gpt(model, p * v)):  # to evaluate: every stage's trained weights, everywhere
        for q in stage.parameters():
            dist.broadcast(q.data, src=s % p)
    x, y = random_batches(val_ids, 32, args.block_size, 1, seed=1234)[0]
    with torch.no_grad():
        val = lm_loss(getattr(out := model(x.to(dev)), "logits", out), y.to(dev)).item()  # HF: an output object
    return {"first_loss": losses[0], "last_loss": losses[-1], "val_loss": val, "replica_divergence": divergence,
            "losses": losses, "resumed_at": state["resumed_at"], "digest": ft.digest(model.state_dict())}


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m minidist.examples.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", choices=sorted([*STRATEGIES, "pp", "3d", "ep"]), default="ddp")
    p.add_argument("--model", choices=sorted(MODELS), default="tiny-gpt")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="tp: norms and residual adds run on sequence shards too (models here use dropout 0)")
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--batch-size", type=positive_int, default=32, help="global batch, split across ranks")
    p.add_argument("--block-size", type=positive_int, default=64)
    p.add_argument("--lr", type=positive_float, default=3e-3)
    p.add_argument("--bucket-cap-mb", type=positive_float, default=25.0)
    p.add_argument("--schedule", choices=["gpipe", "1f1b", "interleaved", "zb"], default="1f1b", help="pp only")
    p.add_argument("--microbatches", type=positive_int, default=4, help="pp: micro-batches per step")
    p.add_argument("--chunks", type=positive_int, default=2,
                   help="pp: model chunks per rank with --schedule interleaved")
    p.add_argument("--n-layer", type=positive_int, default=None,
                   help="pp: transformer blocks (default: one per stage, >= 2)")
    parallel3d.add_arguments(p)
    moe_example.add_arguments(p)
    p.add_argument("--log-every", type=positive_int, default=50)
    p.add_argument("--monitor", metavar="PATH", help="per-rank step telemetry: JSON lines to PATH, a Chrome trace "
                                                   "to PATH with suffix .trace.json, stragglers named")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dropout", type=nonnegative_float, default=0.0, help="tiny-gpt: dropout (draws from the RNG)")
    ft.add_arguments(p)
    p.add_argument("--world-size", type=positive_int, default=2, help="ranks to start when not under torchrun")
    p.add_argument("--quiet", action="store_true")
    tradeoffs.add_arguments(p)
    args = p.parse_args(argv)
    args.given = preflight.given_options(p, argv, args)  # flags set on the command line, not by default
    if problem := preflight.check_flags(args, args.given):
        preflight.refuse(problem)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if problem := preflight.check_world(args, int(os.environ.get("WORLD_SIZE", args.world_size)), MODELS):
        preflight.refuse(problem)  # one line, exit code 2, before any rank starts
    import torch._dynamo  # noqa: F401  (else the first optimizer step imports it, seconds late for the others)
    token_ids()  # the corpus tokenized before ranks wait on each other: a late rank would eat into --timeout
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun: this process is one rank
        result = run_under_torchrun(train, args)  # a failure: one line on stderr, then SystemExit(1)
        rank = int(os.environ["RANK"])
    else:
        if args.model == "tiny-llama":  # import transformers once here: the forked ranks inherit it
            import transformers.models.llama.modeling_llama  # noqa: F401
        if args.strategy == "ep":  # a first Mixtral built here: transformers' lazy imports happen once, not per rank
            from minidist.models import build_mixtral
            build_mixtral()
        result, rank = launch(train, args.world_size, args)[0], 0
    if rank == 0:
        replicas = ("weights sharded over the ranks" if result["replica_divergence"] is None
                    else f"replicas differ by {result['replica_divergence']:.3g}")
        print(f"loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}, validation {result['val_loss']:.3f}, "
              f"{replicas}")
        resumed = f", resumed at step(s) {result['resumed_at']}" if result.get("resumed_at") else ""
        if "digest" in result:
            print(f"weights sha256 {result['digest']}{resumed}")
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as e:  # refused, or a torchrun worker that failed (its one line already said why)
        if "RANK" not in os.environ or not isinstance(e.code, int):
            raise
        code = e.code
    if "RANK" in os.environ:  # a torchrun worker, done: skip the interpreter teardown, where gloo may abort or stall
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
