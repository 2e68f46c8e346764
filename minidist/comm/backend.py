"""Where a collective runs: handed to the process group's backend (gloo, NCCL), or run by minidist's own ring.

By default `minidist.comm` hands every collective to the backend, and the ledger *models* its bytes (ledger.py).

    with comm.ring_backend():
        ...                       # every collective of minidist.comm runs on minidist's ring (ring.py):
                                  # the ledger *counts* the bytes this rank really sends
    with comm.ring_backend(link=SimulatedLink(alpha=1e-3, bandwidth=100e6)):
        ...                       # ... and every message waits alpha + bytes / bandwidth before it leaves

Under the ring backend, collectives run on one communication thread per rank, in the order they were issued (the
role of a CUDA communication stream): an asynchronous collective returns a `Work` at once and the calling thread goes
on computing while the communication thread sends. The simulated link makes that visible on one machine, where
loopback is nearly free and communication otherwise competes with compute for the same cores: the delay is a sleep
on the communication thread, which uses no CPU, so compute proceeds exactly as it would beside a real network card.

Point-to-point messages, ring steps and all-to-all exchanges use different tags (under gloo), so a pipeline's
activations can never be taken for a step of a collective issued around them; user tags 1-15 are refused. (NCCL
ignores tags: there, only the order in which every rank issues its messages keeps them apart.)
"""
import math
import os
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import flight
from .ledger import open_ledgers, reporting_to

RING_TAG, ALL_TO_ALL_TAG = 1, 2  # tags of minidist's own messages (3: strict.py's acknowledgements); user messages use 0 or any tag >= RESERVED_TAGS
RESERVED_TAGS = 16


@dataclass(frozen=True)
class SimulatedLink:
    """A network link: each message costs `alpha` seconds plus its bytes over `bandwidth` (bytes per second).

    A two-level network: with `ranks_per_node` set, global ranks [k*ranks_per_node, (k+1)*ranks_per_node) share node
    k; a message between two nodes costs `inter_alpha` + bytes / `inter_bandwidth` instead (each message by its own
    two ends), and its bytes are counted in comm.cross_node_bytes()."""

    alpha: float = 0.0
    bandwidth: float = math.inf
    ranks_per_node: int | None = None
    inter_alpha: float = 0.0
    inter_bandwidth: float = math.inf

    def __post_init__(self):
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a non-negative number of seconds, got {self.alpha!r}")
        if not self.bandwidth > 0:
            raise ValueError(f"bandwidth must be positive (bytes per second), got {self.bandwidth!r}")
        if not (self.inter_alpha >= 0 and math.isfinite(self.inter_alpha)) or not self.inter_bandwidth > 0:
            raise ValueError(f"inter_alpha must be non-negative seconds and inter_bandwidth positive, got "
                             f"{self.inter_alpha!r}, {self.inter_bandwidth!r}")
        if self.ranks_per_node is not None and not (isinstance(self.ranks_per_node, int) and self.ranks_per_node > 0):
            raise ValueError(f"ranks_per_node must be a positive int or None, got {self.ranks_per_node!r}")

    def crosses(self, src: int | None, dst: int | None) -> bool:
        """Do global ranks src and dst sit on different nodes?"""
        return None not in (self.ranks_per_node, src, dst) and src // self.ranks_per_node != dst // self.ranks_per_node

    def seconds(self, nbytes: int, src: int | None = None, dst: int | None = None) -> float:
        if self.crosses(src, dst):
            return self.inter_alpha + nbytes / self.inter_bandwidth
        return self.alpha + nbytes / self.bandwidth


class Work:
    """Handle of an asynchronous communication: `wait()` blocks until it is done and returns its result.

    `completed_at` is the time.perf_counter() at which the communication finished (None until then), for timelines.
    """

    def __init__(self, result=None, *, future: Future | None = None, torch_work=None, entry=None):
        self._result, self._future, self._torch_work, self._entry = result, future, torch_work, entry
        self.completed_at = None if (future or torch_work) else time.perf_counter()
        if self.completed_at is not None:
            flight.complete(entry)
        self._watched = False
        if future is not None:
            future.add_done_callback(self._future_done)
        elif torch_work is not None and (device := _accelerator(result)) is not None:
            # NCCL marks a work's future completed when the work is *enqueued*: the completion (flight recorder,
            # timelines) comes from an event recorded after the collective on the device, polled by a watcher.
            self._watched = True
            _watcher().add(_stream_event(torch_work, device), self._mark_done)
        elif torch_work is not None:
            try:
                torch_work.get_future().then(self._torch_done)
            except RuntimeError:  # some works (e.g. on a one-rank group) have no future: timed at wait()
                pass

    def _mark_done(self) -> None:
        """The communication finished *successfully*: time it and complete its flight-recorder entry."""
        if self.completed_at is None:
            self.completed_at = time.perf_counter()
            flight.complete(self._entry)

    def _torch_done(self, fut) -> None:
        try:
            fut.value()  # raises if the collective failed: then it stays "entered" in the flight record
        except Exception:
            return
        self._mark_done()

    def _future_done(self, fut: Future) -> None:
        if fut.exception() is not None:
            return
        inner = fut.result()
        if isinstance(inner, Work):  # a message the communication thread posted: done when it is delivered
            if inner.completed_at is not None:
                self._mark_done()
            elif inner._future is not None:   # posted under MINIDIST_STRICT_P2P=1 (strict.py)
                inner._future.add_done_callback(lambda f: f.exception() is None and self._mark_done())
            elif inner._torch_work is not None:
                try:
                    inner._torch_work.get_future().then(lambda f: self._torch_done(f))
                except RuntimeError:
                    pass
        else:
            self._mark_done()

    def wait(self):
        if self._future is not None:
            self._result = self._future.result()  # re-raises what failed on the communication thread
            if isinstance(self._result, Work):      # a point-to-point message the thread posted without blocking
                self._result = self._result.wait()
        if self._torch_work is not None:
            self._torch_work.wait()   # on a GPU: the current stream waits for the collective, the host does not
        if not self._watched:         # watched: done when the device has run it, not when this returns
            self._mark_done()
        return self._result

    def is_completed(self) -> bool:
        if self._future is not None:
            if not self._future.done():
                return False
            inner = self._future.result()
            return not isinstance(inner, Work) or inner.is_completed()
        return self._torch_work is None or self._torch_work.is_completed()


def _accelerator(result) -> torch.device | None:
    """The accelerator a collective's result lives on, or None (CPU: gloo completes its futures when done)."""
    t = result[0] if isinstance(result, (list, tuple)) and result else result
    return t.device if torch.is_tensor(t) and t.device.type not in ("cpu", "meta") else None


_side_streams: dict = {}


def _stream_event(torch_work, device) -> torch.Event:
    """An event that completes once the collective has run: a side stream waits for the work (work.wait() makes the
    current stream wait, never the host) and the event is recorded there, so the compute stream waits for nothing."""
    side = _side_streams.setdefault((os.getpid(), str(device)), torch.Stream(device=device))
    with side:
        torch_work.wait()
        event = torch.Event(device=device)
        event.record(side)
    return event


class _Watcher:
    """One thread per process that polls the events of pending collectives and calls each one's `done` when it
    has completed on the device."""

    def __init__(self):
        self.pid, self.pending, self.lock = os.getpid(), [], threading.Lock()
        threading.Thread(target=self._loop, name="minidist-watcher", daemon=True).start()

    def add(self, event, done) -> None:
        with self.lock:
            self.pending.append((event, done))

    def _loop(self):
        while True:
            with self.lock:
                ready = [(e, d) for e, d in self.pending if e.query()]
                self.pending = [(e, d) for e, d in self.pending if all(e is not r for r, _ in ready)]
            for _, done in ready:
                done()
            time.sleep(0.0005)


_watchers: list = []


def _watcher() -> _Watcher:
    if not _watchers or _watchers[0].pid != os.getpid():   # threads do not survive fork
        _watchers[:] = [_Watcher()]
    return _watchers[0]


class _CommThread:
    """One thread that runs communication jobs in the order they were submitted."""

    def __init__(self):
        self.pid, self.jobs = os.getpid(), queue.SimpleQueue()
        threading.Thread(target=self._loop, name="minidist-comm", daemon=True).start()

    def _loop(self):
        while True:
            fn, ledgers, future = self.jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                with reporting_to(ledgers):
                    future.set_result(fn())
            except BaseException as e:  # surfaced by Work.wait() on the issuing thread
                future.set_exception(e)

    def submit(self, fn) -> Future:
        future = Future()
        self.jobs.put((fn, open_ledgers(), future))
        return future


_state = {"ring": False, "link": None, "thread": None, "crossed": 0}


def ring_active() -> bool:
    return _state["ring"]


def current_link() -> SimulatedLink | None:
    return _state["link"]


def simulate_message(nbytes: int, dst: int | None = None) -> None:
    """Hold a message of `nbytes` to global rank `dst` on the sender for as long as the simulated link would (no-op
    without one); count its bytes if it crosses nodes."""
    link = _state["link"]
    if link is not None and nbytes:
        src = dist.get_rank() if link.ranks_per_node is not None else None
        if link.crosses(src, dst):
            _state["crossed"] += nbytes
        time.sleep(link.seconds(nbytes, src, dst))


def cross_node_bytes() -> int:
    """Bytes this rank has sent across nodes under a two-level SimulatedLink (since the process started)."""
    return _state["crossed"]


def _thread() -> _CommThread:
    t = _state["thread"]
    if t is None or t.pid != os.getpid():  # threads do not survive fork: a forked rank starts its own
        t = _state["thread"] = _CommThread()
    return t


@contextmanager
def ring_backend(link: SimulatedLink | None = None):
    """Inside, minidist.comm runs every collective on minidist's own ring, with counted bytes (module docstring).

    All ranks must enter it together (collectives must run on the same algorithm on every rank). On leaving, every
    communication issued inside has finished.
    """
    previous = _state["ring"], _state["link"]
    _state["ring"], _state["link"] = True, link
    try:
        yield
    finally:
        drain()
        _state["ring"], _state["link"] = previous


def drain() -> None:
    """Wait until the communication thread has run everything submitted so far."""
    if _state["thread"] is not None and _state["thread"].pid == os.getpid():
        submit(lambda: None).wait()


def submit(fn, entry=None) -> Work:
    """Run fn() on the communication thread; the Work's result is what fn returns (waited on if it is a Work)."""
    return Work(future=_thread().submit(fn), entry=entry)


def run(on_ring, on_backend, async_op: bool, record: tuple):
    """Dispatch one collective, `record` = (op, tensor, group) for the flight recorder: under the ring backend
    on_ring() runs on the communication thread and returns the result; else on_backend(async_op) returns (result,
    torch work or None). Returns the result, or a Work."""
    entry = flight.enter(*record)
    if _state["ring"]:
        work = submit(on_ring, entry)
        return work if async_op else work.wait()
    result, torch_work = on_backend(async_op)
    if async_op:
        return Work(result, torch_work=torch_work, entry=entry)
    flight.complete(entry)
    return result
