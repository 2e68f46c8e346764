"""Side-by-side benchmarks: minidist's technique and the production reference, timed in the same run.

Timings on a shared machine drift (other processes, frequency scaling), so the variants are not timed one after
another: each step, every variant runs one training step, in an order that rotates from step to step, and each
variant's median over the steps is reported. Ratios (minidist / reference) are what to compare across machines.
"""
import copy
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
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


# Tensor parallel: minidist's parallelize against PyTorch's DTensor parallelize_module (chapter 04).

def tp_step_times(steps: int, warmup: int, batch_size: int, sequence_parallel: bool) -> dict[str, float]:
    """On every rank: the median seconds per AdamW step of the tiny GPT under minidist's and DTensor's tensor
    parallelism (every rank trains on the same batch), their steps interleaved."""
    from torch.distributed.tensor.parallel import loss_parallel

    from .mesh import Mesh
    from .tensor_parallel import GPT_PLAN, parallelize, vocab_parallel_cross_entropy
    from .tour.tp_dtensor import dtensor_model
    dev, n = device(), dist.get_world_size()
    mesh = Mesh.build(tp=n)
    torch.manual_seed(0)
    base = GPT().to(dev)
    ours = parallelize(copy.deepcopy(base), mesh.group("tp"), GPT_PLAN, sequence_parallel)
    theirs = dtensor_model(base, GPT_PLAN, sequence_parallel, mesh.device_mesh(axes=("tp",)), n)

    def dtensor_loss(logits, y):
        with loss_parallel():
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            loss.backward()
        return loss
    runs = {"minidist": (ours, lambda logits, y: vocab_parallel_cross_entropy(logits, y, mesh.group("tp")), True),
            "reference": (theirs, dtensor_loss, False)}
    opts = {name: torch.optim.AdamW(model.parameters(), lr=1e-3) for name, (model, _, _) in runs.items()}
    times = {name: [] for name in runs}
    batches = random_batches(token_ids(), batch_size, base.cfg.block_size, steps + warmup)
    for step, (x, y) in enumerate(batches):
        x, y = x.to(dev), y.to(dev)
        names = list(runs)[step % 2:] + list(runs)[:step % 2]  # rotate who goes first
        for name in names:
            model, loss_fn, needs_backward = runs[name]
            dist.barrier()
            start = time.perf_counter()
            loss = loss_fn(model(x), y)
            if needs_backward:
                loss.backward()
            opts[name].step()
            opts[name].zero_grad()
            synchronize()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_tp(world_size: int = 2, steps: int = 30, warmup: int = 5, batch_size: int = 8,
             sequence_parallel: bool = False) -> dict:
    """minidist's tensor parallel tiny GPT against DTensor's on the same weights and batches."""
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0 and batch_size >= 1, got steps={steps}, warmup={warmup}, "
                         f"batch_size={batch_size}")
    per_rank = launch(tp_step_times, world_size, steps, warmup, batch_size, sequence_parallel)
    medians = {name: max(r[name] for r in per_rank) for name in per_rank[0]}  # the slowest rank sets the pace
    return {"world_size": world_size, "model": "tiny-gpt", "steps": steps, "warmup": warmup,
            "batch_size": batch_size, "sequence_parallel": sequence_parallel,
            "minidist_s": medians["minidist"], "reference_s": medians["reference"],
            "ratio": medians["minidist"] / medians["reference"]}


def format_tp(result: dict) -> str:
    sp = " + sequence parallel" if result["sequence_parallel"] else ""
    return "\n".join([
        f"tiny GPT, tensor parallel{sp} on {result['world_size']} ranks, batch {result['batch_size']}, median of "
        f"{result['steps']} steps (after {result['warmup']} warm-up), AdamW",
        f"  DTensor parallelize_module      {result['reference_s'] * 1e3:8.2f} ms/step",
        f"  minidist parallelize            {result['minidist_s'] * 1e3:8.2f} ms/step   "
        f"ratio {result['ratio']:.3f} (goal <= 1.15)",
    ])
