"""Tour checks for chapter 10 (gradient compression).

Each hook trains DataParallel under minidist's ring backend, so the bytes of a step are counted, and they must equal
the method's formula exactly. fp16, bf16 and PowerSGD (rank 2, Gram-Schmidt, and rank 3, QR) are trained next to
torch's own hook registered on the same buckets (several, each holding whole parameters; torch's hooks run on
DataParallel unchanged: DDP's interface), and must give the same weights; minidist's hooks run on torch's DDP too.
Top-k has no torch reference; its error feedback is checked by its invariant, on gradients that are whole numbers so
every sum is exact. The tests and the notebook call these same rank functions.
"""
import time

import torch
import torch.distributed as dist

from .. import comm
from ..compression import (PowerSGDState, TopKState, allreduce_hook, bf16_compress_hook, cast_bytes,
                           fp16_compress_hook, powersgd_bytes, powersgd_hook, topk_bytes, topk_hook)
from ..data_parallel import DataParallel
from ..launch import launch
from ..models import GPT, lm_loss
from ..testing import on_device, replica_divergence, to_device
from .data_parallel import BATCHES, CFG
from .rows import covers, make_row

RANK, START = 2, 2  # PowerSGD: rank-2 approximations from the third step on (two plain steps first, as torch needs)
TOPK_RATIO = 0.05
CAP = 0.02  # MiB: the tiny GPT in several buckets of whole parameters (4 in fp32)


def make_hook(method: str, group=None, ratio: float = TOPK_RATIO, rank: int = RANK, start: int = START,
              error_feedback: bool = True, topk_start: int = 0):
    """(state, hook) of minidist's `method`: "fp16", "bf16", "topk", "powersgd" (PowerSGD compresses from step
    `start`, top-k from step `topk_start`)."""
    if method == "topk":
        return TopKState(group, ratio, error_feedback, topk_start), topk_hook
    if method == "powersgd":
        return PowerSGDState(group, rank, start, use_error_feedback=error_feedback, warm_start=error_feedback), \
            powersgd_hook
    return group, {"fp16": fp16_compress_hook, "bf16": bf16_compress_hook}[method]


def torch_hook(method: str, rank: int = RANK):
    """torch's own hook for `method`, with the same settings. Its PowerSGD is waited on bucket by bucket: its
    callbacks block inside gloo's threads on the next all-reduce, which stalls when several buckets are in flight
    (waiting changes when each bucket is reduced, not what)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    if method == "powersgd":
        def one_at_a_time(state, bucket):
            future = powerSGD_hook.powerSGD_hook(state, bucket)
            future.wait()
            return future
        return powerSGD_hook.PowerSGDState(None, rank, START), one_at_a_time
    return None, {"fp16": default_hooks.fp16_compress_hook, "bf16": default_hooks.bf16_compress_hook}[method]


def formula(method: str, dp: DataParallel, state, n: int):
    """Mean bytes per rank of one (compressed) step, from the buckets' sizes, dtypes and parameters' shapes."""
    numels = [b.stop - b.start for b in dp.buckets]
    size = dp.buckets[0].dtype.itemsize  # one dtype in these models
    if method in ("fp16", "bf16"):
        return cast_bytes(numels, n)
    if method == "topk":
        return topk_bytes(numels, n, state, size)
    if method == "none":
        return cast_bytes(numels, n, size)
    shapes = [[dp.reducer.params[i].shape for i in b.params] for b in dp.buckets]
    return powersgd_bytes(shapes, n, state, size)


@on_device
def counted_training(method: str, steps: int = len(BATCHES), dtype: torch.dtype = torch.float32,
                     rank: int = RANK, hook=None) -> dict:
    """DataParallel (buckets of CAP MiB) with minidist's `method` hook (or `hook`, registered with the process
    group as its state; method "none": no hook) under the ring backend, SGD, on the tiny GPT in `dtype`: the bytes
    this rank sent in the last step (counted), their formula, the buckets, the replica divergence, the weights."""
    r, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    dp = DataParallel(GPT(CFG).to(dtype), bucket_cap_mb=CAP)
    state, hook = (None, hook) if hook else make_hook(method, rank=rank) if method != "none" else (None, None)
    if hook:
        dp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(dp.parameters(), lr=0.1)
    with comm.ring_backend():
        for x, y in map(to_device, BATCHES[:steps]):
            with comm.ByteLedger() as ledger:
                lm_loss(dp(x.chunk(n)[r]).float(), y.chunk(n)[r]).backward()
            opt.step()
            opt.zero_grad()
    return {"bytes": ledger.total_bytes(), "counted": ledger.counted, "formula": formula(method, dp, state, n),
            "buckets": len(dp.buckets), "divergence": replica_divergence(dp), "collectives": ledger.count(),
            "weights": [p.detach().clone() for p in dp.parameters()]}


def _max_diff(a: list, b: list) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


class _Probe:
    """A one-element bucket, to see what type of future a hook returns."""

    def __init__(self):
        self.buf = torch.ones(1)

    def buffer(self):
        return self.buf


@on_device
def hook_against_plain(hook=allreduce_hook) -> dict:
    """A hook registered with the process group as its state (allreduce_hook: what happens without one) against no
    hook at all: the largest weight difference after every batch, and the counted bytes with their formula."""
    hooked, plain = counted_training("none", hook=hook), counted_training("none")
    return hooked | {"diff": _max_diff(hooked["weights"], plain["weights"]), "weights": None,
                     "torch_future": isinstance(hook(None, _Probe()), torch.futures.Future)}


@on_device
def against_torch(method: str, steps: int = len(BATCHES), rank: int = RANK) -> float:
    """Largest weight difference between minidist's hook and torch's (same settings), each registered on a
    DataParallel with the same buckets (CAP MiB, whole parameters)."""
    r, n = dist.get_rank(), dist.get_world_size()
    models = []
    for hooks in (make_hook(method, rank=rank), torch_hook(method, rank)):
        torch.manual_seed(0)
        models.append(DataParallel(GPT(CFG), bucket_cap_mb=CAP))
        models[-1].register_comm_hook(*hooks)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    for x, y in map(to_device, BATCHES[:steps]):
        for model, opt in zip(models, opts):
            lm_loss(model(x.chunk(n)[r]), y.chunk(n)[r]).backward()
            opt.step()
            opt.zero_grad()
    return _max_diff(list(models[0].parameters()), list(models[1].parameters()))


def every_hook(methods: list[str]) -> dict:
    """For each method, in one launch: counted_training's result, and against_torch's difference (0.0 for top-k,
    which torch does not have). "powersgd3" is PowerSGD at rank 3 (QR); "topk-bf16" top-k on a bf16 model."""
    out = {}
    for m in methods:
        method, rank = ("powersgd", 3) if m == "powersgd3" else (m.split("-")[0], RANK)
        dtype = torch.bfloat16 if m.endswith("bf16") and method == "topk" else torch.float32
        counted = counted_training(method, rank=rank, dtype=dtype) | {"weights": None}
        out[m] = (counted, against_torch(method, rank=rank) if method != "topk" else None)
    return out


@on_device
def on_ddp(methods: list[str], steps: int = 3) -> dict:
    """minidist's hooks registered on torch's DistributedDataParallel, against torch's hook with the same settings
    on DDP (top-k, which torch does not have: against minidist's top-k on DataParallel, one bucket, and both averaging
    plainly in the first START steps, as DDP's bucket order changes after the first): the largest weight difference
    per method. (DDP refuses any hook named bf16_compress_hook without CUDA and NCCL.)"""
    from torch.nn.parallel import DistributedDataParallel as DDP
    r, n = dist.get_rank(), dist.get_world_size()
    out = {}
    for method in methods:
        runs = []
        for kind in ("minidist", "reference"):
            torch.manual_seed(0)
            hooks = make_hook(method, topk_start=START) if kind == "minidist" or method == "topk" else \
                torch_hook(method)
            model = DataParallel(GPT(CFG), bucket_cap_mb=25) if kind == "reference" and method == "topk" else \
                DDP(GPT(CFG))
            model.register_comm_hook(*hooks)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for x, y in map(to_device, BATCHES[:steps]):
                lm_loss(model(x.chunk(n)[r]), y.chunk(n)[r]).backward()
                opt.step()
                opt.zero_grad()
            runs.append([p.detach().clone() for p in model.parameters()])
        out[method] = _max_diff(*runs)
    return out


class WholeBucket:
    """A stand-in GradBucket over a flat tensor, to drive a hook directly: its gradients are views of the given
    shapes (one flat gradient by default)."""

    def __init__(self, buf, index=0, shapes=None):
        self.buf, self.i, self.shapes = buf, index, shapes or [buf.shape]

    def buffer(self):
        return self.buf

    def index(self):
        return self.i

    def is_last(self):
        return True

    def gradients(self):
        sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        return [piece.view(s) for piece, s in zip(self.buf.split(sizes), self.shapes)]

    def parameters(self):
        return []


@on_device
def powersgd_after_a_zero_gradient(steps: int = 4, zero_step: int = 2) -> dict:
    """PowerSGD (rank 1, two plain steps) driven on a bucket of two 8 x 6 gradients, the second all zero on every
    rank at `zero_step` (an unused parameter), by minidist's hook and by torch's: whether each stayed finite, and
    the size of minidist's result for that matrix at the step after (0 if its power iteration never resumed)."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as T
    g = torch.Generator().manual_seed(dist.get_rank())
    grads = [torch.randn(96, generator=g) for _ in range(steps)]
    grads[zero_step][48:] = 0
    out = {}
    for name, state, hook in (("minidist", PowerSGDState(None, 1, 2), powersgd_hook),
                              ("torch", T.PowerSGDState(None, 1, 2), T.powerSGD_hook)):
        results = [hook(state, WholeBucket(grad.clone(), shapes=[(8, 6), (8, 6)])).wait() for grad in grads]
        results = [r[0] if isinstance(r, list) else r for r in results]
        out[name] = {"finite": all(bool(r.isfinite().all()) for r in results),
                     "after": results[zero_step + 1][48:].abs().sum().item()}
    return out


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


def _mean(per_rank: list[dict]):
    return sum(r["bytes"] for r in per_rank) / len(per_rank) if all(r["counted"] for r in per_rank) else None


TORCH_NAMES = {"fp16": "fp16_compress_hook", "bf16": "bf16_compress_hook", "powersgd": "powerSGD_hook",
               "powersgd3": "powerSGD_hook"}
NAMES = {"fp16": "fp16 compression hook", "bf16": "bf16 compression hook",
         "powersgd": f"PowerSGD hook, rank {RANK} (Gram-Schmidt)", "powersgd3": "PowerSGD hook, rank 3 (QR)",
         "topk": f"top-k hook, {TOPK_RATIO:.0%} + error feedback"}


@covers("compression hook", "PowerSGD", "top-k", "DDP")
def check_compression(world_size: int) -> list[dict]:
    n, rows, start = world_size, [], time.perf_counter()
    methods = ["fp16", "bf16", "powersgd", "powersgd3", "topk"]
    per_rank = launch(every_hook, n, methods)
    seconds = (time.perf_counter() - start) / len(methods)
    for m in methods:
        counted = [r[m][0] for r in per_rank]
        diff, reference = None, "(N-1) k (4 B value + 4 B index)"
        if m != "topk":
            diff = max(r[m][1] for r in per_rank)
            reference = f"torch's {TORCH_NAMES[m]}, {counted[0]['buckets']} buckets"
        rows.append(make_row(NAMES[m], reference, max_abs_diff=diff, tolerance=None if diff is None else 0.0,
                             replica_divergence=max(c["divergence"] for c in counted), comm_bytes=_mean(counted),
                             comm_bytes_theory=counted[0]["formula"], seconds=seconds))
    start = time.perf_counter()
    ddp = launch(on_ddp, n, ["fp16", "powersgd", "topk"])
    seconds = time.perf_counter() - start
    rows.append(make_row("minidist's hooks on torch DDP (fp16, PowerSGD)", "torch's hooks on DDP",
                         max_abs_diff=max(r[m] for r in ddp for m in ("fp16", "powersgd")), tolerance=0.0,
                         seconds=seconds))
    # top-k against minidist's top-k on DataParallel: one bucket each, but DDP orders the parameters in it otherwise,
    # so in the plain-averaging warm-up steps gloo's ring sums each element in another order on 3+ ranks (on 2,
    # a + b = b + a: the test asserts 0). SGD's tolerance; a selection flipping at the k-th magnitude would exceed it
    rows.append(make_row("minidist's top-k hook on torch DDP", "top-k on DataParallel (SGD)",
                         max_abs_diff=max(r["topk"] for r in ddp), tolerance=1e-6, seconds=seconds))
    start = time.perf_counter()
    inv = launch(topk_invariant, n)
    rows.append(make_row("top-k: N x sent + residuals = sum of gradients", "exact (whole numbers)",
                         max_abs_diff=max(i["error"] for i in inv), tolerance=0.0,
                         seconds=time.perf_counter() - start))
    return rows


CHECKS = [check_compression]
