"""What the flight recorder (comm/flight.py, the hang diagnosis) costs a data-parallel step.

The recorder's cost per operation (enter + complete, mirrored to the memory-mapped file) is microseconds, far below
the run-to-run noise of a step on a shared machine, so it is measured on its own (best of many repeats) and
multiplied by the operations a step records, next to the step's own median time with the recorder on and off.
"""
import time

import torch
import torch.distributed as dist

from ..comm import flight
from ..data import random_batches, token_ids
from ..data_parallel import DataParallel
from ..launch import device, launch
from ..models import GPT, lm_loss
from .ddp import median_step_times


def _seconds_per_entry(tensor, repeats: int = 20, n: int = 2000) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            flight.complete(flight.enter("all_reduce", tensor))
        best = min(best, (time.perf_counter() - start) / n)
    return best


def flight_step_times(steps: int, warmup: int, batch_size: int, bucket_cap_mb: float) -> dict:
    """On every rank: median step time with the recorder on and off (steps alternate), entries per step, and the
    cost of one entry."""
    dev, rank, n = device(), dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DataParallel(GPT().to(dev), bucket_cap_mb=bucket_cap_mb)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [(x.chunk(n)[rank].to(dev), y.chunk(n)[rank].to(dev)) for x, y in
               random_batches(token_ids(), batch_size * n, GPT().cfg.block_size, steps + warmup)]

    def step(on):
        def run(x, y):
            flight.ENABLED = on
            lm_loss(model(x), y).backward()
        return run, opt
    enabled = flight.ENABLED
    try:
        times = median_step_times({"on": step(True), "off": step(False)}, batches, warmup)
        flight.ENABLED = True
        x, y = batches[0]
        before = sum(flight._seq.values())  # one sequence number per recorded operation
        lm_loss(model(x), y).backward()
        count = sum(flight._seq.values()) - before
        opt.zero_grad()
        entry = _seconds_per_entry(torch.ones(4))
    finally:
        flight.ENABLED = enabled
    return {"on_s": times["on"], "off_s": times["off"], "entries_per_step": count, "entry_s": entry}


def bench_flight(world_size: int = 2, steps: int = 30, warmup: int = 5, bucket_cap_mb: float = 0.25,
                 batch_size: int = 16) -> dict:
    """The recorder's cost on the tiny GPT's overlapped data-parallel step (slowest rank's figures)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    per_rank = launch(flight_step_times, world_size, steps, warmup, batch_size, bucket_cap_mb)
    worst = {k: max(r[k] for r in per_rank) for k in per_rank[0]}
    return {"world_size": world_size, "steps": steps, "bucket_cap_mb": bucket_cap_mb, **worst,
            "fraction_of_step": worst["entries_per_step"] * worst["entry_s"] / worst["off_s"]}


def format_flight(result: dict) -> str:
    return "\n".join([
        f"tiny GPT, {result['world_size']} ranks, overlapped DataParallel, bucket {result['bucket_cap_mb']} MiB, "
        f"median of {result['steps']} steps (recorder on and off alternate)",
        f"  step, recorder off        {result['off_s'] * 1e3:8.2f} ms",
        f"  step, recorder on         {result['on_s'] * 1e3:8.2f} ms   (the difference is mostly noise)",
        f"  one recorded operation    {result['entry_s'] * 1e6:8.2f} us (best of 20 x 2,000)",
        f"  operations per step       {result['entries_per_step']:8d}",
        f"  recorder's share of a step {result['fraction_of_step']:.3%}",
    ])
