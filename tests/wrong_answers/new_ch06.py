"""Plausible wrong answers to chapter 06's new exercises (fsdp_pre_backward, fsdp_copy_out): each must score below
full marks."""
from minidist.fsdp.state import TrainingState


def backward_reached__only_pre_backward_counts(unit, use):
    """Treats only PRE_BACKWARD as "already reached": an output recomputed after the unit's reduce-scatter starts its
    backward again (a second gather, a unit left waiting for a post-backward that never comes)."""
    if unit.backward_use not in (None, use):
        raise RuntimeError(f"fully_shard unit {unit.name!r} ran forward more than once for one backward")
    unit.backward_use = use
    if unit.training_state is TrainingState.PRE_BACKWARD:
        return False
    unit.training_state = TrainingState.PRE_BACKWARD
    return True


def backward_reached__no_use_check(unit, use):
    """Never compares the uses: a unit run twice for one backward is silently gathered and reduced once, with the
    gradients of both uses mixed (the error the chapter asks for never comes)."""
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
