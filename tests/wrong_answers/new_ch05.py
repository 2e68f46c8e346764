"""Plausible wrong answers to chapter 05's new exercises (zero2_pack_bucket, zero_used_on_some_rank): each must score
below full marks."""
import torch


def _pack(bucket, params, offsets, world, from_start=False):
    size = bucket.stop - bucket.start
    buf = torch.zeros(-(-size // world) * world, dtype=bucket.dtype, device=params[bucket.params[0]].device)
    for i in bucket.params:
        _, offset = offsets[i]
        p = params[i]
        lo, hi = max(offset, bucket.start), min(offset + p.numel(), bucket.stop)
        if p.grad is not None:
            piece = p.grad.reshape(-1)[:hi - lo] if from_start else p.grad.reshape(-1)[lo - offset:hi - offset]
            buf[lo - bucket.start:hi - bucket.start].copy_(piece)
    return buf


def pack_bucket__drops_every_gradient_in_the_bucket(bucket, params, offsets, bucket_of, world):
    """Drops every gradient in the bucket: a parameter cut by its end loses the piece the next bucket needs."""
    buf = _pack(bucket, params, offsets, world)
    for i in bucket.params:
        params[i].grad = None
    return buf


def pack_bucket__keeps_full_gradients(bucket, params, offsets, bucket_of, world):
    """Never drops the full-size gradients: ZeRO-2's memory saving is lost until the end of backward."""
    return _pack(bucket, params, offsets, world)


def pack_bucket__piece_from_the_start(bucket, params, offsets, bucket_of, world):
    """Copies a cut parameter's first elements into every bucket instead of the part in this bucket."""
    buf = _pack(bucket, params, offsets, world, from_start=True)
    for i in bucket.params:
        if bucket_of[i][-1] is bucket:
            params[i].grad = None
    return buf


def used_on_some_rank__local_flags_only(params, group=None):
    """Asks only this rank: a parameter another rank used is skipped here, and the replicas drift apart."""
    return [p.grad is not None for p in params]


def used_on_some_rank__one_all_reduce_per_tensor(params, group=None):
    """Agrees tensor by tensor: right, but one collective per parameter where one small all-reduce does."""
    from minidist import comm
    return [comm.all_reduce_sum(torch.tensor([int(p.grad is not None)], dtype=torch.int32), group).item() > 0
            for p in params]
