"""Differentiable collectives, and the byte ledger that records every collective minidist issues.

Parallel layers move activations between ranks inside the forward pass, so the collectives must have gradients. Each
collective's backward is its *dual*:

    forward            backward             used by
    identity           all-reduce (sum)     column-parallel input: every rank's partial gradient of x must be summed
    all-reduce (sum)   identity             row-parallel output
    all-gather         reduce-scatter       sequence parallel, ZeRO-3 / FSDP parameters
    reduce-scatter     all-gather           sequence parallel
    split              all-gather (concat)  entering a parallel region by slicing a replicated tensor
    gather (concat)    split                leaving it when the loss that follows is replicated

Why two backwards for "all-reduce": it depends on whether the loss is *replicated* (every rank computes the same loss
from the same values: the gradient arriving at the all-reduce output is already the full gradient on every rank, so the
backward is the identity) or *per rank* (each rank has its own loss, the true loss is their sum: the backward must sum
gradients, an all-reduce). Megatron-LM's f/g operators are the first case. The same fork separates all_gather
(backward reduce-scatter: each rank's loss used all of the gathered tensor) from gather (backward split: the loss after
it is replicated, so summing would count it N times). Every docstring below states which case it assumes.

None of them modifies its input; each takes its process group explicitly (None means the default group).

The ledger: `with ByteLedger() as ledger:` records every collective issued through minidist on this rank: op, group
size, dtype, element count, and the bytes this rank *sends*. For collectives minidist implements itself from
send/recv (`collectives.py`), that is the count of bytes it actually sent. For collectives handed to the backend
(gloo, NCCL) the algorithm inside is the backend's, so the ledger records what the bandwidth-optimal ring sends,
with S the bytes of the full (unsharded) tensor and N the group size:

    all_reduce       2 (N-1)/N * S      (reduce-scatter, then all-gather)
    all_gather       (N-1)/N * S        reduce_scatter   (N-1)/N * S
    broadcast        (N-1)/N * S        (a pipelined chain: all but the last rank forward S; this is the mean)
    send             S
When N does not divide S these are fractions (the mean over ranks of what each sends), so the ledger keeps them as
exact `Fraction`s: sums over many collectives then equal their formula exactly. Use float() to print them.
"""
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.distributed as dist

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

RING_FACTOR = {  # bytes sent per rank, as a multiple of (N-1)/N * S
    "all_reduce": 2, "all_gather": 1, "reduce_scatter": 1, "broadcast": 1,
}


@dataclass(frozen=True)
class CommRecord:
    op: str
    group_size: int
    dtype: torch.dtype
    numel: int          # elements of the full tensor (S / element size)
    bytes_sent: Fraction  # by this rank (an int for bytes really sent, a Fraction for the ring model)


class ByteLedger:
    """Context manager collecting a CommRecord for every collective this rank issues through minidist."""

    _active: list["ByteLedger"] = []  # ledgers currently open (nested ledgers all see every record)

    def __init__(self):
        self.records: list[CommRecord] = []

    def __enter__(self):
        ByteLedger._active.append(self)
        return self

    def __exit__(self, *exc):
        ByteLedger._active.remove(self)

    def total_bytes(self, op: str | None = None) -> Fraction:
        return sum((r.bytes_sent for r in self.records if op is None or r.op == op), Fraction(0))

    def count(self, op: str | None = None) -> int:
        return sum(1 for r in self.records if op is None or r.op == op)

    def by_op(self) -> dict[str, tuple[int, Fraction]]:
        """op -> (number of calls, bytes sent)."""
        return {op: (self.count(op), self.total_bytes(op)) for op in dict.fromkeys(r.op for r in self.records)}

    def table(self) -> str:
        lines = [f"{'op':<16}{'calls':>7}{'bytes sent':>16}"]
        lines += [f"{op:<16}{n:>7}{float(b):>16,.0f}" for op, (n, b) in self.by_op().items()]
        return "\n".join(lines)


def ring_bytes(op: str, nbytes: int, group_size: int) -> Fraction:
    """Bytes one rank sends for `op` on a full tensor of `nbytes` under the ring algorithm (see the module table)."""
    if op == "send":
        return Fraction(nbytes)
    return Fraction(RING_FACTOR[op] * (group_size - 1) * nbytes, group_size)


def record(op: str, tensor: torch.Tensor, group_size: int, bytes_sent: int | None = None) -> None:
    """Add a record to every open ledger; `bytes_sent` defaults to the ring model for the full `tensor`."""
    if not ByteLedger._active:
        return
    if bytes_sent is None:
        bytes_sent = ring_bytes(op, tensor.numel() * tensor.element_size(), group_size)
    rec = CommRecord(op, group_size, tensor.dtype, tensor.numel(), bytes_sent)
    for ledger in ByteLedger._active:
        ledger.records.append(rec)


# Plain (non-differentiable) collectives that record themselves. They never modify their input.

def group_size(group=None) -> int:
    return dist.get_world_size(group)


def global_rank(group_rank: int, group=None) -> int:
    """The global rank of `group`'s rank `group_rank` (point-to-point ops and `src` arguments take global ranks)."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def all_reduce_sum(x: torch.Tensor, group=None, async_op: bool = False):
    """Sum of x over the group, in a new tensor (with async_op, returns (tensor, work) to wait on)."""
    out = x.detach().clone()
    record("all_reduce", out, group_size(group))
    work = dist.all_reduce(out, group=group, async_op=async_op)
    return (out, work) if async_op else out


def all_gather_cat(x: torch.Tensor, group=None, dim: int = 0) -> torch.Tensor:
    """Every rank's x concatenated along `dim` in rank order (all shards must have the same shape)."""
    n = group_size(group)
    x = x.detach().movedim(dim, 0).contiguous()
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))
    record("all_gather", out, n)
    _all_gather_single(out, x, group=group)
    return out.movedim(0, dim)


def reduce_scatter_sum(x: torch.Tensor, group=None, dim: int = 0) -> torch.Tensor:
    """This rank's chunk (along `dim`) of the sum of x over the group; x.shape[dim] must divide by the group size.

    (collectives.ring_reduce_scatter instead cuts the *flattened* tensor, into chunks that may differ by one.)
    """
    n = group_size(group)
    _check_divisible(x, n, dim)
    x = x.detach().movedim(dim, 0).contiguous()
    out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
    record("reduce_scatter", x, n)
    _reduce_scatter_single(out, x, group=group)
    return out.movedim(0, dim)


def broadcast(x: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    """A copy of the group-rank-`src` tensor on every rank (x gives the shape and dtype elsewhere)."""
    out = x.detach().clone()
    record("broadcast", out, group_size(group))
    dist.broadcast(out, src=global_rank(src, group), group=group)
    return out


def my_chunk(x: torch.Tensor, group=None, dim: int = 0) -> torch.Tensor:
    """This rank's equal slice of x along `dim` (no communication)."""
    n = group_size(group)
    _check_divisible(x, n, dim)
    return x.chunk(n, dim)[dist.get_rank(group)].contiguous()


def _check_divisible(x: torch.Tensor, n: int, dim: int) -> None:
    if x.shape[dim] % n:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the group size {n}")


# The differentiable collectives: each forward/backward pair is a pair of duals from the table above.

def _dual_pair(name: str, forward, backward) -> type:
    """An autograd Function whose forward is forward(x, group, dim) and whose backward is backward(grad, group, dim)."""
    def fwd(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return forward(x, group, dim)

    def bwd(ctx, grad):
        return backward(grad, ctx.group, ctx.dim), None, None
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


DifferentiableIdentity = _dual_pair("DifferentiableIdentity", lambda x, group, dim: x.view_as(x),
                                    lambda grad, group, dim: all_reduce_sum(grad, group))
DifferentiableAllReduceSum = _dual_pair("DifferentiableAllReduceSum", lambda x, group, dim: all_reduce_sum(x, group),
                                        lambda grad, group, dim: grad)
DifferentiableAllGather = _dual_pair("DifferentiableAllGather", all_gather_cat, reduce_scatter_sum)
DifferentiableReduceScatterSum = _dual_pair("DifferentiableReduceScatterSum", reduce_scatter_sum, all_gather_cat)
DifferentiableSplit = _dual_pair("DifferentiableSplit", my_chunk, all_gather_cat)
DifferentiableGather = _dual_pair("DifferentiableGather", all_gather_cat, my_chunk)


def identity(x, group=None):
    """Forward: x unchanged. Backward: the gradient summed over the group.

    Assumes each rank's gradient is a *partial* gradient of x (x was replicated and each rank used it for its own part
    of the computation, as in a column-parallel layer's input), so the true gradient is the sum. Megatron's `f`.
    """
    return DifferentiableIdentity.apply(x, group, 0)


def all_reduce(x, group=None):
    """Forward: the sum of x over the group. Backward: the gradient unchanged (identity).

    Assumes the loss after this point is replicated: every rank computes it from the same summed values, so the
    gradient arriving here is already the full gradient on every rank. Megatron's `g` (row-parallel output).
    If instead each rank has its own loss, the backward needs an all-reduce: compose with `identity`.
    """
    return DifferentiableAllReduceSum.apply(x, group, 0)


def all_gather(x, group=None, dim: int = 0):
    """Forward: every rank's x concatenated along `dim`. Backward: reduce-scatter (sum) of the gradient.

    Assumes each rank has its own loss on the gathered tensor (as when ZeRO-3 gathers parameters that every rank uses
    on its own data): my shard's gradient is the sum over ranks of their gradient for my slice.
    """
    return DifferentiableAllGather.apply(x, group, dim)


def reduce_scatter(x, group=None, dim: int = 0):
    """Forward: this rank's chunk along `dim` of the sum over the group. Backward: all-gather of the gradient.

    Assumes each rank's loss uses only its own chunk (sequence parallel after a row-parallel layer): the gradient of
    every rank's input is the concatenation of all chunks' gradients.
    """
    return DifferentiableReduceScatterSum.apply(x, group, dim)


def split(x, group=None, dim: int = 0):
    """Forward: this rank's slice of x along `dim` (no communication). Backward: all-gather of the gradient slices.

    Assumes x is replicated and each rank uses only its slice: the full gradient is the concatenation of the slices'
    gradients.
    """
    return DifferentiableSplit.apply(x, group, dim)


def gather(x, group=None, dim: int = 0):
    """Forward: every rank's x concatenated along `dim`. Backward: this rank's slice of the gradient.

    Assumes the loss after it is replicated (every rank computes the same loss from the same gathered tensor), so the
    gradient arriving here is identical on every rank and my shard's gradient is simply my slice of it.
    """
    return DifferentiableGather.apply(x, group, dim)
