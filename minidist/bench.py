"""Side-by-side benchmarks: minidist's technique and the production reference, timed in the same run.

Timings on a shared machine drift (other processes, frequency scaling), so the variants are not timed one after
another: each step, every variant runs one training step, in an order that rotates from step to step, and each
variant's median over the steps is reported. Ratios (minidist / reference) are what to compare across machines.
"""
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .data import random_batches, token_ids
from .data_parallel import DataParallel
from .launch import device, launch, synchronize
from .models import GPT, lm_loss


def ddp_variants(bucket_cap_mb: float) -> dict:
    return {
        "minidist": lambda m: DataParallel(m, bucket_cap_mb=bucket_cap_mb, overlap=True),
        "reference": lambda m: DDP(m, bucket_cap_mb=bucket_cap_mb),
        "bucketed": lambda m: DataParallel(m, bucket_cap_mb=bucket_cap_mb, overlap=False),
        "naive": lambda m: DataParallel(m, bucket_cap_mb=None, overlap=False),
    }


def ddp_step_times(bucket_cap_mb: float, steps: int, warmup: int, batch_size: int) -> dict[str, float]:
    """On every rank: the median seconds per training step of each data-parallel variant of the tiny GPT."""
    dev, rank, n = device(), dist.get_rank(), dist.get_world_size()
    models = {}
    for name, wrap in ddp_variants(bucket_cap_mb).items():
        torch.manual_seed(0)
        model = wrap(GPT().to(dev))
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    batches = random_batches(token_ids(), batch_size * n, GPT().cfg.block_size, steps + warmup)
    times = {name: [] for name in models}
    names = list(models)
    for step, (x, y) in enumerate(batches):
        x, y = x.chunk(n)[rank].to(dev), y.chunk(n)[rank].to(dev)
        for name in names[step % len(names):] + names[:step % len(names)]:  # rotate who goes first
            model, opt = models[name]
            dist.barrier()
            start = time.perf_counter()
            lm_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            synchronize()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_ddp(world_size: int = 2, steps: int = 30, warmup: int = 5, bucket_cap_mb: float = 0.25,
              batch_size: int = 16) -> dict:
    """minidist's overlapped DataParallel against torch DDP at the same bucket size; naive and bucketed too."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    per_rank = launch(ddp_step_times, world_size, bucket_cap_mb, steps, warmup, batch_size)
    medians = {name: max(r[name] for r in per_rank) for name in per_rank[0]}  # the slowest rank sets the pace
    return {"world_size": world_size, "model": "tiny-gpt", "steps": steps, "warmup": warmup,
            "bucket_cap_mb": bucket_cap_mb, "batch_size_per_rank": batch_size,
            "minidist_s": medians["minidist"], "reference_s": medians["reference"],
            "ratio": medians["minidist"] / medians["reference"],
            "bucketed_s": medians["bucketed"], "naive_s": medians["naive"]}


def format_ddp(result: dict) -> str:
    return "\n".join([
        f"tiny GPT, {result['world_size']} ranks, bucket {result['bucket_cap_mb']} MiB, median of {result['steps']} "
        f"steps (after {result['warmup']} warm-up), AdamW",
        f"  torch DDP                       {result['reference_s'] * 1e3:8.2f} ms/step",
        f"  minidist overlapped             {result['minidist_s'] * 1e3:8.2f} ms/step   "
        f"ratio {result['ratio']:.3f} (goal <= 1.10)",
        f"  minidist bucketed, no overlap   {result['bucketed_s'] * 1e3:8.2f} ms/step",
        f"  minidist naive, per parameter   {result['naive_s'] * 1e3:8.2f} ms/step",
    ])


# Chapters 05 and 06: ZeRO against torch's ZeroRedundancyOptimizer, FSDP against FSDP2.

def _zero_variants() -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from .zero import ZeroOptimizer
    return {
        "minidist": lambda m: (m, ZeroOptimizer(m.parameters(), torch.optim.AdamW, stage=1, lr=1e-3)),
        "reference": lambda m: (DDP(m), ZeroRedundancyOptimizer(m.parameters(), torch.optim.AdamW, lr=1e-3)),
        "stage2": lambda m: (m, ZeroOptimizer(m.parameters(), torch.optim.AdamW, stage=2, lr=1e-3)),
    }


def _fsdp_variants() -> dict:
    from torch.distributed.fsdp import fully_shard as torch_fully_shard
    from .fsdp import fully_shard
    from .mesh import Mesh

    def per_block(shard, m):
        for block in m.blocks:
            shard(block)
        shard(m)
        return m, torch.optim.AdamW(m.parameters(), lr=1e-3)
    mesh = Mesh.build(dp=dist.get_world_size()).device_mesh(axes=("dp",))
    return {"minidist": lambda m: per_block(fully_shard, m),
            "reference": lambda m: per_block(lambda mod: torch_fully_shard(mod, mesh=mesh), m),
            "one_unit": lambda m: (fully_shard(m), torch.optim.AdamW(m.parameters(), lr=1e-3))}


def sharded_step_times(what: str, steps: int, warmup: int, batch_size: int) -> dict[str, float]:
    """On every rank: the median seconds per training step of each variant (interleaved, rotating, as for ddp)."""
    dev, rank, n = device(), dist.get_rank(), dist.get_world_size()
    builders = _zero_variants() if what == "zero" else _fsdp_variants()
    models = {}
    for name, build in builders.items():
        torch.manual_seed(0)
        models[name] = build(GPT().to(dev))
    batches = random_batches(token_ids(), batch_size * n, GPT().cfg.block_size, steps + warmup)
    times, names = {name: [] for name in models}, list(models)
    for step, (x, y) in enumerate(batches):
        x, y = x.chunk(n)[rank].to(dev), y.chunk(n)[rank].to(dev)
        for name in names[step % len(names):] + names[:step % len(names)]:
            model, opt = models[name]
            dist.barrier()
            start = time.perf_counter()
            lm_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            synchronize()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_sharded(what: str, world_size: int = 2, steps: int = 30, warmup: int = 5, batch_size: int = 16) -> dict:
    """what="zero": ZeroOptimizer stage 1 against DDP + ZeroRedundancyOptimizer (stage 2 too); what="fsdp":
    per-block fully_shard against FSDP2's per-block fully_shard (one unit too). AdamW, the tiny GPT."""
    if what not in ("zero", "fsdp"):
        raise ValueError(f"bench_sharded compares 'zero' or 'fsdp', got {what!r}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    import torch._dynamo  # noqa: F401  (imported by the first optimizer: once here, the forked ranks inherit it)
    token_ids()           # tokenized once here, not on every rank
    per_rank = launch(sharded_step_times, world_size, what, steps, warmup, batch_size)
    medians = {name: max(r[name] for r in per_rank) for name in per_rank[0]}
    extra = "stage2" if what == "zero" else "one_unit"
    return {"what": what, "world_size": world_size, "model": "tiny-gpt", "steps": steps, "warmup": warmup,
            "batch_size_per_rank": batch_size, "minidist_s": medians["minidist"],
            "reference_s": medians["reference"], "ratio": medians["minidist"] / medians["reference"],
            f"{extra}_s": medians[extra], f"{extra}_ratio": medians[extra] / medians["reference"]}


def format_sharded(result: dict) -> str:
    zero = result["what"] == "zero"
    names = (("torch DDP + ZeroRedundancyOptimizer", "minidist ZeroOptimizer, stage 1",
              "minidist ZeroOptimizer, stage 2", "stage2", 1.15) if zero else
             ("torch FSDP2 fully_shard, per block", "minidist fully_shard, per block",
              "minidist fully_shard, one unit", "one_unit", 1.25))
    return "\n".join([
        f"tiny GPT, {result['world_size']} ranks, median of {result['steps']} steps (after {result['warmup']} warm-up),"
        f" AdamW",
        f"  {names[0]:<38}{result['reference_s'] * 1e3:8.2f} ms/step",
        f"  {names[1]:<38}{result['minidist_s'] * 1e3:8.2f} ms/step   ratio {result['ratio']:.3f} "
        f"(goal <= {names[4]})",
        f"  {names[2]:<38}{result[names[3] + '_s'] * 1e3:8.2f} ms/step   ratio {result[names[3] + '_ratio']:.3f}",
    ])
