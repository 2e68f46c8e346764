"""Wrong answers for the V placement (chapter 07: place) and Ulysses' two all-to-alls (chapter 08: seq_to_heads,
heads_to_seq): each must score below full marks."""
from minidist import comm


def place__v_like_looped(stage, p, v_shape=False):
    """Ignores the V: chunk 1 of rank r taken as stage p + r, the looped placement (the V's way back not reversed)."""
    return stage % p, stage // p


def place__v_turn_off_by_one(stage, p, v_shape=False):
    """The way back up starts one rank too low: stage s >= p on rank 2p - 2 - s, so the turn crosses ranks."""
    if v_shape:
        return (stage, 0) if stage < p else (max(2 * p - 2 - stage, 0), 1)
    return stage % p, stage // p


def seq_to_heads__strided_heads(x, group=None):
    """Rank j gets heads j, j + N, j + 2N, ... (the head axis split as (H/N, N), not (N, H/N))."""
    n = comm.group_size(group)
    B, H, t, d = x.shape
    parts = x.reshape(B, H // n, n, t, d).permute(2, 0, 1, 3, 4).contiguous()
    got = comm.all_to_all(parts, group)
    return got.permute(1, 2, 0, 3, 4).reshape(B, H // n, n * t, d)


def seq_to_heads__blocks_merged_without_moving_n(x, group=None):
    """The received (N, B, H/N, T/N, d) reshaped straight to (B, H/N, T, d): positions blocks land in the batch
    and head axes instead of along T."""
    n = comm.group_size(group)
    B, H, t, d = x.shape
    parts = x.reshape(B, n, H // n, t, d).transpose(0, 1).contiguous()
    return comm.all_to_all(parts, group).reshape(B, H // n, n * t, d)


def heads_to_seq__strided_positions(y, group=None):
    """Sends positions j, j + N, ... to rank j (T split as (T/N, N)) instead of the contiguous block j."""
    n = comm.group_size(group)
    B, h, T, d = y.shape
    parts = y.reshape(B, h, T // n, n, d).permute(3, 0, 1, 2, 4).contiguous()
    got = comm.all_to_all(parts, group)
    return got.transpose(0, 1).reshape(B, n * h, T // n, d)


def heads_to_seq__heads_in_reverse_rank_order(y, group=None):
    """Puts the heads blocks received from ranks N-1 .. 0 in that order: head h lands where head H - ... belongs."""
    n = comm.group_size(group)
    B, h, T, d = y.shape
    parts = y.reshape(B, h, n, T // n, d).permute(2, 0, 1, 3, 4).contiguous()
    got = comm.all_to_all(parts, group).flip(0)
    return got.transpose(0, 1).reshape(B, n * h, T // n, d)
