"""Plausible wrong answers to chapter 07's new exercises (interleaved_1f1b, waits_for): each must score below full
marks (see tests/test_wrong_answers.py)."""
from minidist.pipeline.schedule import Action, one_f_one_b


def _interleaved(p, m, v, warmup_of, backward_chunk):
    if m % p:
        raise ValueError(f"interleaved 1F1B: m={m} must be divisible by p={p}")
    if v == 1:
        return one_f_one_b(p, m)

    def nth(kind, k):
        group, within = divmod(k, p * v)
        chunk = within // p
        return Action(kind, group * p + within % p, chunk if kind == "F" else backward_chunk(chunk, v))
    schedule, total = [], m * v
    for r in range(p):
        warmup = min(warmup_of(p, r, v), total)
        actions = [nth("F", k) for k in range(warmup)]
        for k in range(total - warmup):
            actions += [nth("F", warmup + k), nth("B", k)]
        schedule.append(actions + [nth("B", k) for k in range(total - warmup, total)])
    return schedule


def interleaved_1f1b__one_f_one_b_warmup(p, m, v=2):
    """1F1B's warm-up of p - r - 1 kept under interleaving (common mistakes: Megatron's is 2(p-r-1) + (v-1)p)."""
    return _interleaved(p, m, v, lambda p, r, v: p - r - 1, lambda c, v: v - 1 - c)


def interleaved_1f1b__backward_chunks_in_forward_order(p, m, v=2):
    """Backwards visit the chunks in the forwards' order (chunk 0 first) instead of last chunk first."""
    return _interleaved(p, m, v, lambda p, r, v: 2 * (p - r - 1) + (v - 1) * p, lambda c, v: c)


def waits_for__same_chunk_neighbour(action, rank, p, stages, v_shape=False):
    """The neighbouring rank on the same chunk: forgets that the stage after rank p - 1 is chunk c + 1 on rank 0."""
    if action.kind == "F" and (rank > 0 or action.chunk > 0):
        return (rank - 1) % p, Action("F", action.microbatch, action.chunk)
    if action.kind == "B" and action.chunk * p + rank < stages - 1:
        return (rank + 1) % p, Action("B", action.microbatch, action.chunk)
    return None


def waits_for__backward_waits_upstream(action, rank, p, stages, v_shape=False):
    """A backward waits for the previous stage's backward, as a forward does, instead of the next stage's."""
    stage = action.chunk * p + rank
    if action.kind in "FB" and stage > 0:
        return (stage - 1) % p, Action(action.kind, action.microbatch, (stage - 1) // p)
    return None
