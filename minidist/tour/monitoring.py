"""Tour check for chapter 12's training telemetry: a data-parallel run with one rank slowed on purpose, monitored.

The rank function trains the tiny GPT of chapter 02 with DataParallel on minidist's ring (bytes counted), one rank
sleeping `delay` seconds in every step: inside backward (the default: in the first block's backward, the last to
run, while the later buckets' all-reduces are already in flight, so part of the delay overlaps communication and
counts as such) or between forward and backward (nothing in flight). The monitor must name that rank, and the bytes
it recorded per step must be the all-reduce of the gradients, 2 (N-1)/N x 4 psi per rank (summed over the ranks:
2 (N-1) x 4 psi, exactly). The tests and the notebook call it too.
"""
import time
from fractions import Fraction

import torch
import torch.distributed as dist

from .. import comm
from ..data_parallel import DataParallel
from ..launch import launch
from ..models import GPT, lm_loss
from ..monitor import Monitor, summary
from .data_parallel import BATCHES, CFG
from .rows import make_row

DELAY = 0.15  # seconds the slow rank sleeps in each step: several times the tiny model's step on a laptop core


def monitored_training(slow_rank: int | None = None, delay: float = DELAY, steps: int = 6,
                       where: str = "backward") -> dict:
    """DataParallel training monitored on every rank; every rank returns every rank's records (gathered)."""
    if where not in ("backward", "forward"):
        raise ValueError(f"where must be 'backward' or 'forward', got {where!r}")
    torch.manual_seed(0)
    gpt = GPT(CFG)
    n, rank, monitor = dist.get_world_size(), dist.get_rank(), Monitor()
    slow = rank == slow_rank
    if slow and where == "backward":  # the straggler: slower compute inside backward, while buckets are in flight
        gpt.blocks[0].register_full_backward_hook(lambda *_: time.sleep(delay))
    model = DataParallel(gpt, bucket_cap_mb=0.02)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with comm.ring_backend():
        for step in range(steps):
            x, y = (t.chunk(n)[rank] for t in BATCHES[step % len(BATCHES)])
            with monitor.step(tokens=x.numel()):
                loss = lm_loss(model(x), y)
                if slow and where == "forward":
                    time.sleep(delay)                              # the straggler, between forward and backward
                loss.backward()
                opt.step()
                opt.zero_grad()
    psi = sum(p.numel() for p in model.parameters())
    return {"records": monitor.gather(), "psi": psi}


def check_monitoring(world_size: int) -> list[dict]:
    n = world_size
    slow = n - 1 if n > 1 else None
    start = time.perf_counter()
    result = launch(monitored_training, n, slow)[0]
    seconds = time.perf_counter() - start
    info = summary(result["records"])
    found = info["stragglers"]
    per_step = Fraction(sum(r["bytes_sent"] for r in result["records"])) / len(result["records"])  # exact: whole bytes
    return [make_row(f"monitor: straggler found ({found or 'none'}; slowed: {slow})", "the rank slowed on purpose",
                     max_abs_diff=0 if found == ([slow] if slow is not None else []) else 1, tolerance=0,
                     seconds=seconds),
            make_row("monitor: bytes per step and rank (counted)", "2(N-1)/N x 4 psi (all-reduce)",
                     comm_bytes=per_step, comm_bytes_theory=comm.ring_bytes("all_reduce", 4 * result["psi"], n),
                     seconds=seconds)]


CHECKS = [check_monitoring]
