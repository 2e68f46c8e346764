"""Gradient compression (chapter 10): communication hooks `hook(state, bucket) -> Future` with DDP's interface, so
the same hook runs on DataParallel and on torch's DDP; the error-feedback memory lives in an explicit state.

    hooks.py      the plain all-reduce, fp16/bf16 compression, top-k with error feedback; bytes formulas and the
                  break-even bandwidth
    powersgd.py   PowerSGD (rank-r power iteration, warm start) and its state
    futures.py    the torch future a hook returns, completed from minidist's own Works
"""
from .hooks import (TopKState, allreduce_hook, bf16_compress_hook, breakeven_bandwidth, cast_bytes,
                    fp16_compress_hook, ring_all_reduce_bytes, topk_bytes, topk_compress, topk_hook)
from .powersgd import PowerSGDState, powersgd_bytes, powersgd_hook

__all__ = ["allreduce_hook", "fp16_compress_hook", "bf16_compress_hook", "TopKState", "topk_compress", "topk_hook",
           "ring_all_reduce_bytes", "cast_bytes", "topk_bytes", "breakeven_bandwidth", "PowerSGDState",
           "powersgd_hook", "powersgd_bytes"]
