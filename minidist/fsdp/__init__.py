"""Fully sharded data parallel (chapter 06; ZeRO stage 3): parameters sharded at rest, gathered one unit at a time.

    units.py      fully_shard and FSDPUnit: the unshard / reshard lifecycle in methods named after the training
                  phases (pre_forward, post_backward), prefetching, mixed precision
    state.py      which parameters a unit takes; full_state_dict and clip_grad_norm_ of a sharded model
"""
from .state import clip_grad_norm_, full_state_dict
from .units import FSDPUnit, fully_shard, prefetch_target, reduce_scatter_grads, reshard_, unshard_

__all__ = ["fully_shard", "FSDPUnit", "unshard_", "reshard_", "reduce_scatter_grads", "prefetch_target",
           "full_state_dict", "clip_grad_norm_"]
