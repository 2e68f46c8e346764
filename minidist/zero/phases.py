"""The partition and the collective phases of a ZeRO step, as functions on flat buffers (ZeroOptimizer in
optimizer.py runs them; its state dicts in state.py gather with all_gather_parameters too).

    shard_pieces               which elements of tensors laid end to end fall in rank r's chunk of the padded buffer
    reduce_scatter_gradients   phase 1: each rank receives the average of its chunk of every bucket
    all_gather_parameters      phase 3: every rank receives everybody's updated chunks
    used_on_some_rank          which parameters had a gradient on some rank (one int32 flag per tensor, all-reduced)

A ring reduce-scatter plus a ring all-gather send what one ring all-reduce sends: 2(N-1)/N * S bytes per rank.
"""
import torch
import torch.distributed as dist

from .. import comm


def shard_pieces(sizes: list[int], rank: int, world_size: int) -> tuple[int, list[tuple[int, int, int, int]]]:
    """This rank's share of tensors of `sizes` elements laid end to end in one flat buffer, padded with zeros to a
    multiple of `world_size` and cut into `world_size` equal chunks (rank r owns chunk r).

    Returns a tuple (chunk, pieces): chunk = ceil(sum(sizes) / world_size) elements per rank, and pieces a *list* of
    tuples (index, start, stop, offset), in order, one for each tensor that has elements in this rank's chunk: its
    elements [start, stop) (numbered within the flattened tensor) sit at [offset, offset + stop - start) of the chunk.
    Empty tensors and the padding give no piece; a tensor cut by a chunk boundary gives a piece to each rank it
    touches. Graded with ==, so the types matter: by hand (an empty tensor, a rank holding only padding, no tensors at
    all), and for N = 1, 2, 3, 7: the chunk size, and every element in exactly one piece, at its own flat position.
    """
    # <exercise zero_shard_pieces points=2>
    # hint: the chunk of rank r covers flat positions [r * chunk, (r + 1) * chunk); walk the tensors keeping the flat
    #       position where each one starts, and intersect its range with the chunk.
    chunk = -(-sum(sizes) // world_size)
    lo, hi = rank * chunk, (rank + 1) * chunk
    pieces, position = [], 0
    for index, size in enumerate(sizes):
        start, stop = max(lo, position), min(hi, position + size)
        if start < stop:
            pieces.append((index, start - position, stop - position, start - lo))
        position += size
    return chunk, pieces
    # </exercise>


def reduce_scatter_gradients(flat_grads: list[torch.Tensor], group=None) -> list[torch.Tensor]:
    """Phase 1: for each bucket's flat gradient (its length a multiple of N), this rank's chunk of the average over
    the ranks of `group`, as a new tensor of len / N elements in the bucket's dtype.

    Start every reduce-scatter asynchronously, in bucket order (every rank issues the same collectives in the same
    order), then wait for them. Divide by N *before* summing, as DDP does (a 16-bit sum of N gradients could
    overflow where their mean would not). The inputs are left as they were. Communicate through minidist.comm.
    Graded on 3 ranks: an fp32 and a bf16 bucket: the averaged chunks, their dtypes, the inputs untouched; under a
    slow simulated link, that every bucket's collective was started while the ones before it were still running;
    and gradients of 2e38 in fp32 and in bf16 averaged to 2e38 (their sum is past both types' largest value).
    """
    # <exercise zero_reduce_scatter points=2>
    # hint: the collectives of minidist.comm whose name ends in `_` write into a tensor you give them, and take
    #       async_op=True: then they return at once a handle whose wait() gives the result. Issue them all first.
    # hint: where can the division go so that no intermediate value is ever larger than one rank's gradient?
    n = dist.get_world_size(group)
    works = [comm.reduce_scatter_into_(g.new_empty(g.numel() // n), g / n, group, async_op=True) for g in flat_grads]
    return [w.wait() for w in works]
    # </exercise>


def all_gather_parameters(shards: list[torch.Tensor], group=None) -> list[torch.Tensor]:
    """Phase 3: for each bucket, every rank's chunk concatenated in rank order (N * len elements, the shard's dtype).
    Start every all-gather asynchronously, in bucket order, then wait for them (communicate through minidist.comm).
    Graded on 3 ranks: an fp32 and a bf16 bucket, exactly, in the shard's dtype; and, under a slow simulated link,
    that every bucket's all-gather was started while the ones before it were still running."""
    # <exercise zero_all_gather points=1>
    # hint: phase 1 in reverse: the same pattern as reduce_scatter_gradients, with the collective that concatenates
    #       every rank's piece in rank order (each output is N times as long as its shard).
    n = dist.get_world_size(group)
    works = [comm.all_gather_into_(s.new_empty(n * s.numel()), s, group, async_op=True) for s in shards]
    return [w.wait() for w in works]
    # </exercise>


def used_on_some_rank(params: list[torch.Tensor], group=None) -> list[bool]:
    """Which parameters hold a gradient on at least one rank of `group`: a list of bools, the same on every rank.

    A parameter none of whose ranks used it this step must be skipped by the optimizer, as one process skips it
    (Adam would still move it through its momentum); one that only another rank used must be stepped here too, from
    the zero gradient this rank contributed. Agree with one all-reduce of one int32 flag per tensor (a handful of
    bytes, whatever the sizes), on the parameters' device. Graded on 2 ranks: the answer, and the collectives and
    bytes counted.
    """
    # <exercise zero_used_on_some_rank points=1>
    # hint: one small tensor of flags carries the whole question; which reduction turns "some rank" into a number?
    #       (minidist.comm has the collectives.)
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    flags = flags.to(params[0].device) if params else flags
    return (comm.all_reduce_sum(flags, group) > 0).tolist()
    # </exercise>
