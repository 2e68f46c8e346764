"""Plausible wrong answers to chapter 06's new exercises (fsdp_pre_backward, fsdp_copy_out): each must score below
full marks."""
from minidist.fsdp.state import TrainingState


def backward_reached__only_pre_backward_counts(unit, use):
    """Only PRE_BACKWARD counts as reached: an output recomputed after the reduce-scatter restarts the unit."""
    if unit.backward_use not in (None, use):
        raise RuntimeError(f"fully_shard unit {unit.name!r} ran forward more than once for one backward")
    unit.backward_use = use
    if unit.training_state is TrainingState.PRE_BACKWARD:
        return False
    unit.training_state = TrainingState.PRE_BACKWARD
    return True


def backward_reached__no_use_check(unit, use):
    """Never compares the uses: a unit run twice for one backward mixes both uses' gradients silently."""
    if unit.training_state in (TrainingState.PRE_BACKWARD, TrainingState.POST_BACKWARD):
        return False
    unit.training_state = TrainingState.PRE_BACKWARD
    return True


def backward_reached__every_hook_starts(unit, use):
    """Starts the unit's backward at every output hook (the state set, the answer always True)."""
    if unit.backward_use not in (None, use):
        raise RuntimeError(f"fully_shard unit {unit.name!r} ran forward more than once for one backward")
    unit.backward_use = use
    unit.training_state = TrainingState.PRE_BACKWARD
    return True


def copy_out__rank_major_reshape(gathered, unit, into=None):
    """Reads each parameter as one contiguous run, as if the gathered buffer were parameter-major."""
    out = []
    for i, (shape, o, z, k) in enumerate(zip(unit.shapes, unit.offsets, unit.sizes, unit.pads)):
        flat = gathered[unit.n * o:unit.n * (o + z)]
        dst = into[i] if into is not None else gathered.new_empty((unit.n * k, *shape[1:]))
        dst.view(-1).copy_(flat)
        out.append(dst[:shape[0]])
    return out


def copy_out__rows_dealt_round_robin(gathered, unit, into=None):
    """Takes rank r's slot to hold rows r, r + N, ... instead of a contiguous block of ceil(d0/N) rows."""
    out, g = [], gathered.view(unit.n, unit.chunk)
    for i, (shape, o, z, k) in enumerate(zip(unit.shapes, unit.offsets, unit.sizes, unit.pads)):
        slots = g[:, o:o + z].reshape(unit.n, k, -1)          # (N, rows per slot, row elements)
        padded = slots.transpose(0, 1).reshape(unit.n * k, *shape[1:])
        dst = into[i] if into is not None else gathered.new_empty((unit.n * k, *shape[1:]))
        dst.copy_(padded)
        out.append(dst[:shape[0]])
    return out
