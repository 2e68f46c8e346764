"""Side-by-side benchmarks: minidist's technique and the production reference, timed in the same run.

Timings on a shared machine drift (other processes, frequency scaling), so the variants are not timed one after
another: each step, every variant runs one training step, in an order that rotates from step to step, and each
variant's median over the steps is reported. Ratios (minidist / reference) are what to compare across machines.
"""
from .buckets import _median_seconds, bench_buckets, bucket_sweep, format_buckets
from .ddp import bench_ddp, ddp_step_times, ddp_variants, format_ddp, median_step_times
from .flight import bench_flight, format_flight
from .moe import bench_moe, format_moe
from .pp import bench_pp, format_pp, pp_step_times
from .sharded import bench_fsdp, bench_sharded, bench_zero, format_fsdp, format_sharded, format_zero
from .serve import bench_serve, format_serve
from .tp import bench_tp, format_tp, tp_step_times

__all__ = ["bench_ddp", "format_ddp", "ddp_step_times", "ddp_variants", "bench_buckets", "format_buckets",
           "bucket_sweep", "bench_tp", "format_tp", "tp_step_times", "_median_seconds", "median_step_times",
           "bench_pp", "format_pp", "pp_step_times", "bench_zero", "format_zero", "bench_fsdp", "format_fsdp",
           "bench_sharded", "format_sharded", "bench_serve", "format_serve",
           "bench_flight", "format_flight", "bench_moe", "format_moe"]
