"""Gradient compression: send fewer bytes per step, and keep what was not sent for later (error feedback).

Data parallelism all-reduces 4Ψ bytes of fp32 gradients per step: 2(N-1)/N * 4Ψ bytes sent per rank. On a slow
network that is the step. Compression trades accuracy for bandwidth; each method below is a communication hook with
DDP's interface, `hook(state, bucket) -> torch.futures.Future of the averaged bucket`, registered with
`DataParallel.register_comm_hook(state, hook)` or DDP's own `register_comm_hook` (both run it unchanged), the memory
it needs in an explicit state object. `allreduce_hook` is the plain one (what happens without a hook).

    method                      sent per rank per bucket of S elements of e bytes  state
    none (all-reduce)           2(N-1)/N * e S                                     -
    fp16 / bf16                 2(N-1)/N * 2S        (half of fp32)                the process group
    top-k, k = ratio * S        (N-1) * k * (e + 4)  (k values and their int32     residuals (error feedback)
                                indices from every rank, all-gathered)
    PowerSGD, rank r            per bucket, 2(N-1)/N * e * (sum of r(n + m) over   error feedback, the Q's (warm
                                its n x m matrices + the elements of the rest)     start)

16-bit casting halves the bytes and loses precision. fp16's range is narrow (largest value 65504): the cast buffer
is divided by N before the all-reduce, so the sum of N values cannot overflow where their mean would not; an entry
already beyond the range overflows in the cast itself (this order is torch's hook's, kept so the weights agree bit
for bit). Top-k (Stich et al. 2018; Lin et al. 2018, "Deep gradient compression") sends only the k largest entries
of each rank's gradient; it converges only with *error feedback*: what a rank did not send is kept (its residual)
and added to its next gradient, so nothing is lost, only delayed. Sent plus residual is always the sum of the true
gradients. Without it (a tempting sketch) entries that are never among the k largest never move their weight. Its
all-gather grows with N: N k (e + 4) bytes against 2 e S for an all-reduce, so a fixed ratio stops paying as N grows
(at 5% in fp32, beyond N = 20). PowerSGD (Vogels et al. 2019, powersgd.py) approximates each gradient matrix by a
rank-r product P Q^T found by one power iteration per step, warm-started from last step's Q.

Does it pay? Compression costs computation (and top-k / PowerSGD more messages, each paying the latency alpha) and
saves bytes. With chapter 01's alpha-beta model a step's communication takes (messages x alpha + bytes / B) on a link
of bandwidth B, so compression pays below the bandwidth at which the bytes saved take as long to send as the
compression costs: B* = bytes saved / (compression time + extra messages x alpha) (breakeven_bandwidth). On fast
links (NVLink, InfiniBand) B* is often exceeded. PyTorch's PowerSGD hook grew out of pytorch/pytorch issue 47202
(the maintainers' investigation); later reports such as issue 74148 (ResNet-50 on V100s over links as slow as
3 Gbit/s: 8 GPUs trained 5.5x faster than one, 6.3x with PowerSGD's two extra all-reduces removed) show its extra
messages limiting scaling.
"""
import math

import torch

from .. import comm
from .futures import then
from .powersgd import PowerSGDState, powersgd_bytes, powersgd_hook


def allreduce_hook(group, bucket) -> torch.futures.Future[torch.Tensor]:
    """The plain hook, DataParallel's own reduction (and torch's default_hooks.allreduce_hook): divide the bucket by
    N, sum it over `group` (None: the default group) in one asynchronous all-reduce, and return a
    torch.futures.Future whose value is the averaged bucket; the hook returns before the all-reduce completes.

    Graded: it returns a torch.futures.Future; registered on DataParallel on 2 ranks, three SGD steps give weights
    bit-identical to DataParallel without a hook, the replicas agree, and the bytes counted under the ring backend
    equal one fp32 ring all-reduce of every bucket; and, under a slow simulated link, that the hook returned while
    its all-reduce was still running.
    """
    # <exercise allreduce_hook points=1>
    # hint: bucket.buffer() is the flat gradient of this rank; comm.group_size(group) is N (from minidist import comm).
    # hint: comm.all_reduce_(tensor, group, async_op=True) starts a sum in place and returns a Work;
    #       then(works, finish) (from minidist.compression.futures import then) makes the future a hook returns.
    buf = bucket.buffer()
    work = comm.all_reduce_(buf.div_(comm.group_size(group)), group, async_op=True)
    return then([work], lambda summed: summed)
    # </exercise>


def _cast_hook(dtype: torch.dtype, group, bucket) -> torch.futures.Future[torch.Tensor]:
    """Cast the bucket to `dtype`, divide by N (after the cast, as torch's hook), all-reduce asynchronously; when
    the sum arrives, write it back into the bucket (cast back to the bucket's dtype by copy_)."""
    buf = bucket.buffer()
    compressed = buf.to(dtype).div_(comm.group_size(group))  # (S,) in 16 bits: half the bytes on the wire
    return then([comm.all_reduce_(compressed, group, async_op=True)], lambda summed: buf.copy_(summed))


def fp16_compress_hook(state, bucket) -> torch.futures.Future[torch.Tensor]:
    """All-reduce the bucket in fp16 (state: the process group, None for the default one), as torch's
    default_hooks.fp16_compress_hook, bit for bit."""
    return _cast_hook(torch.float16, state, bucket)


def bf16_compress_hook(state, bucket) -> torch.futures.Future[torch.Tensor]:
    """All-reduce the bucket in bf16 (state: the process group): fp32's range, 8 bits of precision."""
    return _cast_hook(torch.bfloat16, state, bucket)


class TopKState:
    """Top-k settings and memory: `ratio` of each bucket's entries sent (k = round(ratio * S), at least 1), and
    each bucket's residual (what this rank has not sent yet) when `error_feedback` is on. The first `start_iter`
    steps average plainly: give 2 on torch's DDP, which rebuilds its buckets in another order after the first step
    (residuals kept in the first layout would be added to other parameters' entries; torch requires the same of its
    PowerSGD). DataParallel's buckets never change once the hook is registered: 0 is safe there."""

    def __init__(self, group=None, ratio: float = 0.01, error_feedback: bool = True, start_iter: int = 0):
        if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
            raise ValueError(f"top-k ratio must be in (0, 1], got {ratio!r}")
        if not (isinstance(start_iter, int) and start_iter >= 0):
            raise ValueError(f"start_iter must be a non-negative integer, got {start_iter!r}")
        self.group, self.ratio, self.error_feedback, self.start_iter = group, ratio, error_feedback, start_iter
        self.residuals: dict[int, torch.Tensor] = {}
        self.iter = 0  # steps done (counted at each step's last bucket)

    def k(self, numel: int) -> int:
        return min(numel, max(1, round(self.ratio * numel)))


def topk_compress(acc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k entries of the flat tensor `acc` largest in magnitude: (values, indices as int32, residual).

    The residual is acc with those k entries set to zero, a new tensor (acc is left unchanged), so that scattering
    the values back at their indices and adding the residual gives acc again, exactly. 1 <= k <= acc.numel().
    Graded: values and indices against a sort (the k largest |entries|; ties in any order), the residual, the
    exact identity sent + residual = acc, k = numel, and acc unchanged.
    """
    # <exercise topk_compress points=2>
    # hint: torch.topk on the magnitudes gives the indices; the values are taken from acc itself (with their sign).
    indices = acc.abs().topk(k, sorted=False).indices
    values = acc[indices]
    residual = acc.clone()
    residual[indices] = 0
    return values, indices.to(torch.int32), residual
    # </exercise>


def topk_hook(state: TopKState, bucket) -> torch.futures.Future[torch.Tensor]:
    """Top-k sparsification with error feedback: each rank sends the k largest entries of (gradient + residual),
    keeps the rest as its new residual; every rank's values and indices are all-gathered and, when they arrive,
    summed into the bucket and averaged (decompress, the future's finish)."""
    buf, index = bucket.buffer(), bucket.index()
    n = comm.group_size(state.group)
    plain = state.iter < state.start_iter  # the first start_iter steps average plainly
    state.iter += bucket.is_last()         # a step is done when its last bucket is
    if plain:
        return allreduce_hook(state.group, bucket)
    acc = buf + state.residuals[index] if index in state.residuals else buf.clone()
    values, indices, residual = topk_compress(acc, state.k(buf.numel()))
    if state.error_feedback:
        state.residuals[index] = residual  # not sent now, added to the next step's gradient
    works = [comm.all_gather_cat(values, state.group, async_op=True),   # (N k) values: rank r's at [r k, (r+1) k)
             comm.all_gather_cat(indices, state.group, async_op=True)]  # (N k) int32 indices

    def decompress(all_values, all_indices):
        buf.zero_()
        for v, i in zip(all_values.chunk(n), all_indices.chunk(n)):  # rank by rank: the same sum on every rank
            buf.index_add_(0, i, v)
        return buf.div_(n)
    return then(works, decompress)


# What each method sends (the formulas the counted bytes are checked against), and when it pays.

def ring_all_reduce_bytes(nbytes: int, n: int):
    return comm.ring_bytes("all_reduce", nbytes, n)


def cast_bytes(numels: list[int], n: int, element_size: int = 2):
    """Mean bytes per rank per step of a 16-bit all-reduce of buckets of `numels` elements."""
    return sum(ring_all_reduce_bytes(element_size * s, n) for s in numels)


def topk_bytes(numels: list[int], n: int, state: TopKState, element_size: int = 4) -> int:
    """Bytes per rank per step of top-k: every rank sends its k values (`element_size` bytes each, the bucket's
    dtype) and their int32 indices to N - 1 ranks: (N - 1) k (element_size + 4) per bucket."""
    return sum((n - 1) * state.k(s) * (element_size + 4) for s in numels)


def breakeven_bandwidth(full_bytes: float, compressed_bytes: float, overhead_s: float, extra_messages: float = 0,
                        alpha: float = 0.0) -> float:
    """The bandwidth (bytes/s) below which compression makes a step faster, under the alpha-beta model.

    Uncompressed, a step sends full_bytes (per rank); compressed, compressed_bytes, at the price of overhead_s
    seconds of compression work and extra_messages more messages (each costing alpha seconds). Compression pays when
    the time the saved bytes take on the link exceeds that price. Returns math.inf when compression saves bytes at
    no price, 0.0 when it saves no bytes (it never pays). Graded: by hand, both edge cases, and the crossover: at the
    returned bandwidth both sides cost the same.
    """
    # <exercise breakeven_bandwidth points=1>
    # hint: write both step times as messages * alpha + bytes / B (+ the overhead for the compressed one) and solve
    #       for the B where they are equal.
    saved, price = full_bytes - compressed_bytes, overhead_s + extra_messages * alpha
    if saved <= 0:
        return 0.0
    return math.inf if price <= 0 else saved / price
    # </exercise>


__all__ = ["allreduce_hook", "fp16_compress_hook", "bf16_compress_hook", "TopKState", "topk_compress", "topk_hook",
           "PowerSGDState", "powersgd_hook", "powersgd_bytes", "cast_bytes", "topk_bytes", "breakeven_bandwidth"]
