"""Two collectives lowered for gloo: reduce-scatter as an all_to_all plus adds, all-gather as N broadcasts.

On gloo, torch's reduce_scatter_tensor and all_gather_into_tensor cost more than the all-reduce they are half of
(100 MB fp32 on 2 ranks of a 2-core machine: 111 and 95 ms against all_reduce's 65 ms), while an all_to_all plus a
local sum and N broadcasts do the same job in 49 and 31 ms, each rank sending the same (N-1)/N * S bytes as a ring.
collectives.reduce_scatter_into_ and all_gather_into_ use these on gloo (host tensors of one floating dtype); NCCL
keeps its own kernels, and the ledger's bytes are the same. As on NCCL, an asynchronous collective's input must stay
unchanged until it completes.
"""
import torch
import torch.distributed as dist

from .p2p import global_rank, group_size


def direct_on_gloo(out: torch.Tensor, x: torch.Tensor, group, adds: bool = False) -> bool:
    """Whether a collective from x into out runs lowered: host tensors of one floating dtype on a gloo group of 2 or
    more ranks (a contiguous out, cut into slots). adds: the collective sums (a reduce-scatter), so a 16-bit one runs
    lowered on 2 ranks only (see reduce_scatter_by_all_to_all)."""
    n = group_size(group)
    return (out.device.type == x.device.type == "cpu" and out.is_floating_point() and out.dtype == x.dtype
            and out.is_contiguous() and n > 1 and "gloo" in str(dist.get_backend(group)).lower()
            and not (adds and n > 2 and out.element_size() < 4))


class _Lowered:
    """One collective made of torch works: complete (wait, is_completed, get_future) once they all are and `then`, the
    host's share (the adds of a reduce-scatter), has run on the thread that completed them."""

    def __init__(self, works: list, then=None):
        done = torch.futures.collect_all([work.get_future() for work in works])
        self.future = done if then is None else done.then(lambda fut: (fut.value(), then()))  # value(): raises

    def wait(self) -> bool:
        self.future.wait()  # raises what failed
        return True

    def is_completed(self) -> bool:
        return self.future.done()

    def get_future(self):
        return self.future


def _done(lowered: _Lowered, async_op: bool):
    if async_op:
        return lowered
    lowered.wait()
    return None


def reduce_scatter_by_all_to_all(out, x, group, async_op):
    """Every rank sends chunk r of x to rank r (one all_to_all); rank r adds the N chunks it received in rank order,
    each addition rounded to x's dtype as gloo's own reductions are. At 2 ranks that is a + b, the bits of gloo's
    all-reduce; beyond, the order of the additions differs from gloo's, and so may the last bits of fp32 (within every
    tolerance stated) and an ulp of bf16 (where an all-reduce of the same gradients rounds otherwise): 16-bit
    reduce-scatters on more than 2 ranks keep gloo's own."""
    received = torch.empty_like(x, memory_format=torch.contiguous_format)
    work = dist.all_to_all_single(received, x.contiguous(), group=group, async_op=True)

    def add_in_rank_order():
        first, *others = received.view(group_size(group), *out.shape)
        out.copy_(first)
        for chunk in others:
            out.add_(chunk)
    return _done(_Lowered([work], then=add_in_rank_order), async_op)


def all_gather_by_broadcasts(out, shard, group, async_op):
    """Rank r's shard into its own slot of out, then N broadcasts, slot i from rank i."""
    n, rank = group_size(group), dist.get_rank(group)
    slots = out.chunk(n)
    slots[rank].copy_(shard)
    works = [dist.broadcast(slots[i], src=global_rank(i, group), group=group, async_op=True) for i in range(n)]
    return _done(_Lowered(works), async_op)
