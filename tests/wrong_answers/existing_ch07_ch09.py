"""Plausible wrong answers to the exercises of chapters 07-09 (see tests/test_wrong_answers.py): each must score
below full marks."""
import torch

from minidist.memory.accounting import activation_bytes_per_layer
from minidist.memory.offload import storage_bytes
from minidist.memory.recompute import POLICIES, replayed
from minidist.pipeline.schedule import Action, _check, _check_complete, shape, waits_for


# Chapter 07.

def one_f_one_b__warmup_not_cut(p, m):
    """A warm-up of p - r - 1 forwards even when m < p (ch07 "Common mistakes": fewer micro-batches than stages)."""
    _check(p=p, m=m)
    schedule = []
    for r in range(p):
        warmup = p - r - 1
        actions = [Action("F", i) for i in range(warmup)]
        for i in range(m - warmup):
            actions += [Action("F", warmup + i), Action("B", i)]
        actions += [Action("B", i) for i in range(max(m - warmup, 0), m)]
        schedule.append(actions)
    return schedule


def one_f_one_b__one_forward_too_many(p, m):
    """Warms up with p - r forwards instead of p - r - 1: every rank holds one micro-batch more than 1F1B needs."""
    _check(p=p, m=m)
    schedule = []
    for r in range(p):
        warmup = min(p - r, m)
        actions = [Action("F", i) for i in range(warmup)]
        for i in range(m - warmup):
            actions += [Action("F", warmup + i), Action("B", i)]
        actions += [Action("B", i) for i in range(m - warmup, m)]
        schedule.append(actions)
    return schedule


def one_f_one_b__gpipe(p, m):
    """Every forward, then every backward: GPipe's order, holding m micro-batches instead of p - r."""
    _check(p=p, m=m)
    return [[Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)] for _ in range(p)]


def validate__no_deadlock_check(schedule):
    """Plays the schedule but returns what ran when it gets stuck, instead of naming the deadlock."""
    p, m, v = shape(schedule)
    _check_complete(schedule, m, v)
    for r, actions in enumerate(schedule):
        position = {a: k for k, a in enumerate(actions)}
        for a in actions:
            before = {"B": "F", "W": "B"}.get(a.kind)
            if before and position[Action(before, a.microbatch, a.chunk)] > position[a]:
                raise ValueError(f"rank {r} runs {a} before {Action(before, a.microbatch, a.chunk)}")
    done, order, next_, progress = set(), [], [0] * p, True
    while progress:
        progress = False
        for r in range(p):
            while next_[r] < len(schedule[r]):
                a = schedule[r][next_[r]]
                needed = waits_for(a, r, p, p * v)
                if needed is not None and needed not in done:
                    break
                done.add((r, a))
                order.append((r, a))
                next_[r] += 1
                progress = True
    return order


def validate__one_pass(schedule):
    """Plays the ranks once each in rank order, so a rank that waits on a later rank is taken for a deadlock."""
    p, m, v = shape(schedule)
    _check_complete(schedule, m, v)
    for r, actions in enumerate(schedule):
        position = {a: k for k, a in enumerate(actions)}
        for a in actions:
            before = {"B": "F", "W": "B"}.get(a.kind)
            if before and position[Action(before, a.microbatch, a.chunk)] > position[a]:
                raise ValueError(f"rank {r} runs {a} before {Action(before, a.microbatch, a.chunk)}")
    done, order, next_ = set(), [], [0] * p
    for r in range(p):
        while next_[r] < len(schedule[r]):
            a = schedule[r][next_[r]]
            needed = waits_for(a, r, p, p * v)
            if needed is not None and needed not in done:
                break
            done.add((r, a))
            order.append((r, a))
            next_[r] += 1
    stuck = [(r, schedule[r][next_[r]]) for r in range(p) if next_[r] < len(schedule[r])]
    if stuck:
        raise ValueError("deadlock: " + "; ".join(f"rank {r} waits at {a} for rank %d's %s" % waits_for(a, r, p, p * v)
                                                  for r, a in stuck))
    return order


def partition__remainder_to_the_last_stage(n_layers, n_stages):
    """Gives the whole remainder to the last stage instead of one block each to the first stages."""
    for name, value in (("n_layers", n_layers), ("n_stages", n_stages)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if n_stages > n_layers:
        raise ValueError(f"cannot cut {n_layers} blocks into {n_stages} pipeline stages")
    base = n_layers // n_stages
    bounds = [(s * base, (s + 1) * base) for s in range(n_stages)]
    bounds[-1] = (bounds[-1][0], n_layers)
    return bounds


def partition__empty_stages_allowed(n_layers, n_stages):
    """Never refuses more stages than blocks: the last stages get empty ranges."""
    for name, value in (("n_layers", n_layers), ("n_stages", n_stages)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    base, extra = divmod(n_layers, n_stages)
    bounds, start = [], 0
    for s in range(n_stages):
        stop = start + base + (1 if s < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


# Chapter 08.

def group_ranks__first_axis_fastest(rank, shape, axes):
    """Takes the first axis as the fastest one (strides from the left), the reverse of the mesh's layout."""
    world = 1
    for size in shape.values():
        world *= size
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank {rank!r} is not in a mesh of {world} ranks ({shape})")
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    if unknown := [a for a in axes if a not in shape]:
        raise ValueError(f"unknown mesh axes {unknown}; the axes are {tuple(shape)}")
    strides, stride = {}, 1
    for name in shape:
        strides[name], stride = stride, stride * shape[name]
    base = rank - sum((rank // strides[a]) % shape[a] * strides[a] for a in axes)
    ranks = [base]
    for a in axes:
        ranks = [r + k * strides[a] for r in ranks for k in range(shape[a])]
    return sorted(ranks)


def group_ranks__offsets_from_own_rank(rank, shape, axes):
    """Adds the offsets to the rank itself instead of to its coordinate 0 on the axes: ranks past the group."""
    world = 1
    for size in shape.values():
        world *= size
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank {rank!r} is not in a mesh of {world} ranks ({shape})")
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    if unknown := [a for a in axes if a not in shape]:
        raise ValueError(f"unknown mesh axes {unknown}; the axes are {tuple(shape)}")
    strides, stride = {}, 1
    for name in reversed(list(shape)):
        strides[name], stride = stride, stride * shape[name]
    ranks = [rank]
    for a in axes:
        ranks = [r + k * strides[a] for r in ranks for k in range(shape[a])]
    return sorted(ranks)


def merge_partials__naive_logsumexp(out_a, lse_a, out_b, lse_b):
    """log(exp(lse_a) + exp(lse_b)): inf at lse_a = 100 in fp32 (issue 24: 3/3 against the old grader)."""
    lse = torch.log(torch.exp(lse_a) + torch.exp(lse_b))
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(lse_a - safe).unsqueeze(-1) * out_a + torch.exp(lse_b - safe).unsqueeze(-1) * out_b, lse


def merge_partials__no_guard_for_empty_rows(out_a, lse_a, out_b, lse_b):
    """Subtracts an lse of -inf from -inf for a row with no key in either part: NaN."""
    lse = torch.logaddexp(lse_a, lse_b)
    return torch.exp(lse_a - lse).unsqueeze(-1) * out_a + torch.exp(lse_b - lse).unsqueeze(-1) * out_b, lse


def merge_partials__weights_by_max(out_a, lse_a, out_b, lse_b):
    """Keeps the part with the larger lse and drops the other (a max, not a log-sum-exp)."""
    take_a = (lse_a >= lse_b).unsqueeze(-1)
    return torch.where(take_a, out_a, out_b), torch.maximum(lse_a, lse_b)


def load_balanced_positions__contiguous_pairs(seq_len, n, rank):
    """Takes chunks 2i and 2i + 1 (neighbours) instead of i and 2n - 1 - i: the causal work is unbalanced."""
    if not isinstance(rank, int) or not 0 <= rank < n:
        raise ValueError(f"rank {rank!r} is not a rank of a context-parallel group of {n}")
    if seq_len % (2 * n):
        raise ValueError(f"sequence length {seq_len} does not cut into 2n = {2 * n} equal chunks")
    c = seq_len // (2 * n)
    return torch.arange(2 * rank * c, (2 * rank + 2) * c)


def load_balanced_positions__no_length_check(seq_len, n, rank):
    """Never checks that 2n divides the length: rounds the chunk down and silently drops positions."""
    if not isinstance(rank, int) or not 0 <= rank < n:
        raise ValueError(f"rank {rank!r} is not a rank of a context-parallel group of {n}")
    c = seq_len // (2 * n)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * n - 1 - rank) * c, (2 * n - rank) * c)])


# Chapter 09.

def recompute_gradients__without_the_random_state(fn, inputs, state, grad_outputs):
    """Recomputes without replaying forward's random state: dropout draws new masks (ch09 "Common mistakes")."""
    detached = [x.detach().requires_grad_(x.requires_grad) if torch.is_tensor(x) else x for x in inputs]
    with torch.enable_grad():
        outputs = fn(*detached)
    outputs = (outputs,) if torch.is_tensor(outputs) else tuple(outputs)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad and g is not None]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return [x.grad if torch.is_tensor(x) and x.requires_grad else None for x in detached]


def recompute_gradients__every_input_requires_grad(fn, inputs, state, grad_outputs):
    """Makes every tensor input require a gradient and returns it, also for inputs that needed none."""
    detached = [x.detach().requires_grad_(x.is_floating_point()) if torch.is_tensor(x) else x for x in inputs]
    with torch.enable_grad(), replayed(state):
        outputs = fn(*detached)
    outputs = (outputs,) if torch.is_tensor(outputs) else tuple(outputs)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad and g is not None]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return [x.grad if torch.is_tensor(x) else None for x in detached]


def saved_bytes_per_layer__selective_keeps_dropout(policy, seq, batch, hidden, heads, bytes_per_value=2, dropout=True,
                                                   mask_bytes=1):
    """Selective recomputation subtracts the softmax but keeps the attention dropout's mask and output."""
    if policy not in ("none", *POLICIES):
        raise ValueError(f"policy must be 'none', 'full' or 'selective', got {policy!r}")
    everything = activation_bytes_per_layer(seq, batch, hidden, heads, bytes_per_value, dropout, mask_bytes)
    if policy == "none":
        return everything
    if policy == "full":
        return bytes_per_value * seq * batch * hidden
    return everything - bytes_per_value * heads * seq * seq * batch


def saved_bytes_per_layer__mask_in_value_bytes(policy, seq, batch, hidden, heads, bytes_per_value=2, dropout=True,
                                               mask_bytes=1):
    """Subtracts the attention dropout mask at bytes_per_value per element instead of mask_bytes."""
    if policy not in ("none", *POLICIES):
        raise ValueError(f"policy must be 'none', 'full' or 'selective', got {policy!r}")
    everything = activation_bytes_per_layer(seq, batch, hidden, heads, bytes_per_value, dropout, mask_bytes)
    if policy == "none":
        return everything
    if policy == "full":
        return bytes_per_value * seq * batch * hidden
    as2b = heads * seq * seq * batch
    return everything - bytes_per_value * as2b - (2 * bytes_per_value * as2b if dropout else 0)


def pack_saved__copies_the_elements_only(t, tier):
    """Copies t's elements (contiguous) instead of its whole storage, yet describes t's view of the storage."""
    data = t.detach().contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    stored = tier.allocate(data.numel(), t.device)
    stored.copy_(data)
    return stored, t.dtype, t.shape, t.stride(), t.storage_offset()


def pack_saved__keeps_it_in_memory(t, tier):
    """Keeps a copy of the storage in ordinary memory: nothing goes to the tier."""
    stored = storage_bytes(t).clone()
    return stored, t.dtype, t.shape, t.stride(), t.storage_offset()


def unpack_saved__no_copy(packed, device):
    """.to(device) without a copy: on a CPU the result is the mapped file itself, not fast memory."""
    stored, dtype, size, stride, offset = packed
    return stored.to(device).view(dtype).as_strided(size, stride, offset)


def unpack_saved__contiguous_layout(packed, device):
    """Rebuilds a contiguous tensor of the right size from the offset on, ignoring the stride."""
    stored, dtype, size, stride, offset = packed
    values = stored.to(device, copy=True).view(dtype)
    numel = 1
    for s in size:
        numel *= s
    return values[offset:offset + numel].reshape(size).clone()
