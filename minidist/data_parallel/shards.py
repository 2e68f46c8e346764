"""ZeRO-2's side of the gradient reducer (reducer.py in reduce-scatter mode, chapter 05): what a bucket holds when
its hook launches it, and which full-size gradients that frees.

A stage-2 bucket is not a view of the gradients (as data parallelism's all-reduce buckets are): it is a new flat
buffer, zero-padded to a multiple of N for the reduce-scatter, into which each gradient's piece is copied; a
gradient whose last piece has been copied is dropped at once, so no rank holds full-size gradients for long. Its
exercise belongs to chapter 05 (ZeRO); the reducer imports it from here, inside the package it belongs to.
"""
import torch


def pack_bucket(bucket, params: list, offsets: dict, bucket_of: dict, world: int) -> torch.Tensor:
    """ZeRO-2's bucket, when its hook launches it: a new zero-padded flat buffer (bucket.dtype, N * ceil(size / N)
    elements for the bucket's size = bucket.stop - bucket.start, on the parameters' device) holding, at its own
    place, every piece of a gradient that falls in the bucket; then the full-size gradients the bucket finished.

    Parameter i (params[i], index listed in bucket.params) lies at [offset, offset + numel) of its dtype's flat
    layout, offsets[i] = (dtype, offset); the bucket covers [bucket.start, bucket.stop) of it, so a parameter may be
    cut between buckets; bucket_of[i] lists, in launch order, the buckets holding a piece of parameter i. A
    parameter without a gradient contributes zeros. Once its *last* bucket has its copy, set the parameter's .grad
    to None: ZeRO-2 keeps no full-size gradient longer than it must (its memory saving; dropped while a later bucket
    still needs a piece, that piece is lost). Under gradient accumulation what adds up is the reduce-scattered
    shards, one per micro-step. Graded: by hand (parameters cut by bucket boundaries, padding, a missing gradient,
    which gradients are dropped when), and ZeRO-2 with 2 micro-steps of accumulation and small buckets that cut
    parameters, on 2 ranks, against one process.
    """
    # <exercise zero2_pack_bucket points=3>
    # hint: intersect each parameter's range with the bucket's; both are positions in the same flat layout.
    # hint: a parameter cut in two lies in two buckets: only the later one may let its gradient go.
    size = bucket.stop - bucket.start
    buf = torch.zeros(-(-size // world) * world, dtype=bucket.dtype, device=params[bucket.params[0]].device)
    for i in bucket.params:  # copy each parameter's piece that falls in this bucket
        _, offset = offsets[i]
        p = params[i]
        lo, hi = max(offset, bucket.start), min(offset + p.numel(), bucket.stop)
        if p.grad is not None:
            buf[lo - bucket.start:hi - bucket.start].copy_(p.grad.reshape(-1)[lo - offset:hi - offset])
    for i in bucket.params:  # the bucket holds a copy: drop the gradients whose last piece is in it
        if bucket_of[i][-1] is bucket:
            params[i].grad = None
    return buf
    # </exercise>
