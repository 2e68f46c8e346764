"""Plausible wrong answers to the exercises of chapters 10-12 (see tests/test_wrong_answers.py): each must score
below full marks."""
import math
import os
import shutil
import statistics

import torch

from minidist import comm
from minidist.compression.futures import then
from minidist.compression.powersgd import orthogonalize_, split_flat


# Chapter 10.

def allreduce_hook__sum_not_mean(group, bucket):
    """All-reduces without dividing by N (ch10 "Common mistakes": averaging not at all)."""
    work = comm.all_reduce_(bucket.buffer(), group, async_op=True)
    return then([work], lambda summed: summed)


def allreduce_hook__waits_inside_the_hook(group, bucket):
    """Averages right but waits for the all-reduce before returning: the hook's communication never overlaps."""
    buf = bucket.buffer()
    comm.all_reduce_(buf.div_(comm.group_size(group)), group)
    future = torch.futures.Future()
    future.set_result(buf)
    return future


def topk_compress__values_by_magnitude(acc, k):
    """Sends the magnitudes of the k largest entries, losing their signs."""
    top = acc.abs().topk(k, sorted=False)
    residual = acc.clone()
    residual[top.indices] = 0
    return top.values, top.indices.to(torch.int32), residual


def topk_compress__drops_the_residual(acc, k):
    """Sends the k largest entries and drops the rest: a zero residual (ch10 "Common mistakes": top-k without the
    residual, the seed article's sketch)."""
    indices = acc.abs().topk(k, sorted=False).indices
    return acc[indices], indices.to(torch.int32), torch.zeros_like(acc)


def topk_compress__residual_in_place(acc, k):
    """Zeroes the sent entries in acc itself and returns it as the residual (acc is not left unchanged)."""
    indices = acc.abs().topk(k, sorted=False).indices
    values = acc[indices]
    acc[indices] = 0
    return values, indices.to(torch.int32), acc


def breakeven_bandwidth__ignores_message_latency(full_bytes, compressed_bytes, overhead_s, extra_messages=0,
                                                 alpha=0.0):
    """Prices compression at its compute overhead only, forgetting the extra messages' latency."""
    saved = full_bytes - compressed_bytes
    if saved <= 0:
        return 0.0
    return math.inf if overhead_s <= 0 else saved / overhead_s


def breakeven_bandwidth__inverted(full_bytes, compressed_bytes, overhead_s, extra_messages=0, alpha=0.0):
    """Solves for seconds per byte instead of bytes per second (price / saved)."""
    saved, price = full_bytes - compressed_bytes, overhead_s + extra_messages * alpha
    if saved <= 0:
        return 0.0
    return math.inf if price <= 0 else price / saved


def gram_schmidt___classical(m, epsilon=0.0):
    """Classical Gram-Schmidt: projects each column on the original columns, not on the updated ones (not torch's
    modified Gram-Schmidt, and less stable)."""
    original = m.clone()
    for i in range(m.shape[1]):
        col = original[:, i:i + 1].clone()
        for j in range(i):
            q = m[:, j:j + 1]
            col -= torch.sum(q * original[:, i:i + 1], dim=0, keepdim=True) * q
        m[:, i:i + 1] = col / (torch.norm(col, dim=0, keepdim=True) + epsilon)
    return m


def gram_schmidt___returns_a_new_matrix(m, epsilon=0.0):
    """Orthonormalizes a copy and returns it; the caller's m is left as it was."""
    m = m.clone()
    for i in range(m.shape[1]):
        col = m[:, i:i + 1]
        col /= torch.norm(col, dim=0, keepdim=True) + epsilon
        if i + 1 < m.shape[1]:
            rest = m[:, i + 1:]
            rest -= torch.sum(col * rest, dim=0, keepdim=True) * col
    return m


def power_iteration__q_not_averaged(ms, qs, group=None, epsilon=0.0):
    """Sums the Q's over the ranks but forgets to divide them by N (ch10 "Common mistakes": averaging not at all)."""
    p_flat = comm.all_reduce_(torch.cat([(m @ q).flatten() for m, q in zip(ms, qs)]), group)
    ps = split_flat(p_flat, [(m.shape[0], q.shape[1]) for m, q in zip(ms, qs)])
    for p in ps:
        orthogonalize_(p, epsilon)
    q_flat = comm.all_reduce_(torch.cat([(m.t() @ p).flatten() for m, p in zip(ms, ps)]), group)
    return ps, split_flat(q_flat, [q.shape for q in qs])


def power_iteration__one_all_reduce_per_matrix(ms, qs, group=None, epsilon=0.0):
    """Right values, but two all-reduces per matrix instead of two per bucket."""
    n = comm.group_size(group)
    ps = [comm.all_reduce_(m @ q, group) for m, q in zip(ms, qs)]
    for p in ps:
        orthogonalize_(p, epsilon)
    return ps, [comm.all_reduce_(m.t() @ p, group).div_(n) for m, p in zip(ms, ps)]


# Chapter 11.

def flat_boxes__row_by_row(shape, start, stop):
    """One box per row touched (never a block of whole rows): up to a box a row, more than 2 ndim - 1."""
    if start >= stop:
        return []
    if len(shape) == 0:
        return [((), ())]
    if len(shape) == 1:
        return [((start,), (stop - start,))]
    row = math.prod(shape[1:])
    boxes = []
    for r in range(start // row, (stop - 1) // row + 1):
        lo, hi = max(start, r * row) - r * row, min(stop, (r + 1) * row) - r * row
        boxes += [((r, *o), (1, *n)) for o, n in flat_boxes__row_by_row(shape[1:], lo, hi)]
    return boxes


def flat_boxes__forgets_the_0d_tensor(shape, start, stop):
    """Treats a 0-d tensor as having no element."""
    if start >= stop or len(shape) == 0:
        return []
    if len(shape) == 1:
        return [((start,), (stop - start,))]
    row = math.prod(shape[1:])
    first, last = start // row, (stop - 1) // row
    if first == last:
        return [((first, *o), (1, *n)) for o, n in
                flat_boxes__forgets_the_0d_tensor(shape[1:], start - first * row, stop - first * row)]
    boxes = []
    if start % row:
        boxes += flat_boxes__forgets_the_0d_tensor(shape, start, (first + 1) * row)
        first += 1
    whole_end = stop // row
    if whole_end > first:
        boxes.append(((first, *[0] * (len(shape) - 1)), (whole_end - first, *shape[1:])))
    if stop % row:
        boxes += flat_boxes__forgets_the_0d_tensor(shape, whole_end * row, stop)
    return boxes


def read_plan__touching_chunks_included(chunks, offsets, lengths):
    """Takes chunks that only touch the box (an empty overlap) as overlapping: <= where < belongs."""
    plan = []
    for i, (c_off, c_len) in enumerate(chunks):
        lo = [max(a, b) for a, b in zip(c_off, offsets)]
        hi = [min(a + m, b + k) for a, m, b, k in zip(c_off, c_len, offsets, lengths)]
        if all(low <= high for low, high in zip(lo, hi)):
            plan.append((i, tuple(slice(low - a, high - a) for low, high, a in zip(lo, hi, c_off)),
                         tuple(slice(low - b, high - b) for low, high, b in zip(lo, hi, offsets))))
    return plan


def read_plan__global_slices(chunks, offsets, lengths):
    """Returns the overlap in global coordinates instead of counted from the chunk's and the box's first element."""
    plan = []
    for i, (c_off, c_len) in enumerate(chunks):
        lo = [max(a, b) for a, b in zip(c_off, offsets)]
        hi = [min(a + m, b + k) for a, m, b, k in zip(c_off, c_len, offsets, lengths)]
        if all(low < high for low, high in zip(lo, hi)):
            part = tuple(slice(low, high) for low, high in zip(lo, hi))
            plan.append((i, part, part))
    return plan


def commit__delete_then_move(staged, path):
    """Deletes the old checkpoint before moving the new one in: a crash in between leaves none (ch11 "Common
    mistakes": writing over the last good checkpoint)."""
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(path + ".old", ignore_errors=True)
    os.replace(staged, path)


def commit__stale_old_kept(staged, path):
    """Moves the old checkpoint aside without clearing a stale path.old first (the rename then fails), and never
    removes path.old when it is the only one left."""
    old = path + ".old"
    if os.path.isdir(path):
        os.replace(path, old)
        os.replace(staged, path)
        shutil.rmtree(old)
    else:
        os.replace(staged, path)


# Chapter 12.

def update_kv__checks_each_row_after_writing_the_others(cache_k, cache_v, k, v, slots, starts):
    """Checks a row's end only when it reaches it: the rows before an overflowing one are already written."""
    T, Lmax = k.shape[2], cache_k.shape[2]
    for b in range(k.shape[0]):
        s, p = int(slots[b]), int(starts[b])
        if p + T > Lmax:
            raise ValueError(f"a row writes positions up to {p + T}, but the cache holds {Lmax} positions per sequence")
        cache_k[s, :, p:p + T] = k[b]
        cache_v[s, :, p:p + T] = v[b]
    end = int(starts.max()) + T
    return cache_k[slots, :, :end], cache_v[slots, :, :end]


def update_kv__rows_in_slot_order(cache_k, cache_v, k, v, slots, starts):
    """Returns the first B slots' caches instead of the rows' own slots."""
    T, Lmax = k.shape[2], cache_k.shape[2]
    end = int(starts.max()) + T
    if end > Lmax:
        raise ValueError(f"a row writes positions up to {end}, but the cache holds {Lmax} positions per sequence")
    for b in range(k.shape[0]):
        s, p = int(slots[b]), int(starts[b])
        cache_k[s, :, p:p + T] = k[b]
        cache_v[s, :, p:p + T] = v[b]
    return cache_k[:k.shape[0], :, :end], cache_v[:k.shape[0], :, :end]


def least_outstanding_tokens__ties_to_the_last(outstanding, healthy=None):
    """Uses <= when comparing, so a tie goes to the highest index."""
    best = None
    for i, tokens in enumerate(outstanding):
        if (healthy is None or healthy[i]) and (best is None or tokens <= outstanding[best]):
            best = i
    if best is None:
        raise ValueError(f"no healthy replica to route to ({len(outstanding)} replicas)")
    return best


def least_outstanding_tokens__ignores_health(outstanding, healthy=None):
    """Routes to the least loaded replica even when it is marked unhealthy."""
    if not outstanding or (healthy is not None and not any(healthy)):
        raise ValueError(f"no healthy replica to route to ({len(outstanding)} replicas)")
    return min(range(len(outstanding)), key=lambda i: outstanding[i])


def find_stragglers__median_including_itself(times, factor=2.0):
    """Compares each rank with the median of all ranks, itself included (with two ranks nobody is ever slow)."""
    if not factor > 1:
        raise ValueError(f"factor must be greater than 1, got {factor!r}")
    if len(times) < 2:
        return []
    median = statistics.median(times)
    return [r for r, t in enumerate(times) if t > factor * median]


def find_stragglers__mean_of_the_others(times, factor=2.0):
    """Uses the mean of the others instead of their median: one very slow rank hides a second."""
    if not factor > 1:
        raise ValueError(f"factor must be greater than 1, got {factor!r}")
    slow = []
    for r, t in enumerate(times):
        others = times[:r] + times[r + 1:]
        if others and t > factor * statistics.mean(others):
            slow.append(r)
    return slow
