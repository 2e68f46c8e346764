"""Data parallelism (chapter 02): every rank holds the whole model, trains on its slice of the batch, and averages
the gradients with one all-reduce per step (2(N-1)/N * 4Ψ bytes per rank in fp32).

    wrapper.py    DataParallel: naive, bucketed, overlapped; no_sync; unused and frozen parameters;
                  global_mean_loss for unequal batches; the predicted step time
    reducer.py    GradReducer: flat buffers with .grad as views, hooks, all-reduce or reduce-scatter during backward
                  (DataParallel's engine, and ZeRO-2's)
    buckets.py    the bucket layout (reverse order, one flat buffer per dtype) and the in-order launch rule

Mixed precision (loss scaling, fp32 masters) is minidist.mixed_precision; samplers are minidist.samplers.
"""
from .buckets import MiB, Bucket, assign_buckets, assign_whole_buckets, launch_ready_buckets, layout
from .reducer import GradBucket, GradReducer
from .wrapper import DataParallel, average_gradients_, broadcast_from_rank0_, global_mean_loss, predict_step_seconds

__all__ = ["DataParallel", "average_gradients_", "global_mean_loss", "predict_step_seconds", "broadcast_from_rank0_",
           "GradReducer", "GradBucket", "MiB", "Bucket", "assign_buckets", "assign_whole_buckets",
           "launch_ready_buckets", "layout"]
