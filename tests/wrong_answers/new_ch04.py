"""Plausible wrong answers to chapter 04's new exercise (sp_regather): each must score below full marks."""
from minidist import comm


def regathered_input__gathers_for_every_user(source):
    """All-gathers again for each of the layers that share the input: q, k and v triple the backward's bytes."""
    source.users -= 1
    return comm.all_gather_cat(source.shard.detach(), source.group, dim=1)


def regathered_input__keeps_the_gathered_copy(source):
    """Never lets the gathered input go: the memory SP saves is held, and the next backward reads stale values."""
    if source._full is None:
        source._full = comm.all_gather_cat(source.shard.detach(), source.group, dim=1)
    source.users -= 1
    return source._full


def regathered_input__joins_along_the_batch(source):
    """Concatenates the ranks' chunks along dim 0 (the default of a gather) instead of the sequence."""
    if source._full is None:
        source._full = comm.all_gather_cat(source.shard.detach(), source.group)
    full = source._full
    source.users -= 1
    if source.users <= 0:
        source._full = None
    return full
