"""Tour checks for chapter 05 (ZeRO stages 1, 2, 3): every stage trains the weights DDP trains, holds the memory
the ZeRO formula gives and sends the bytes the ring formulas give; and each agrees with its production reference.

The rank functions here are the ones the tests and the notebooks run. Strategies, by name:
    ddp        DataParallel + the optimizer (stage 0)
    zero1/2    ZeroOptimizer(stage=1/2) on the plain model
    zero3      fully_shard(model): the whole model one FSDP unit
    fsdp       fully_shard(block) for each block, then fully_shard(model) (chapter 06); fsdp-keep: the same with
               reshard_after_forward=False
"""
import copy
import logging
import os
import sys
import time
import warnings

import torch
import torch._dynamo  # noqa: F401  (the first optimizer imports it, seconds per rank: once here, ranks inherit it)
import torch.distributed as dist

from .. import comm
from ..data import random_batches
from ..data_parallel import DataParallel
from ..fsdp import full_state_dict, fully_shard
from ..launch import launch
from ..memory import measure_state_bytes, zero_state_bytes
from ..mixed_precision import LossScaler, MixedPrecisionOptimizer
from ..models import GPT, GPTConfig, count_params, lm_loss
from ..launch import default_backend, device
from ..testing import on_device, replica_divergence, to_device
from ..zero import ZeroOptimizer
from .data_parallel import ADAM_LR, CFG, counted_mean
from .rows import covers, make_row

BATCHES5 = random_batches(torch.randint(512, (5000,), generator=torch.Generator().manual_seed(5)), 12, 16, steps=5)
ADAM_TOL5 = 0.01 * ADAM_LR * len(BATCHES5)  # README: 1% of the most Adam can move a weight in these steps
# Every parameter tensor of this GPT has a multiple of 48 rows (dim 0) and elements, so N = 2, 3, 4 divide every
# bucket, unit and FSDP's dim-0 shard: no padding, and measured memory and bytes equal the formulas exactly (a
# vocabulary of 576 = 12 * 48 holds the 512 token ids). (CFG's sizes divide nothing: the tests check the padded
# formulas exactly.)
ZCFG = GPTConfig(n_layer=2, n_embd=48, block_size=48, vocab_size=576)
STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp")
STAGE = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3, "fsdp-keep": 3}
REPLICATED = ("ddp", "zero1", "zero2")  # strategies whose ranks each hold the whole model


def frozen_gpt(cfg=CFG) -> GPT:
    """The test model: tied embeddings, and one frozen parameter (the position embedding)."""
    model = GPT(cfg)
    model.wpe.weight.requires_grad_(False)
    return model


def setup(strategy: str, model, mixed: bool = False, lr: float = ADAM_LR, bucket_cap_mb: float = 25):
    """(module to train, optimizer) for `strategy` on `model`, with AdamW. mixed: the 16Ψ setting (16-bit weights
    and gradients, fp32 master weights and moments): a bf16 model for ddp/zero1/zero2, param_dtype=bf16 for the rest.
    """
    if mixed and strategy in REPLICATED:
        model = model.bfloat16()
    if strategy == "ddp":
        dp = DataParallel(model, bucket_cap_mb=bucket_cap_mb)  # broadcasts rank 0's weights: before the masters
        return dp, MixedPrecisionOptimizer(model, torch.optim.AdamW, LossScaler(init_scale=1.0), lr=lr) if mixed \
            else torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if strategy in ("zero1", "zero2"):
        return model, ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage=int(strategy[-1]), lr=lr,
                                    bucket_cap_mb=bucket_cap_mb)
    options = dict(param_dtype=torch.bfloat16 if mixed else None, reshard_after_forward=strategy != "fsdp-keep")
    if strategy.startswith("fsdp"):
        for block in model.blocks:
            fully_shard(block, **options)
    fully_shard(model, **options)
    return model, torch.optim.AdamW(model.parameters(), lr=lr)


def full_weights(strategy: str, module) -> dict[str, torch.Tensor]:
    if strategy in REPLICATED:
        return {k: v.detach().float() for k, v in getattr(module, "module", module).state_dict().items()}
    return full_state_dict(module)


def train_step(module, opt, x, y) -> float:
    loss = lm_loss(module(x).float(), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


@on_device
def cross_stage(strategies=STRATEGIES, batches=BATCHES5, bucket_cap_mb: float = 0.02) -> dict:
    """Each strategy trains the frozen-wpe tiny GPT from the same start, on this rank's slices, with AdamW; one
    process trains on the whole batches. Returns {strategy: (max |w - w_one_process|, replica divergence or None)}."""
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    start = frozen_gpt()
    reference = copy.deepcopy(start)
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=ADAM_LR)
    batches = [to_device(b) for b in batches]
    for x, y in batches:
        train_step(reference, ref_opt, x, y)
    expected, out = reference.state_dict(), {}
    for s in strategies:
        module, opt = setup(s, copy.deepcopy(start), bucket_cap_mb=bucket_cap_mb)
        for x, y in batches:
            train_step(module, opt, x.chunk(n)[rank], y.chunk(n)[rank])
        weights = full_weights(s, module)
        out[s] = (max((weights[k] - v).abs().max().item() for k, v in expected.items()),
                  replica_divergence(module) if s in REPLICATED else None)
    return out


@on_device
def states_and_bytes(strategies=("ddp", "zero1", "zero2", "zero3"), cfg=ZCFG) -> dict:
    """Mixed precision: for each strategy, the model states this rank holds after a backward (moments exist: one step
    was taken before), walked tensor by tensor, and the bytes it sent in that step, counted on minidist's ring."""
    rank, n = dist.get_rank(), dist.get_world_size()
    x, y = (t.chunk(n)[rank] for t in to_device(BATCHES5[0]))
    out = {}
    for s in strategies:
        torch.manual_seed(0)
        module, opt = setup(s, GPT(cfg), mixed=True)
        with comm.ring_backend():
            train_step(module, opt, x, y)
            with comm.ByteLedger() as ledger:
                lm_loss(module(x).float(), y).backward()
                states = measure_state_bytes(getattr(module, "module", module), opt)
                opt.step()
                opt.zero_grad()
        out[s] = {"states": states, "bytes": {op: ledger.total_bytes(op) for op in ledger.by_op()},
                  "total": ledger.total_bytes(), "counted": ledger.counted, "psi": count_params(GPT(cfg)),
                  "tensors": len(list(GPT(cfg).parameters()))}
    return out


def bytes_formula(strategy: str, psi: int, tensors: int, n: int, element: int = 2):
    """Bytes one rank sends per step, ring formulas (a Fraction): DDP all-reduces the gradients; ZeRO-1/2
    reduce-scatter them and all-gather the parameters (the same bytes); ZeRO-3/FSDP all-gather twice and
    reduce-scatter once (once fewer with reshard_after_forward=False). Every sharded strategy adds one all-reduce of
    an int32 flag per tensor (which ones had a gradient on some rank)."""
    grads = comm.ring_bytes("all_reduce", element * psi, n)
    if strategy == "ddp":
        return grads
    flags = comm.ring_bytes("all_reduce", 4 * tensors, n)
    if strategy in ("zero1", "zero2"):
        return grads + flags
    return comm.ring_bytes("all_gather", element * psi, n) * (2 if strategy == "fsdp-keep" else 3) + flags


@on_device
def against_zero_redundancy(batches=BATCHES5) -> float:
    """ZeroOptimizer stage 1 next to torch's DDP + ZeroRedundancyOptimizer (AdamW) on the same slices: the largest
    weight difference."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ours = GPT(CFG)
    theirs = DDP(copy.deepcopy(ours))
    opts = (ZeroOptimizer(ours.parameters(), torch.optim.AdamW, stage=1, lr=ADAM_LR),
            ZeroRedundancyOptimizer(theirs.parameters(), torch.optim.AdamW, lr=ADAM_LR))
    for x, y in map(to_device, batches):
        for model, opt in zip((ours, theirs), opts):
            train_step(model, opt, x.chunk(n)[rank], y.chunk(n)[rank])
    return max((a - b).abs().max().item() for a, b in zip(ours.parameters(), theirs.module.parameters()))


def import_deepspeed(cpu: bool = True):
    """DeepSpeed set up for CPU ranks, quiet. Its first init compiles a shared-memory all-reduce kernel (35 s or more
    on 2 cores) that only speeds up all-reduce: it is left out, so its collectives run over gloo like the rest.
    Called in the parent before launching, its imports (seconds, torch.compile's among them) are inherited by the
    forked ranks."""
    if cpu:  # DeepSpeed picks its accelerator once, at import
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    with warnings.catch_warnings():  # its modules use deprecated torch.jit decorators
        warnings.simplefilter("ignore")
        import deepspeed
        import deepspeed.comm.torch  # noqa: F401
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401  (its first optimizer check imports it)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # gloo for every collective (see above)
    return deepspeed


@on_device
def against_deepspeed(stages=(1, 2, 3), batches=BATCHES5) -> dict[int, float]:
    """DeepSpeed's ZeRO stage s (fp32, torch AdamW as its client optimizer) next to minidist's stage s on the same
    slices: {stage: largest weight difference}."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed calls deprecated torch.distributed names
    deepspeed = import_deepspeed(cpu=device().type == "cpu")
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    rank, n = dist.get_rank(), dist.get_world_size()
    out = {}
    for stage in stages:
        torch.manual_seed(0)
        model = GPT(CFG)
        ours, opt = setup(f"zero{stage}", copy.deepcopy(model))
        config = {"train_micro_batch_size_per_gpu": len(batches[0][0]) // n, "steps_per_print": 10 ** 9,
                  "zero_optimization": {"stage": stage}}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=ADAM_LR),
                                          config=config)
        for x, y in map(to_device, batches):
            x, y = x.chunk(n)[rank], y.chunk(n)[rank]
            train_step(ours, opt, x, y)
            engine.backward(lm_loss(engine(x), y))
            engine.step()
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
            theirs = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        mine = full_weights(f"zero{stage}", ours)
        out[stage] = max((mine[k] - v).abs().max().item() for k, v in theirs.items())
    return out


def side_by_side_with_deepspeed(world_size: int, *args) -> list[dict[int, float]]:
    """against_deepspeed on `world_size` ranks, DeepSpeed imported here first (the ranks inherit it)."""
    import_deepspeed(cpu=default_backend(world_size) == "gloo")
    return launch(against_deepspeed, world_size, *args)


def _timed(fn, world_size, *args):
    start = time.perf_counter()
    return launch(fn, world_size, *args), time.perf_counter() - start


NAMES = {"ddp": "DDP (DataParallel)", "zero1": "ZeRO-1 (ZeroOptimizer)", "zero2": "ZeRO-2 (ZeroOptimizer)",
         "zero3": "ZeRO-3 (one fully_shard unit)", "fsdp": "FSDP (a unit per block)",
         "fsdp-keep": "FSDP, no reshard after forward"}


@covers(*[f"{NAMES[s]}, 5 AdamW steps" for s in STRATEGIES])
def check_cross_stage(world_size: int) -> list[dict]:
    per_rank, seconds = _timed(cross_stage, world_size)
    return [make_row(f"{NAMES[s]}, 5 AdamW steps", "one process, global batch (AdamW)",
                     max_abs_diff=max(r[s][0] for r in per_rank), tolerance=ADAM_TOL5, seconds=seconds,
                     replica_divergence=max(r[s][1] for r in per_rank) if s in REPLICATED else None)
            for s in STRATEGIES]


def states_and_bytes_rows(strategies, world_size: int) -> list[dict]:
    per_rank, seconds = _timed(states_and_bytes, world_size, strategies)
    rows = []
    for s in strategies:
        r = per_rank[0][s]
        rows.append(make_row(f"{NAMES[s]}, bf16: bytes, states", f"ring and ZeRO formulas, stage {STAGE[s]}",
                             comm_bytes=counted_mean([{"bytes": p[s]["total"], "counted": p[s]["counted"]}
                                                      for p in per_rank]),
                             comm_bytes_theory=bytes_formula(s, r["psi"], r["tensors"], world_size),
                             state_bytes_per_rank=max(p[s]["states"].total for p in per_rank),
                             state_bytes_per_rank_theory=zero_state_bytes(r["psi"], world_size, STAGE[s]).total,
                             seconds=seconds))
    return rows


@covers(*[f"{NAMES[s]}, bf16: bytes, states" for s in ("ddp", "zero1", "zero2", "zero3")])
def check_states_and_bytes(world_size: int) -> list[dict]:
    return states_and_bytes_rows(("ddp", "zero1", "zero2", "zero3"), world_size)


@covers("ZeRO-1 (ZeroOptimizer), AdamW", *[f"ZeRO-{stage}, AdamW" for stage in (1, 2, 3)])
def check_references(world_size: int) -> list[dict]:
    zero_red, seconds = _timed(against_zero_redundancy, world_size)
    rows = [make_row("ZeRO-1 (ZeroOptimizer), AdamW", "ZeroRedundancyOptimizer + DDP",
                     max_abs_diff=max(zero_red), tolerance=ADAM_TOL5, seconds=seconds)]
    start = time.perf_counter()
    ds, seconds = side_by_side_with_deepspeed(world_size), time.perf_counter() - start
    rows += [make_row(f"ZeRO-{stage}, AdamW", f"DeepSpeed ZeRO stage {stage}",
                      max_abs_diff=max(r[stage] for r in ds), tolerance=ADAM_TOL5, seconds=seconds)
             for stage in (1, 2, 3)]
    return rows


CHECKS = [check_cross_stage, check_states_and_bytes, check_references]
