"""Data parallel: minidist's DataParallel (naive, bucketed, overlapped) against torch DDP (chapter 02).

median_step_times is the interleaved timing loop every side-by-side benchmark uses."""
import math
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ..data import random_batches, token_ids
from ..data_parallel import DataParallel
from ..launch import device, launch, synchronize
from ..models import GPT, lm_loss
from .suite import gpt_config, prepare, shape_fields


def ddp_variants(bucket_cap_mb: float) -> dict:
    return {
        "minidist": lambda m: DataParallel(m, bucket_cap_mb=bucket_cap_mb, overlap=True),
        # torch DDP at its fastest: gradients as views of its buckets (as minidist's are), no broadcast of the GPT's
        # constant buffers before every forward (minidist broadcasts none)
        "reference": lambda m: DDP(m, bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=True,
                                   forward_sync_buffers=False),
        "bucketed": lambda m: DataParallel(m, bucket_cap_mb=bucket_cap_mb, overlap=False),
        "naive": lambda m: DataParallel(m, bucket_cap_mb=None, overlap=False),
    }


def ddp_step_times(bucket_cap_mb: float, steps: int, warmup: int, batch_size: int, cfg=None) -> dict[str, float]:
    """On every rank: the median seconds per training step of each data-parallel variant of the GPT of `cfg` (the
    tiny one by default)."""
    dev, rank, n = device(), dist.get_rank(), dist.get_world_size()
    models = {}
    for name, wrap in ddp_variants(bucket_cap_mb).items():
        torch.manual_seed(0)
        model = wrap(GPT(cfg).to(dev))
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    batches = [(x.chunk(n)[rank].to(dev), y.chunk(n)[rank].to(dev)) for x, y in   # this rank's slices
               random_batches(token_ids(), batch_size * n, GPT(cfg).cfg.block_size, steps + warmup)]
    return median_step_times({name: (lambda x, y, model=model: lm_loss(model(x), y).backward(), opt)
                              for name, (model, opt) in models.items()}, batches, warmup)


def median_step_times(runs: dict, batches, warmup: int) -> dict[str, float]:
    """runs: name -> (step(x, y), optimizer). For each batch every variant runs one training step (its step, then
    its optimizer), in an order that rotates; returns each variant's median seconds per step after `warmup`."""
    times, names = {name: [] for name in runs}, list(runs)
    for step, (x, y) in enumerate(batches):
        for name in names[step % len(names):] + names[:step % len(names)]:  # rotate who goes first
            run, opt = runs[name]
            dist.barrier()
            start = time.perf_counter()
            run(x, y)
            opt.step()
            opt.zero_grad()
            synchronize()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def default_bucket_mb(params: int) -> float:
    """Half the fp32 gradients' MiB rounded *up* to 0.01 (rounded down, a third bucket of a few KiB is left over: the
    tiny GPT had one of 2.5 KiB, a third launch per step), at most torch DDP's default 25: two buckets to overlap, and
    no more than a real run would cut (the tiny GPT: 0.27 MiB; 25.5M parameters: 25). With a fixed 0.25 MiB the 25.5M
    GPT has some 390 buckets, and the time measured is Python's per-bucket cost (ratio 1.22) more than data
    parallelism's."""
    return min(25.0, math.ceil(params * 4 / 2**20 / 2 * 100) / 100)


def bench_ddp(world_size: int = 2, steps: int = 30, warmup: int = 5, bucket_cap_mb: float | None = None,
              batch_size: int | None = None, *, n_layer: int | None = None, n_embd: int | None = None,
              seq: int | None = None) -> dict:
    """minidist's overlapped DataParallel against torch DDP at the same bucket size (default: default_bucket_mb);
    naive and bucketed too. The GPT: the tiny one unless n_layer, n_embd, seq say otherwise; batch_size: sequences
    per rank (default 16)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    cfg, batch_size = gpt_config(n_layer, n_embd, seq), batch_size or 16
    shape = shape_fields(cfg)   # builds the GPT on the meta device to count its parameters: once
    bucket_cap_mb = bucket_cap_mb or default_bucket_mb(shape["params"])
    prepare()
    per_rank = launch(ddp_step_times, world_size, bucket_cap_mb, steps, warmup, batch_size, cfg)
    medians = {name: max(r[name] for r in per_rank) for name in per_rank[0]}  # the slowest rank sets the pace
    return {"world_size": world_size, **shape, "steps": steps, "warmup": warmup,
            "bucket_cap_mb": bucket_cap_mb, "batch_size_per_rank": batch_size,
            "minidist_s": medians["minidist"], "reference_s": medians["reference"],
            "ratio": medians["minidist"] / medians["reference"],
            "bucketed_s": medians["bucketed"], "naive_s": medians["naive"],
            "bucketed_ratio": medians["bucketed"] / medians["reference"],
            "naive_ratio": medians["naive"] / medians["reference"]}


def format_ddp(result: dict) -> str:
    return "\n".join([
        f"{result['model']}, {result['world_size']} ranks, bucket {result['bucket_cap_mb']} MiB, median of "
        f"{result['steps']} "
        f"steps (after {result['warmup']} warm-up), AdamW",
        f"  torch DDP                       {result['reference_s'] * 1e3:8.2f} ms/step",
        f"  minidist overlapped             {result['minidist_s'] * 1e3:8.2f} ms/step   "
        f"ratio {result['ratio']:.3f} (goal <= 1.05)",
        f"  minidist bucketed, no overlap   {result['bucketed_s'] * 1e3:8.2f} ms/step",
        f"  minidist naive, per parameter   {result['naive_s'] * 1e3:8.2f} ms/step",
    ])
