"""Figures for the chapters (matplotlib), each drawn from numbers it is given or from a pure simulation.

    training.py   bars, lines, the ring diagram, communication and pipeline timelines, meshes, read plans (00-11)
    serving.py    the KV cache of a running batch, requests over decoding steps, latency distributions, rank
                  timelines (chapter 12)
"""
from .serving import kv_cache, latency_cdfs, rank_timeline, replica_work, request_timeline
from .training import (PIPELINE_COLORS, bars, causal_blocks, draw_mesh, draw_ring, element_runs, lines,
                       pipeline_timeline, read_plan, ring_states, timeline, tp_block, unit_timeline)

__all__ = ["bars", "lines", "ring_states", "draw_ring", "timeline", "tp_block", "PIPELINE_COLORS",
           "pipeline_timeline", "unit_timeline", "draw_mesh", "causal_blocks", "element_runs", "read_plan",
           "kv_cache", "request_timeline", "latency_cdfs", "rank_timeline", "replica_work"]
