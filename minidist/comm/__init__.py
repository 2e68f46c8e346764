"""The communication layer (chapter 01): every other technique in minidist stands on it, and it imports none of them.

    collectives.py  plain collectives (in-place, async) and the differentiable ones, each backward the forward's dual
    p2p.py          point-to-point send/recv, batch_isend_irecv, all_to_all (also with uneven, run-time splits),
                    in group ranks
    ring.py         ring reduce-scatter / all-gather / all-reduce and a chain broadcast from send/recv; the
                    alpha-beta-gamma cost model
    ledger.py       the byte ledger: every collective and message, its axis, bytes counted or modelled
    gloo.py         reduce-scatter and all-gather lowered for gloo (all_to_all + adds, broadcasts): 2-3x faster
    backend.py      where collectives run: the process group's backend, or minidist's ring (ring_backend), over an
                    optional simulated link
    flight.py       the flight recorder: the last collectives and messages each rank entered
    diagnose.py     why ranks hang: the first disagreement across every rank's flight record
    strict.py       NCCL's point-to-point rules on gloo, under MINIDIST_STRICT_P2P=1

`from minidist import comm` gives the names below; `comm.all_reduce_sum(x, group)` is how the techniques call it.
"""
from .backend import SimulatedLink, Work, cross_node_bytes, ring_backend
from .collectives import (DifferentiableAllGather, DifferentiableAllReduceSum, DifferentiableGather,
                          DifferentiableIdentity, DifferentiableReduceScatterSum, DifferentiableSplit, all_gather,
                          all_gather_backward, all_gather_cat, all_gather_into_, all_reduce, all_reduce_,
                          all_reduce_sum, broadcast, broadcast_, gather, identity, my_chunk, reduce_scatter,
                          reduce_scatter_into_, reduce_scatter_sum, split)
from .flight import flight_recorder
from .ledger import ByteLedger, CommRecord, group_name, name_group, record, ring_bytes
from .p2p import (DifferentiableAllToAll, P2POp, all_to_all, all_to_all_uneven, batch_isend_irecv, global_rank,
                  group_size, irecv, isend, recv, send)
from .ring import (AlphaBeta, chain_broadcast, cost_terms, fit_relative, ring_all_gather, ring_all_gather_,
                   ring_all_reduce, ring_exchange, ring_reduce_scatter, ring_reduce_scatter_, ring_step_time, time_op)

__all__ = [
    # collectives.py: plain (in-place, async) and differentiable
    "all_reduce_", "all_gather_into_", "reduce_scatter_into_", "broadcast_", "all_reduce_sum", "all_gather_cat",
    "reduce_scatter_sum", "broadcast", "my_chunk", "identity", "all_reduce", "all_gather", "all_gather_backward",
    "reduce_scatter", "split", "gather", "DifferentiableIdentity", "DifferentiableAllReduceSum",
    "DifferentiableAllGather", "DifferentiableReduceScatterSum", "DifferentiableSplit", "DifferentiableGather",
    # p2p.py
    "send", "recv", "isend", "irecv", "P2POp", "batch_isend_irecv", "all_to_all", "all_to_all_uneven",
    "DifferentiableAllToAll", "global_rank", "group_size",
    # ring.py
    "ring_exchange", "ring_reduce_scatter_", "ring_all_gather_", "ring_all_reduce", "ring_reduce_scatter",
    "ring_all_gather", "chain_broadcast", "cost_terms", "fit_relative", "AlphaBeta", "time_op", "ring_step_time",
    # ledger.py, backend.py, flight.py
    "ByteLedger", "CommRecord", "ring_bytes", "record", "name_group", "group_name", "SimulatedLink", "Work",
    "ring_backend", "cross_node_bytes", "flight_recorder",
]
