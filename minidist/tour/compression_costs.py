"""Chapter 10's measurements of what compression costs and saves: step times (compression overhead on one rank,
interleaved medians; whole steps over a simulated link) and the loss against the bytes sent. The notebook runs them;
timings vary with the machine, so no test asserts on them.
"""
import time

import torch
import torch.distributed as dist

from .. import comm
from ..bench.ddp import median_step_times
from ..comm.ledger import RING_FACTOR
from ..data import random_batches, token_ids, train_val_split
from ..data_parallel import DataParallel
from ..models import GPT, lm_loss
from ..testing import on_device, replica_divergence, to_device
from .compression import TOPK_RATIO, make_hook
from .data_parallel import BATCHES, CFG


def _hooked(method: str, ratio: float, rank: int, overlap: bool = True) -> DataParallel:
    """The tiny GPT in one bucket, with minidist's `method` hook (PowerSGD after two plain steps)."""
    torch.manual_seed(0)
    dp = DataParallel(GPT(CFG), bucket_cap_mb=25, overlap=overlap)
    if method != "none":
        dp.register_comm_hook(*make_hook(method, ratio=ratio, rank=rank, start=2))
    return dp


@on_device
def hook_overheads(methods: list[str], steps: int = 12, ratio: float = TOPK_RATIO, rank: int = 1) -> dict:
    """Median seconds of one training step with each method (one bucket, communication after backward), steps
    interleaved across methods so that a busy machine slows them alike, after two warm-up steps (PowerSGD's plain
    ones). On one rank a hook computes everything and sends nothing: the difference from "none" is its overhead."""
    x, y = to_device(BATCHES[0])
    runs = {}
    for method in methods:
        dp = _hooked(method, ratio, rank, overlap=False)
        runs[method] = (lambda x, y, dp=dp: lm_loss(dp(x), y).backward(), torch.optim.SGD(dp.parameters(), lr=0.1))
    with comm.ring_backend():
        return median_step_times(runs, [(x, y)] * (2 + steps), warmup=2)


@on_device
def step_seconds(methods: list[str], link=None, steps: int = 8, ratio: float = TOPK_RATIO, rank: int = 1) -> dict:
    """Seconds of a DataParallel step (tiny GPT, one bucket, no overlap: communication after backward) with each
    method under the ring backend over `link` (a comm.SimulatedLink, or None: loopback), after PowerSGD's plain
    steps: the fastest of `steps` (the one least disturbed by other processes on a shared machine); and the bytes
    this rank sent and the messages of one step."""
    rank_, n = dist.get_rank(), dist.get_world_size()
    x, y = to_device(BATCHES[0])
    x, y = x.chunk(n)[rank_], y.chunk(n)[rank_]
    out = {}
    for method in methods:
        dp = _hooked(method, ratio, rank, overlap=False)
        opt, times = torch.optim.SGD(dp.parameters(), lr=0.1), []
        with comm.ring_backend(link):
            for step in range(2 + steps):  # two warm-up steps (PowerSGD's plain ones among them)
                dist.barrier()
                start = time.perf_counter()
                with comm.ByteLedger() as ledger:
                    lm_loss(dp(x), y).backward()
                opt.step()
                opt.zero_grad()
                times.append(time.perf_counter() - start)
        messages = sum(RING_FACTOR[r.op] * (n - 1) for r in ledger.records)  # ring: 2(N-1) or N-1 per collective
        out[method] = {"seconds": min(times[2:]), "bytes": ledger.total_bytes(), "messages": messages}
    return out


@on_device
def loss_vs_bytes(methods: list[str], steps: int = 100, batch: int = 16, lr: float = 3e-3, ratio: float = TOPK_RATIO,
                  rank: int = 1) -> dict:
    """The trade-off picture: the tiny GPT trained on the corpus with each method (AdamW, the same seed and
    batches, one bucket), under the ring backend: the loss averaged over ranks and the bytes this rank has sent
    (counted) after each step. "topk-no-ef" is top-k without error feedback."""
    r, n = dist.get_rank(), dist.get_world_size()
    batches = random_batches(train_val_split(token_ids())[0], batch, CFG.block_size, steps, seed=0)
    out = {}
    for method in methods:
        torch.manual_seed(0)
        dp = DataParallel(GPT(CFG), bucket_cap_mb=25)
        if method != "none":
            dp.register_comm_hook(*make_hook(method.split("-")[0], ratio=ratio, rank=rank,
                                             error_feedback=not method.endswith("no-ef")))
        opt, losses, sent = torch.optim.AdamW(dp.parameters(), lr=lr), [], []
        with comm.ring_backend(), comm.ByteLedger() as ledger:
            for x, y in map(to_device, batches):
                loss = lm_loss(dp(x.chunk(n)[r]), y.chunk(n)[r])
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.detach())
                sent.append(int(ledger.total_bytes()))
        stacked = torch.stack(losses)
        dist.all_reduce(stacked)  # the loss averaged over ranks, for the curve only (outside the ledger)
        out[method] = {"loss": (stacked / n).tolist(), "bytes": sent, "divergence": replica_divergence(dp)}
    return out
