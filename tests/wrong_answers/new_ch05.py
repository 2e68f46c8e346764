"""Plausible wrong answers to chapter 05's new exercise (zero2_pack_bucket): each must score below full marks."""
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
    """Drops the gradient of every parameter in the bucket, though a parameter cut by the bucket's end still owes
    its next piece to the next bucket (which then packs zeros)."""
    buf = _pack(bucket, params, offsets, world)
    for i in bucket.params:
        params[i].grad = None
    return buf


def pack_bucket__keeps_full_gradients(bucket, params, offsets, bucket_of, world):
    """Never drops the full-size gradients: no memory saved, and under accumulation each micro-step's gradient adds
    to the previous one's while the shards accumulate too (earlier micro-steps counted twice)."""
    return _pack(bucket, params, offsets, world)


def pack_bucket__piece_from_the_start(bucket, params, offsets, bucket_of, world):
    """Copies the first elements of a cut parameter's gradient into every bucket instead of the part that falls in
    this bucket."""
    buf = _pack(bucket, params, offsets, world, from_start=True)
    for i in bucket.params:
        if bucket_of[i][-1] is bucket:
            params[i].grad = None
    return buf


def used_on_some_rank__local_flags_only(params, group=None):
    """Asks only this rank: a parameter another rank used is skipped here, and the replicas drift apart."""
    return [p.grad is not None for p in params]


def used_on_some_rank__one_all_reduce_per_tensor(params, group=None):
    """Agrees tensor by tensor: the right answer, but one collective per parameter (hundreds per step, each paying
    the latency) where one small all-reduce does."""
    from minidist import comm
    return [comm.all_reduce_sum(torch.tensor([int(p.grad is not None)], dtype=torch.int32), group).item() > 0
            for p in params]
