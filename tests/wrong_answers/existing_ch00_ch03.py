"""Plausible wrong answers to the exercises of chapters 00-03 (see tests/test_wrong_answers.py): each must score
below full marks."""
import math

import torch
import torch.distributed as dist

from minidist import comm
from minidist.comm.collectives import reduce_scatter_sum
from minidist.comm.ring import ring_exchange
from minidist.memory.accounting import BYTES_PER_PARAM, StateBytes, _check_positive
from minidist.samplers import _check_rank


# Chapter 00.

def zero_state_bytes__stage1_shards_gradients(num_params, world_size=1, stage=0, precision="mixed"):
    """Stage 1 shards the gradients (the seed article's label; ch00 "Common mistakes")."""
    _check_positive(num_params=num_params, world_size=world_size)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    if precision not in BYTES_PER_PARAM:
        raise ValueError(f"precision must be one of {sorted(BYTES_PER_PARAM)}, got {precision!r}")
    w, g, k = BYTES_PER_PARAM[precision]
    n = world_size
    return StateBytes(params=w * num_params / (n if stage >= 3 else 1), grads=g * num_params / (n if stage >= 1 else 1),
                      optimizer=k * num_params / (n if stage >= 2 else 1))


def zero_state_bytes__mixed_counted_as_fp32(num_params, world_size=1, stage=0, precision="mixed"):
    """Every state counted at 4 bytes a value whatever the precision (ch00 "Common mistakes": mixing fp32 and fp16)."""
    _check_positive(num_params=num_params, world_size=world_size)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    if precision not in BYTES_PER_PARAM:
        raise ValueError(f"precision must be one of {sorted(BYTES_PER_PARAM)}, got {precision!r}")
    n = world_size
    return StateBytes(params=4 * num_params / (n if stage >= 3 else 1), grads=4 * num_params / (n if stage >= 2 else 1),
                      optimizer=8 * num_params / (n if stage >= 1 else 1))


def activation_bytes_per_layer__mask_in_value_bytes(seq, batch, hidden, heads, bytes_per_value=2, dropout=True,
                                                    mask_bytes=1):
    """Dropout masks counted at bytes_per_value per element instead of mask_bytes."""
    _check_positive(seq=seq, batch=batch, hidden=hidden, heads=heads)
    sbh, as2b = seq * batch * hidden, heads * seq * seq * batch
    total = bytes_per_value * (16 * sbh + as2b)
    if dropout:
        total += bytes_per_value * (2 * sbh + as2b) + bytes_per_value * as2b
    return total


def activation_bytes_per_layer__no_dropout_output(seq, batch, hidden, heads, bytes_per_value=2, dropout=True,
                                                  mask_bytes=1):
    """Dropout adds its masks but not the dropped-out attention probabilities the next matmul saves."""
    _check_positive(seq=seq, batch=batch, hidden=hidden, heads=heads)
    sbh, as2b = seq * batch * hidden, heads * seq * seq * batch
    total = bytes_per_value * (16 * sbh + as2b)
    if dropout:
        total += mask_bytes * (2 * sbh + as2b)
    return total


# Chapter 01.

def ring_reduce_scatter___swapped_chunks(chunks, group=None):
    """Sends the chunk it should receive into and adds into the one it sends (ch01 "Common mistakes": adding into
    the wrong chunk)."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    for s in range(n - 1):
        send, into = chunks[(rank - s - 2) % n], chunks[(rank - s - 1) % n]
        incoming = torch.empty_like(into)
        ring_exchange(send, incoming, group)
        into += incoming


def ring_reduce_scatter___one_step_short(chunks, group=None):
    """Runs N - 2 steps instead of N - 1: the last partial sum never arrives."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    for s in range(n - 2):
        send, into = chunks[(rank - s - 1) % n], chunks[(rank - s - 2) % n]
        incoming = torch.empty_like(into)
        ring_exchange(send, incoming, group)
        into += incoming


def ring_all_gather___sends_received_chunk_late(chunks, group=None):
    """Forwards the chunk received one step earlier than it arrived: step s sends chunks[(rank - s - 1) % n]."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    for s in range(n - 1):
        ring_exchange(chunks[(rank - s - 1) % n], chunks[(rank - s - 2) % n], group)


def ring_all_gather___own_chunk_every_step(chunks, group=None):
    """Sends its own chunk at every step instead of forwarding what it received."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    for s in range(n - 1):
        ring_exchange(chunks[rank], chunks[(rank - s - 1) % n], group)


def ring_all_reduce__view_drops_the_tail(tensor, group=None):
    """Cuts with view(N, -1) after dropping numel % N elements (ch01 "Common mistakes": chunking that loses
    elements)."""
    n = dist.get_world_size(group)
    out = tensor.detach().clone().reshape(-1)
    keep = out.numel() // n * n
    chunks = list(out[:keep].view(n, -1))
    ring_reduce_scatter_(chunks, group)
    ring_all_gather_(chunks, group)
    return out.view_as(tensor)


def ring_all_reduce__in_place_on_the_input(tensor, group=None):
    """Works on the caller's tensor instead of a copy (ch01 "Common mistakes": mutating the input)."""
    out = tensor.detach().reshape(-1)
    chunks = list(torch.tensor_split(out, dist.get_world_size(group)))
    ring_reduce_scatter_(chunks, group)
    ring_all_gather_(chunks, group)
    return out.view_as(tensor)


def fit_relative__absolute_least_squares(terms, seconds):
    """An ordinary (absolute) least-squares fit, ruled by the largest timings."""
    a = torch.tensor(terms, dtype=torch.float64)
    t = torch.tensor(seconds, dtype=torch.float64).unsqueeze(1)
    c = torch.linalg.lstsq(a, t).solution.squeeze(1)
    return c.clamp(min=0).tolist()


def fit_relative__clamps_instead_of_refitting(terms, seconds):
    """Sets negative coefficients to 0 without refitting the others."""
    a = torch.tensor(terms, dtype=torch.float64) / torch.tensor(seconds, dtype=torch.float64).unsqueeze(1)
    ones = torch.ones(a.shape[0], 1, dtype=torch.float64)
    c = torch.linalg.lstsq(a, ones).solution.squeeze(1)
    return c.clamp(min=0).tolist()


def all_gather_backward__own_slice_only(grad, group=None, dim=0):
    """Keeps this rank's slice of its own gradient, without summing the other ranks' (a split, not a reduce-scatter)."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    return grad.chunk(n, dim=dim)[rank].clone()


def all_gather_backward__all_reduce_then_slice_mean(grad, group=None, dim=0):
    """Averages over the ranks instead of summing (divides the reduce-scatter by N)."""
    return reduce_scatter_sum(grad, group, dim) / dist.get_world_size(group)


# Chapter 02.

def average_gradients___sum_without_dividing(params, group=None):
    """All-reduces without dividing by N (ch02 "Common mistakes": summing instead of averaging)."""
    for p in params:
        if p.grad is not None:
            p.grad.copy_(comm.all_reduce_sum(p.grad, group))


def average_gradients___one_flat_all_reduce(params, group=None):
    """Averages correctly but in one flat all-reduce, not one per parameter as the naive algorithm asks."""
    n = dist.get_world_size(group)
    grads = [p.grad for p in params if p.grad is not None]
    flat = comm.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]), group) / n
    for g, piece in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(piece.view_as(g))


def global_mean_loss__per_rank_mean(loss_sum, count, group=None):
    """Each rank's own mean loss (ch02/ch03 "Common mistakes": averaging per-rank mean losses over unequal batches)."""
    if float(count) == 0:
        raise ValueError("global_mean_loss: no rank holds a sample in this step (the total count is 0)")
    return loss_sum / count


def global_mean_loss__forgets_the_n_of_the_average(loss_sum, count, group=None):
    """Divides by the global count but forgets that DataParallel then divides by N again."""
    total = comm.all_reduce_sum(torch.as_tensor(count).to(loss_sum.device, torch.float64).reshape(()), group)
    if total == 0:
        raise ValueError("global_mean_loss: no rank holds a sample in this step (the total count is 0)")
    return loss_sum / total.to(loss_sum.dtype)


def assign_buckets__forward_order(numels, cap):
    """Walks the parameters in forward order, not in the reverse order backward produces their gradients."""
    if cap is not None and (not isinstance(cap, int) or cap <= 0):
        raise ValueError(f"bucket capacity must be a positive number of elements (or None), got {cap!r}")
    if cap is None:
        return [[(i, 0, numels[i])] for i in range(len(numels)) if numels[i]]
    buckets, current, room = [], [], cap
    for i in range(len(numels)):
        start = 0
        while start < numels[i]:
            take = min(room, numels[i] - start)
            current.append((i, start, start + take))
            start, room = start + take, room - take
            if room == 0:
                buckets.append(current)
                current, room = [], cap
    if current:
        buckets.append(current)
    return buckets


def assign_buckets__whole_parameters_only(numels, cap):
    """Never splits a parameter: a bucket closes when the next parameter does not fit (DDP's rule, not this spec's)."""
    if cap is not None and (not isinstance(cap, int) or cap <= 0):
        raise ValueError(f"bucket capacity must be a positive number of elements (or None), got {cap!r}")
    if cap is None:
        return [[(i, 0, numels[i])] for i in reversed(range(len(numels))) if numels[i]]
    buckets, current, size = [], [], 0
    for i in reversed(range(len(numels))):
        if not numels[i]:
            continue
        if current and size + numels[i] > cap:
            buckets.append(current)
            current, size = [], 0
        current.append((i, 0, numels[i]))
        size += numels[i]
    if current:
        buckets.append(current)
    return buckets


def launch_ready_buckets__arrival_order(pending, next_bucket, launch):
    """Launches every complete bucket, skipping incomplete ones before it (ch02 "Common mistakes": launching buckets
    in arrival order)."""
    for b in range(next_bucket, len(pending)):
        if pending[b] == 0:
            launch(b)
    while next_bucket < len(pending) and pending[next_bucket] == 0:
        next_bucket += 1
    return next_bucket


def launch_ready_buckets__returns_last_launched(pending, next_bucket, launch):
    """Launches in order but returns the index of the last bucket launched, not the first one left."""
    while next_bucket < len(pending) and pending[next_bucket] == 0:
        launch(next_bucket)
        next_bucket += 1
    return max(next_bucket - 1, 0)


def update_scale__keeps_count_on_overflow(scale, good_steps, found_inf, growth_factor=2.0, backoff_factor=0.5,
                                          growth_interval=2000):
    """Backs off on an overflow but keeps counting the good steps from where they were."""
    if found_inf:
        return scale * backoff_factor, good_steps
    good_steps += 1
    if good_steps == growth_interval:
        return scale * growth_factor, 0
    return scale, good_steps


def update_scale__grows_one_step_late(scale, good_steps, found_inf, growth_factor=2.0, backoff_factor=0.5,
                                      growth_interval=2000):
    """Grows only after growth_interval + 1 good steps (compares before counting this one)."""
    if found_inf:
        return scale * backoff_factor, 0
    if good_steps == growth_interval:
        return scale * growth_factor, 0
    return scale, good_steps + 1


def unscale_and_check___ignores_agree(grads, scale, agree=False, group=None):
    """Never agrees with the other ranks: ranks holding different shards then skip different steps."""
    bad = torch.zeros(())
    for g in grads:
        g.mul_(1.0 / scale)
        bad += (~torch.isfinite(g)).any()
    return bool(bad.item() > 0)


def unscale_and_check___checks_only_inf(grads, scale, agree=False, group=None):
    """Looks for infinities only (torch.isinf): a NaN gradient goes through."""
    bad = torch.zeros(())
    for g in grads:
        g.mul_(1.0 / scale)
        bad += torch.isinf(g).any()
    if agree:
        bad = comm.all_reduce_sum(bad, group)
    return bool(bad.item() > 0)


def clip_grad_norm___local_norm_when_sharded(grads, max_norm, sharded=False, group=None):
    """Clips each shard by its own rank's norm (ch05/ch06 "Common mistakes": a norm from one rank's gradients)."""
    squares = sum((g.detach().float().pow(2).sum() for g in grads), torch.zeros(()))
    norm = squares.sqrt()
    factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(factor.to(g.dtype))
    return norm.item()


def clip_grad_norm___uncapped_factor(grads, max_norm, sharded=False, group=None):
    """Scales by max_norm / norm even when the norm is already within the bound (gradients grow)."""
    squares = sum((g.detach().float().pow(2).sum() for g in grads), torch.zeros(()))
    if sharded:
        squares = comm.all_reduce_sum(squares, group)
    norm = squares.sqrt()
    factor = max_norm / (norm + 1e-6)
    for g in grads:
        g.mul_(factor.to(g.dtype))
    return norm.item()


# Chapter 03.

def distributed_indices__blocks_not_strided(n, num_replicas, rank, shuffle=True, seed=0, epoch=0, drop_last=False):
    """Gives each rank a contiguous block of the order instead of every num_replicas-th position."""
    _check_rank(num_replicas, rank)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist() if shuffle \
        else list(range(n))
    if drop_last:
        order = order[:n - n % num_replicas]
    elif order:
        total = math.ceil(n / num_replicas) * num_replicas
        order = (order * math.ceil(total / n))[:total]
    per = len(order) // num_replicas
    return order[rank * per:(rank + 1) * per]


def distributed_indices__seed_per_rank(n, num_replicas, rank, shuffle=True, seed=0, epoch=0, drop_last=False):
    """Seeds the shuffle with the rank too (ch03 "Common mistakes": seeding each rank differently)."""
    _check_rank(num_replicas, rank)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch + rank)).tolist() if shuffle \
        else list(range(n))
    if drop_last:
        order = order[:n - n % num_replicas]
    elif order:
        total = math.ceil(n / num_replicas) * num_replicas
        order = (order * math.ceil(total / n))[:total]
    return order[rank::num_replicas]


def token_budget_batches__counts_tokens_not_padding(lengths, max_tokens):
    """Budgets the sum of the lengths, not batch size x longest (the padding is forgotten)."""
    batches, current, tokens = [], [], 0
    for i, length in enumerate(lengths):
        if current and tokens + length > max_tokens:
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += length
    if current:
        batches.append(current)
    return batches


def token_budget_batches__new_sample_length_only(lengths, max_tokens):
    """Prices a batch with the new sample's length instead of the longest in the batch."""
    batches, current = [], []
    for i, length in enumerate(lengths):
        if current and (len(current) + 1) * length > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def straggler_idle__mean_not_max(work):
    """Measures idling against the mean rank instead of the slowest one."""
    idle = sum(abs(sum(step) / len(step) - w) for step in work if step for w in step)
    total = sum(sum(step) for step in work if step)
    return idle / total if total else 0.0


def straggler_idle__share_of_slowest(work):
    """Divides the idle time by the slowest step's time alone, not by N x that time."""
    idle = sum(max(step) * len(step) - sum(step) for step in work if step)
    total = sum(max(step) for step in work if step)
    return idle / total if total else 0.0
