"""Sharded checkpoints (chapter 11): every rank writes its own pieces, one metadata file says where every piece of
every global tensor lies, and any layout at any world size reads back exactly the pieces it needs (resharding).
Not to be confused with activation checkpointing, which is minidist.memory.recompute.

    save_load.py    save / load: read plans, atomic across ranks; RNG state helpers for `extra`
    file_format.py  the files: metadata.json, safetensors chunks readable by DCP, the atomic commit; DCP's own
                    format read back
    layout.py       every parallelism's tensors as boxes of the global tensors (flat shards cut into boxes)
"""
from .file_format import read_metadata, resolve
from .layout import Box, Placement, model_tensors, optimizer_entries, unwrap
from .save_load import load, plan_load, read_plan, rng_state, save, set_rng_state

__all__ = ["save", "load", "plan_load", "read_plan", "rng_state", "set_rng_state", "read_metadata", "resolve",
           "Box", "Placement", "model_tensors", "optimizer_entries", "unwrap"]
