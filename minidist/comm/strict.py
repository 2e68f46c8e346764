"""NCCL's point-to-point rules on gloo: set MINIDIST_STRICT_P2P=1 and a pattern that deadlocks on NCCL deadlocks here.

Gloo buffers a send: `isend` returns at once and the message waits at the receiver until a `recv` takes it. NCCL
does not, for messages larger than its small eager buffer (PLATFORM.md, pitfall 9):
  1. the operations between one pair of ranks run in the order they were posted (one stream per pair), unless they
     were posted together in one `batch_isend_irecv` (one NCCL group: its operations progress together);
  2. a send completes only once its matching receive is executing (a rendezvous: the data has nowhere to wait).
So `isend(x, peer)` then `recv(y, peer)` on two ranks that each do it (a ring at N = 2) deadlocks on NCCL: each
rank's receive waits behind its own send, which waits for the other rank's receive.

Under MINIDIST_STRICT_P2P=1 minidist's point-to-point layer (p2p.py, and the ring steps of ring.py) obeys both rules:
  * every batch (an unbatched isend or irecv is a batch of one) runs on its own thread, once every batch posted
    before it with any of its peers has finished: rule 1, with one "stream" per (group, peer);
  * each receive first sends its sender a one-byte acknowledgement (tag ACK_TAG), and a send is done only when that
    acknowledgement has arrived: rule 2.
A deadlock then ends when gloo's timeout expires on the waiting acknowledgement; the failure propagates to every
operation queued behind it, and the flight recorder's diagnosis (diagnose.py) names the ranks waiting in send and
recv, and says that the pair must be batched. Off (the default), nothing here runs.
"""
import os
import threading
from concurrent.futures import Future
from concurrent.futures import wait as wait_all

import torch
import torch.distributed as dist

ACK_TAG = 3  # one of minidist's reserved tags (backend.RESERVED_TAGS)


def active() -> bool:
    return os.environ.get("MINIDIST_STRICT_P2P", "0") == "1"


_tails: dict = {}   # (process id, id(group), global peer) -> Future of the last batch posted with that peer
_lock = threading.Lock()


def _run(ops: list) -> None:
    """Execute one batch of dist.P2POp: acknowledge every receive, move the data, wait for every acknowledgement."""
    works = [dist.isend(torch.ones(1, dtype=torch.uint8), op.peer, group=op.group, tag=ACK_TAG)
             for op in ops if op.op is dist.irecv]              # "my receive is executing"
    works += [dist.isend(op.tensor, op.peer, group=op.group, tag=op.tag) if op.op is dist.isend
              else dist.irecv(op.tensor, op.peer, group=op.group, tag=op.tag) for op in ops]
    works += [dist.irecv(torch.empty(1, dtype=torch.uint8), op.peer, group=op.group, tag=ACK_TAG)
              for op in ops if op.op is dist.isend]             # a send completes when its receive runs
    for w in works:
        w.wait()


def post(ops: list) -> Future:
    """Post a batch of dist.P2POp (global peers, one group) under NCCL's rules; the Future is done when all are."""
    done = Future()
    with _lock:
        keys = {(os.getpid(), id(ops[0].group), op.peer) for op in ops}
        before = [_tails[k] for k in keys if k in _tails]
        _tails.update((k, done) for k in keys)

    def execute():
        wait_all(before)
        failed = next((f.exception() for f in before if f.exception() is not None), None)
        if failed is not None:   # an earlier operation with this peer never finished: neither can this one
            done.set_exception(RuntimeError(f"queued behind a point-to-point operation that failed: {failed}"))
            return
        try:
            _run(ops)
            done.set_result(None)
        except BaseException as e:
            done.set_exception(e)
    threading.Thread(target=execute, name="minidist-p2p", daemon=True).start()
    return done


def each(done: Future, results: list) -> list[Future]:
    """One Future per operation of a batch, resolving to that operation's result when the batch is done."""
    futures = [Future() for _ in results]

    def finish(f: Future):
        for out, result in zip(futures, results):
            out.set_exception(f.exception()) if f.exception() is not None else out.set_result(result)
    done.add_done_callback(finish)
    return futures


def exchange(ops: list) -> None:
    """Run a batch of dist.P2POp to completion: under NCCL's rules when active(), else as torch.distributed does."""
    if not ops:
        return
    if active():
        post(ops).result()
        return
    for w in dist.batch_isend_irecv(ops):
        w.wait()
