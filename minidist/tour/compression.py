"""Tour checks for chapter 10 (gradient compression).

Each hook trains DataParallel under minidist's ring backend, so the bytes of a step are counted, and they must equal
the method's formula exactly. fp16, bf16 and PowerSGD are trained next to torch's own hook registered on the same
buckets (torch's hooks run on DataParallel unchanged: DDP's interface), and must give the same weights. Top-k has no
torch reference; its error feedback is checked by its invariant, on gradients that are whole numbers so every sum is
exact. The tests and the notebook call these same rank functions.
"""
import time

import torch
import torch.distributed as dist

from .. import comm
from ..compression import (PowerSGDState, TopKState, bf16_compress_hook, cast_bytes, fp16_compress_hook,
                           powersgd_bytes, powersgd_hook, topk_bytes, topk_hook)
from ..data import random_batches, token_ids, train_val_split
from ..data_parallel import DataParallel
from ..launch import launch
from ..ledger import RING_FACTOR
from ..models import GPT, lm_loss
from ..testing import on_device, replica_divergence, to_device
from .data_parallel import BATCHES, CFG
from .rows import covers, make_row

RANK, START = 2, 2  # PowerSGD: rank-2 approximations from the third step on (two plain steps first, as torch needs)
TOPK_RATIO = 0.05
CAPS = {"fp16": 0.02, "bf16": 0.02, "topk": 0.02, "powersgd": 25, "none": 0.02}  # PowerSGD: one bucket


def make_hook(method: str, group=None, ratio: float = TOPK_RATIO, rank: int = RANK, start: int = START,
              error_feedback: bool = True):
    """(state, hook) of minidist's `method`: "fp16", "bf16", "topk", "powersgd"."""
    if method == "topk":
        return TopKState(group, ratio, error_feedback), topk_hook
    if method == "powersgd":
        return PowerSGDState(group, rank, start, use_error_feedback=error_feedback, warm_start=error_feedback), \
            powersgd_hook
    return group, {"fp16": fp16_compress_hook, "bf16": bf16_compress_hook}[method]


def torch_hook(method: str):
    """torch's own hook for `method`, with the same settings."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    if method == "powersgd":
        return powerSGD_hook.PowerSGDState(None, RANK, START), powerSGD_hook.powerSGD_hook
    return None, {"fp16": default_hooks.fp16_compress_hook, "bf16": default_hooks.bf16_compress_hook}[method]


def formula(method: str, dp: DataParallel, state, n: int):
    """Mean bytes per rank of one (compressed) step, from the buckets' sizes and shapes."""
    numels = [b.stop - b.start for b in dp.buckets]
    if method in ("fp16", "bf16"):
        return cast_bytes(numels, n)
    if method == "topk":
        return topk_bytes(numels, n, state)
    shapes = [[dp.reducer.params[i].shape for i in b.params] for b in dp.buckets]
    return powersgd_bytes(shapes, n, state)


@on_device
def counted_training(method: str, steps: int = len(BATCHES)) -> dict:
    """DataParallel with minidist's `method` hook under the ring backend, SGD: the bytes this rank sent in the last
    step (counted), their formula, the replica divergence."""
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    dp = DataParallel(GPT(CFG), bucket_cap_mb=CAPS[method])
    state, hook = make_hook(method)
    dp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(dp.parameters(), lr=0.1)
    with comm.ring_backend():
        for x, y in map(to_device, BATCHES[:steps]):
            with comm.ByteLedger() as ledger:
                lm_loss(dp(x.chunk(n)[rank]), y.chunk(n)[rank]).backward()
            opt.step()
            opt.zero_grad()
    return {"bytes": ledger.total_bytes(), "counted": ledger.counted, "formula": formula(method, dp, state, n),
            "divergence": replica_divergence(dp), "collectives": ledger.count()}


@on_device
def against_torch(method: str, steps: int = len(BATCHES)) -> float:
    """Largest weight difference between minidist's hook and torch's (same settings), each registered on a
    DataParallel with the same buckets (one bucket: torch's PowerSGD chains blocking waits inside gloo's callbacks,
    which stall when several buckets are in flight)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    models = []
    for hooks in (make_hook(method), torch_hook(method)):
        torch.manual_seed(0)
        models.append(DataParallel(GPT(CFG)))
        models[-1].register_comm_hook(*hooks)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    for x, y in map(to_device, BATCHES[:steps]):
        for model, opt in zip(models, opts):
            lm_loss(model(x.chunk(n)[rank]), y.chunk(n)[rank]).backward()
            opt.step()
            opt.zero_grad()
    return max((a - b).abs().max().item() for a, b in zip(models[0].parameters(), models[1].parameters()))


def every_hook(methods: list[str]) -> dict:
    """For each method, in one launch: counted_training's result, and against_torch's difference (0.0 for top-k,
    which torch does not have)."""
    return {m: (counted_training(m), against_torch(m) if m != "topk" else 0.0) for m in methods}


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
        torch.manual_seed(0)
        dp = DataParallel(GPT(CFG), bucket_cap_mb=25, overlap=False)
        if method != "none":
            dp.register_comm_hook(*make_hook(method, ratio=ratio, rank=rank, start=2))
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


class WholeBucket:
    """A stand-in GradBucket over a flat tensor, to drive a hook directly."""

    def __init__(self, buf, index=0):
        self.buf, self.i = buf, index

    def buffer(self):
        return self.buf

    def index(self):
        return self.i

    def is_last(self):
        return True

    def gradients(self):
        return [self.buf]

    def parameters(self):
        return []


@on_device
def topk_invariant(steps: int = 30, size: int = 200, ratio: float = 0.1, error_feedback: bool = True) -> dict:
    """Drive topk_hook for `steps` steps on every rank with whole-number gradients (multiples of 12, so sums and
    their division by N <= 4 are exact): half the entries large and random, half a small constant (a weight that
    learns slowly but steadily). Returns max |N x (sum of the averaged results) + (sum over ranks of the last
    residuals) - (sum over ranks and steps of the true gradients)|, 0 when nothing is ever lost; and the fraction of
    entries that never received an update."""
    n = dist.get_world_size()
    state = TopKState(None, ratio, error_feedback)
    g = torch.Generator().manual_seed(dist.get_rank())
    sent, truth = torch.zeros(size), torch.zeros(size)
    for _ in range(steps):
        grad = torch.full((size,), 12.0)
        grad[:size // 2] = 12.0 * torch.randint(-10, 11, (size // 2,), generator=g).float()
        truth += comm.all_reduce_sum(grad)
        sent += topk_hook(state, WholeBucket(grad.clone())).wait()
    residual = comm.all_reduce_sum(state.residuals.get(0, torch.zeros(size)))
    return {"error": (n * sent + residual - truth).abs().max().item(),
            "never_updated": (sent == 0).float().mean().item()}


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


def _mean(per_rank: list[dict]):
    return sum(r["bytes"] for r in per_rank) / len(per_rank) if all(r["counted"] for r in per_rank) else None


TORCH_NAMES = {"fp16": "fp16_compress_hook", "bf16": "bf16_compress_hook", "powersgd": "powerSGD_hook"}
NAMES = {"fp16": "fp16 compression hook", "bf16": "bf16 compression hook",
         "powersgd": f"PowerSGD hook, rank {RANK}", "topk": f"top-k hook, {TOPK_RATIO:.0%} + error feedback"}


@covers("compression hook", "PowerSGD", "top-k")
def check_compression(world_size: int) -> list[dict]:
    n, rows = world_size, []
    for method in ("fp16", "bf16", "powersgd", "topk"):
        start = time.perf_counter()
        counted = launch(counted_training, n, method)
        diff, reference = None, "k x (4 B value + 4 B index) x (N-1)"
        if method != "topk":
            diff, reference = max(launch(against_torch, n, method)), f"torch's {TORCH_NAMES[method]}"
        rows.append(make_row(NAMES[method], reference, max_abs_diff=diff, tolerance=None if diff is None else 0.0,
                             replica_divergence=max(c["divergence"] for c in counted), comm_bytes=_mean(counted),
                             comm_bytes_theory=counted[0]["formula"], seconds=time.perf_counter() - start))
    start = time.perf_counter()
    inv = launch(topk_invariant, n)
    rows.append(make_row("top-k: N x sent + residuals = sum of gradients", "exact (whole numbers)",
                         max_abs_diff=max(i["error"] for i in inv), tolerance=0.0,
                         seconds=time.perf_counter() - start))
    return rows


CHECKS = [check_compression]
