"""Plausible wrong answers to the exercises of chapters 04-06 (see tests/test_wrong_answers.py): each must score
below full marks."""
import itertools

import torch
import torch.distributed as dist

from minidist import comm
from minidist.compression.futures import then


# Chapter 04.

def enter_parallel_region__plain_identity(x, group=None, sequence_parallel=False):
    """Returns x as it is, with no backward all-reduce (ch04 "Common mistakes": collectives autograd cannot see)."""
    if sequence_parallel:
        return comm.all_gather(x, group, dim=1)
    return x


def enter_parallel_region__all_reduce(x, group=None, sequence_parallel=False):
    """Uses g (all-reduce forward, identity backward) where f belongs: the forward sums N copies."""
    if sequence_parallel:
        return comm.all_gather(x, group, dim=1)
    return comm.all_reduce(x, group)


def leave_parallel_region__graph_cut(y, group=None, sequence_parallel=False):
    """Sums with a plain, non-differentiable all-reduce: y gets no gradient (ch04 "Common mistakes": collectives that
    autograd cannot see)."""
    if sequence_parallel:
        return comm.reduce_scatter(y, group, dim=1)
    return comm.all_reduce_sum(y.detach(), group).requires_grad_()


def leave_parallel_region__no_length_check(y, group=None, sequence_parallel=False):
    """Cuts the sequence with tensor_split when N does not divide it instead of refusing it."""
    if sequence_parallel:
        n, r = dist.get_world_size(group), dist.get_rank(group)
        return torch.tensor_split(comm.all_reduce(y, group), n, dim=1)[r]
    return comm.all_reduce(y, group)


def shard_output_features__contiguous_qkv(weight, rank, n, chunks=1):
    """Cuts a fused q|k|v into contiguous blocks (ch04 "Common mistakes": rank 0 gets all of q and part of k)."""
    if weight.shape[0] % (chunks * n):
        raise ValueError(f"{weight.shape[0] // chunks} output features are not divisible by tensor-parallel size {n}")
    return weight.chunk(n)[rank].clone()


def shard_output_features__returns_a_view(weight, rank, n, chunks=1):
    """Returns a view of the whole weight (which then stays alive) instead of a copy."""
    if weight.shape[0] % (chunks * n):
        raise ValueError(f"{weight.shape[0] // chunks} output features are not divisible by tensor-parallel size {n}")
    if chunks == 1:
        return weight.chunk(n)[rank]
    return torch.cat([block.chunk(n)[rank] for block in weight.chunk(chunks)])


def vocab_parallel_ce_forward__gathers_logits(local_logits, targets, group=None):
    """All-gathers the (M, V) logits and computes the loss on every rank (ch04 "Common mistakes": gathering the
    logits for the loss; issue 24's 49 KB instead of 576 B)."""
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    full = comm.all_gather_cat(local_logits.t().contiguous(), group).t()       # (M, V)
    lse = full.logsumexp(-1)
    loss = lse - full.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return loss, (local_logits - lse.unsqueeze(-1)).exp()


def vocab_parallel_ce_forward__local_maximum(local_logits, targets, group=None):
    """Subtracts each rank's own maximum before summing the exponentials of all ranks (the sums do not match)."""
    rank = dist.get_rank(group)
    v_local = local_logits.shape[-1]
    start = rank * v_local
    top = local_logits.max(dim=-1).values
    exp = (local_logits - top.unsqueeze(-1)).exp()
    mine = (targets >= start) & (targets < start + v_local)
    target_logit = local_logits.gather(-1, (targets - start).clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    sums = comm.all_reduce_sum(torch.stack([exp.sum(-1), torch.where(mine, target_logit - top, 0.0)]), group)
    return sums[0].log() - sums[1], exp / sums[0].unsqueeze(-1)


def vocab_parallel_ce_forward__no_maximum(local_logits, targets, group=None):
    """Sums exp(logits) without subtracting the maximum: overflows at large logits."""
    rank = dist.get_rank(group)
    v_local = local_logits.shape[-1]
    start = rank * v_local
    exp = local_logits.exp()
    mine = (targets >= start) & (targets < start + v_local)
    target_logit = local_logits.gather(-1, (targets - start).clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    sums = comm.all_reduce_sum(torch.stack([exp.sum(-1), torch.where(mine, target_logit, 0.0)]), group)
    return sums[0].log() - sums[1], exp / sums[0].unsqueeze(-1)


# Chapter 05.

def shard_pieces__offset_from_buffer_start(sizes, rank, world_size):
    """Gives each piece's offset in the flat buffer instead of in this rank's chunk."""
    chunk = -(-sum(sizes) // world_size)
    lo, hi = rank * chunk, (rank + 1) * chunk
    pieces, position = [], 0
    for index, size in enumerate(sizes):
        start, stop = max(lo, position), min(hi, position + size)
        if start < stop:
            pieces.append((index, start - position, stop - position, start))
        position += size
    return chunk, pieces


def shard_pieces__floor_chunk(sizes, rank, world_size):
    """Chunks of sum // N elements (no padding): the tail of the buffer belongs to nobody."""
    chunk = sum(sizes) // world_size
    lo, hi = rank * chunk, (rank + 1) * chunk
    pieces, position = [], 0
    for index, size in enumerate(sizes):
        start, stop = max(lo, position), min(hi, position + size)
        if start < stop:
            pieces.append((index, start - position, stop - position, start - lo))
        position += size
    return chunk, pieces


def reduce_scatter_gradients__sum_then_divide_blocking(flat_grads, group=None):
    """Blocking reduce-scatters that sum first and divide after (issue 24: 2/2 against the old grader)."""
    n = dist.get_world_size(group)
    return [comm.reduce_scatter_into_(g.new_empty(g.numel() // n), g, group) / n for g in flat_grads]


def reduce_scatter_gradients__wait_each_in_turn(flat_grads, group=None):
    """Divides first, but waits for each reduce-scatter before starting the next one (no overlap)."""
    n = dist.get_world_size(group)
    return [comm.reduce_scatter_into_(g.new_empty(g.numel() // n), g / n, group, async_op=True).wait()
            for g in flat_grads]


def reduce_scatter_gradients__async_sum_then_divide(flat_grads, group=None):
    """Starts every reduce-scatter asynchronously but divides the 16-bit sums afterwards (they can overflow)."""
    n = dist.get_world_size(group)
    works = [comm.reduce_scatter_into_(g.new_empty(g.numel() // n), g, group, async_op=True) for g in flat_grads]
    return [w.wait() / n for w in works]


def all_gather_parameters__blocking(shards, group=None):
    """All-gathers one bucket at a time, each blocking."""
    n = dist.get_world_size(group)
    return [comm.all_gather_into_(s.new_empty(n * s.numel()), s, group) for s in shards]


def all_gather_parameters__fp32_buffers(shards, group=None):
    """Gathers every bucket into an fp32 buffer, whatever the shard's dtype."""
    n = dist.get_world_size(group)
    works = [comm.all_gather_into_(torch.empty(n * s.numel()), s.float(), group, async_op=True) for s in shards]
    return [w.wait() for w in works]


# Chapter 06.

def unshard___forgets_the_storage(full, shard, group=None):
    """Gathers into a new tensor and points `full` at it: views taken before the free never see the values."""
    out = shard.new_empty(full.numel())
    work = comm.all_gather_into_(out, shard, group, async_op=True)
    full.set_(out)
    return work


def unshard___blocking(full, shard, group=None):
    """Gives the storage back but gathers synchronously, returning an already finished Work."""
    full.untyped_storage().resize_(full.numel() * full.element_size())
    comm.all_gather_into_(full, shard, group)
    return comm.Work(full)


def reshard___drops_the_reference(full):
    """Frees by dropping the reference (ch06 "Common mistakes": autograd keeps the tensor alive, nothing is freed)."""
    del full


def reshard___resizes_the_tensor(full):
    """Resizes `full` itself to zero elements: its shape is lost and the views still hold the memory."""
    full.resize_(0)


def reduce_scatter_grads__sum_not_mean(grads, numels, chunk, dtype, group=None, device=None):
    """Reduce-scatters the sum without dividing by N."""
    n = dist.get_world_size(group)
    flat = torch.zeros(n * chunk, dtype=dtype, device=device)
    for g, start in zip(grads, itertools.accumulate([0, *numels])):
        if g is not None:
            flat[start:start + g.numel()] = g.reshape(-1)
    return comm.reduce_scatter_into_(flat.new_empty(chunk), flat, group, async_op=True)


def reduce_scatter_grads__divides_after_the_sum(grads, numels, chunk, dtype, group=None, device=None):
    """Reduce-scatters the sum and divides the result: the sum can overflow where the mean would not."""
    n = dist.get_world_size(group)
    flat = torch.zeros(n * chunk, dtype=dtype, device=device)
    for g, start in zip(grads, itertools.accumulate([0, *numels])):
        if g is not None:
            flat[start:start + g.numel()] = g.reshape(-1)
    return then([comm.reduce_scatter_into_(flat.new_empty(chunk), flat, group, async_op=True)], lambda out: out / n)


def reduce_scatter_grads__skips_none_positions(grads, numels, chunk, dtype, group=None, device=None):
    """Packs only the gradients that exist, so a None gradient shifts every later one to the wrong place."""
    n = dist.get_world_size(group)
    flat = torch.zeros(n * chunk, dtype=dtype, device=device)
    present = [g.reshape(-1) for g in grads if g is not None]
    if present:
        packed = torch.cat(present)
        flat[:packed.numel()] = packed
    return comm.reduce_scatter_into_(flat.new_empty(chunk), flat.div_(n), group, async_op=True)


def prefetch_target__wraps_around(order, current):
    """Prefetches the first unit after the last one (modulo the length)."""
    if current not in order:
        return None
    return order[(order.index(current) + 1) % len(order)]


def prefetch_target__previous_unit(order, current):
    """Returns the unit before `current` (the one just run) instead of the next."""
    if current not in order or order.index(current) == 0:
        return None
    return order[order.index(current) - 1]
