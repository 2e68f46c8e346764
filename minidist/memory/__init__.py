"""Where the memory of training goes (chapter 00), and two ways to hold less of it (chapter 09).

    accounting.py  the formulas (ZeRO model states, activations per layer) and the measurement (bytes each rank
                   really holds: tensors, saved-tensor hooks)
    recompute.py   activation checkpointing: drop what a segment saved, recompute it in backward (full or selective;
                   its recompute function is recompute.checkpoint); not to be confused with sharded checkpoints on
                   disk, which are minidist.checkpoint
    offload.py     storage tiers (cpu, disk), activation offload, optimizer-state offload (ZeRO-Offload)
"""
from .accounting import (GB, StateBytes, SavedActivations, activation_bytes_per_layer, format_zero_table,
                         measure_state_bytes, zero_state_bytes, zero_table)
from .offload import DiskTier, HostTier, OptimizerOffload, make_tier, offload_activations, offload_optimizer
from .recompute import checkpoint_blocks, saved_bytes_per_layer, uncheckpoint

__all__ = ["StateBytes", "zero_state_bytes", "zero_table", "format_zero_table", "activation_bytes_per_layer",
           "measure_state_bytes", "SavedActivations", "GB", "checkpoint_blocks", "uncheckpoint",
           "saved_bytes_per_layer", "HostTier", "DiskTier", "make_tier", "offload_activations", "offload_optimizer",
           "OptimizerOffload"]
