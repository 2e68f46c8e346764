"""The tour: every technique minidist has, run on N simulated ranks and checked against its reference.

Each chapter's module contributes its CHECKS: functions (world_size) -> rows. A row passes when the from-scratch
result matches the reference within its tolerance and, where a formula exists, the measured bytes equal it.
"""
import os

from . import data_parallel, foundation, inference, monitoring, pipeline, tensor_parallel
from .foundation import comm_backward_errors
from .rows import KEYS, format_rows, make_row

CHECKS = [*foundation.CHECKS, *data_parallel.CHECKS, *tensor_parallel.CHECKS, *pipeline.CHECKS, *inference.CHECKS,
          *monitoring.CHECKS]


def run_tour(world_size: int = 4, progress: bool = True, backend: str = "gloo") -> dict:
    """Every check on `world_size` ranks: CPU processes over gloo (the default, also on a GPU machine), or one rank
    per GPU over NCCL with backend="nccl" (`make gpu-check`): the rank functions build their tensors on device()."""
    from tqdm.auto import tqdm
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    rows, previous = [], os.environ.get("MINIDIST_BACKEND")
    os.environ["MINIDIST_BACKEND"] = backend
    try:
        for check in tqdm(CHECKS, desc=f"tour on {world_size} ranks", disable=not progress):
            rows.extend(check(world_size))
    finally:
        if previous is None:
            del os.environ["MINIDIST_BACKEND"]
        else:
            os.environ["MINIDIST_BACKEND"] = previous
    return {"world_size": world_size, "rows": rows}


__all__ = ["CHECKS", "KEYS", "comm_backward_errors", "format_rows", "make_row", "run_tour"]
