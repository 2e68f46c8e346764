"""The tour: every technique minidist has, run on N simulated ranks and checked against its reference.

Each chapter's module contributes its CHECKS: functions (world_size) -> rows. A row passes when the from-scratch
result matches the reference within its tolerance and, where a formula exists, the measured bytes equal it.
"""
import os

from . import (checkpoint, checkpointing, compression, data_parallel, foundation, fsdp, hsdp, inference, moe,
               moe_refs, monitoring, parallel3d, pipeline, tensor_parallel, ulysses, vpipeline, zero)
from .foundation import comm_backward_errors
from .rows import KEYS, covers, format_rows, make_row

CHECKS = [*foundation.CHECKS, *data_parallel.CHECKS, *tensor_parallel.CHECKS, *zero.CHECKS, *fsdp.CHECKS,
          *hsdp.CHECKS, *pipeline.CHECKS, *vpipeline.CHECKS, *parallel3d.CHECKS, *ulysses.CHECKS,
          *checkpointing.CHECKS, *compression.CHECKS, *checkpoint.CHECKS, *inference.CHECKS, *monitoring.CHECKS,
          *moe.CHECKS, *moe_refs.CHECKS]


def run_tour(world_size: int = 4, progress: bool = True, backend: str = "gloo", only: str | None = None) -> dict:
    """Every check on `world_size` ranks: CPU processes over gloo (the default, also on a GPU machine), or one rank
    per GPU over NCCL with backend="nccl" (`make gpu-check`): the rank functions build their tensors on device().

    `only`: run only the rows whose technique contains this text (case-insensitive); checks whose declared topics
    (rows.covers) cannot match are skipped without running."""
    from tqdm.auto import tqdm
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not 1 <= world_size <= 4:  # the checks' batches (12 rows, 4 heads, ...) are cut for these
        raise ValueError(f"the tour runs on 1 to 4 ranks (its batches and models are sized for them), got "
                         f"world_size={world_size}")
    rows, previous = [], os.environ.get("MINIDIST_BACKEND")
    os.environ["MINIDIST_BACKEND"] = backend
    try:
        text = only.lower() if only else None
        checks = [c for c in CHECKS if text is None or text in getattr(c, "covers", text)]
        for check in tqdm(checks, desc=f"tour on {world_size} ranks", disable=not progress):
            rows.extend(r for r in check(world_size) if text is None or text in r["technique"].lower())
    finally:
        if previous is None:
            del os.environ["MINIDIST_BACKEND"]
        else:
            os.environ["MINIDIST_BACKEND"] = previous
    return {"world_size": world_size, "rows": rows}


__all__ = ["CHECKS", "KEYS", "comm_backward_errors", "covers", "format_rows", "make_row", "run_tour"]
