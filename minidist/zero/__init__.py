"""ZeRO stages 1 and 2 (chapter 05): data parallelism that keeps 1/N of the optimizer states (stage 1) and of the
gradients (stage 2) on each rank, around any torch optimizer. Stage 3 is minidist.fsdp.

    optimizer.py  ZeroOptimizer: the flat padded partition, and a step in three phases (reduce-scatter gradients,
                  local update, all-gather parameters)
    phases.py     the partition (shard_pieces) and the collective phases as functions on flat buffers
    state.py      its bookkeeping: state dicts in the wrapped optimizer's own format (any world size), which
                  parameters' hooks it owns, what it holds
"""
from .optimizer import ShardReducer, ZeroOptimizer
from .phases import all_gather_parameters, reduce_scatter_gradients, shard_pieces, used_on_some_rank
from .state import ZeroState

__all__ = ["ZeroOptimizer", "ShardReducer", "ZeroState", "shard_pieces", "reduce_scatter_gradients",
           "all_gather_parameters", "used_on_some_rank"]
