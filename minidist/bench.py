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
    batches = [(x.chunk(n)[rank].to(dev), y.chunk(n)[rank].to(dev)) for x, y in   # this rank's slices
               random_batches(token_ids(), batch_size * n, GPT().cfg.block_size, steps + warmup)]
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


# Pipeline parallel: minidist's 1F1B runtime against torch.distributed.pipelining's Schedule1F1B.

def pp_step_times(microbatches: int, steps: int, warmup: int, batch_size: int, n_layer: int) -> dict[str, float]:
    """On every rank: the median seconds per training step of minidist's 1F1B and torch's Schedule1F1B on the same
    stages of the tiny GPT (both exchange the tied embedding's gradient between the first and last rank)."""
    import copy

    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from .models import GPTConfig
    from .pipeline.runtime import PipelineRuntime, sync_tied_grads, tied_parameters
    from .pipeline.schedule import one_f_one_b
    from .pipeline.stages import rank_stages
    dev, rank, p = device(), dist.get_rank(), dist.get_world_size()
    cfg = GPTConfig(n_layer=n_layer)
    torch.manual_seed(0)
    ours = GPT(cfg).to(dev)
    theirs = copy.deepcopy(ours)
    pipe = PipelineRuntime(rank_stages(ours, p, rank), one_f_one_b(p, microbatches), cfg.n_embd,
                           track_memory=False)
    stages = rank_stages(theirs, p, rank)
    schedule = Schedule1F1B(PipelineStage(stages[0], rank, p, dev), microbatches, loss_fn=lm_loss)

    def torch_step(x, y):
        schedule.step(*([x] if rank == 0 else []), **(dict(target=y) if rank == p - 1 else {}))
        sync_tied_grads(tied_parameters(stages))
    runs = {"minidist": (pipe.step, torch.optim.AdamW(pipe.parameters(), lr=1e-3)),
            "reference": (torch_step, torch.optim.AdamW([q for s in stages for q in s.parameters()], lr=1e-3))}
    batches = random_batches(token_ids(), batch_size, cfg.block_size, steps + warmup)
    return median_step_times(runs, [(x.to(dev), y.to(dev)) for x, y in batches], warmup)


def bench_pp(world_size: int = 2, steps: int = 20, warmup: int = 3, microbatches: int = 4,
             batch_size: int = 16, n_layer: int = 4) -> dict:
    """minidist's 1F1B pipeline against torch's Schedule1F1B: median step times and their ratio."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if microbatches < world_size or batch_size % microbatches:
        raise ValueError(f"need micro-batches >= ranks (torch's Schedule1F1B requires it) dividing the batch: got "
                         f"{microbatches} micro-batches, {world_size} ranks, batch {batch_size}")
    per_rank = launch(pp_step_times, world_size, microbatches, steps, warmup, batch_size, n_layer)
    medians = {name: max(r[name] for r in per_rank) for name in per_rank[0]}  # the slowest rank sets the pace
    return {"world_size": world_size, "model": f"tiny-gpt, {n_layer} layers", "schedule": "1f1b", "steps": steps,
            "warmup": warmup, "microbatches": microbatches, "batch_size": batch_size,
            "minidist_s": medians["minidist"], "reference_s": medians["reference"],
            "ratio": medians["minidist"] / medians["reference"]}


def format_pp(result: dict) -> str:
    return "\n".join([
        f"{result['model']}, {result['world_size']} pipeline ranks, 1F1B, {result['microbatches']} micro-batches of "
        f"{result['batch_size'] // result['microbatches']}, median of {result['steps']} steps "
        f"(after {result['warmup']} warm-up), AdamW",
        f"  torch Schedule1F1B              {result['reference_s'] * 1e3:8.2f} ms/step",
        f"  minidist PipelineRuntime 1F1B   {result['minidist_s'] * 1e3:8.2f} ms/step   "
        f"ratio {result['ratio']:.3f} (goal <= 1.20)",
    ])
