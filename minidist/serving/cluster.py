"""Replicas of a model on ranks, fed by a router: what `python -m minidist serve` runs behind its HTTP endpoint.

    with Cluster("tiny-llama", tp=2, replicas=2) as cluster:     # 4 ranks: Mesh.build(dp=2, tp=2)
        result = cluster.submit(prompt_ids, max_new_tokens=16).result()
        result.output                                           # the generated token ids

R data-parallel replicas, each tensor-parallel over tp ranks: R * tp processes that minidist.launch starts from a
thread of this process, each running replica.py's loop. Requests travel through queues:

    submit --(balancer picks replica r)--> inbox[r] --> the replica's first rank (its leader)
        leader --broadcast over the replica's tp group--> every rank of the replica adds the same new requests
        every rank runs the same continuous-batching step (batching.Engine) on its shard of the model
        leader --outbox--> step progress, finished requests --> the future returned by submit resolves

close() sends every leader a stop, the ranks leave their loop and return, launch ends them cleanly; if this process
dies, the kernel ends the ranks (launch asks it to).

Limits. With `max_waiting`, a replica holds at most slots + max_waiting requests (running or waiting for a slot):
submit routes to one with room, and when none has any raises ClusterBusy at once (the server answers 429), rather
than queueing without bound. A request whose future is cancelled (its caller stopped waiting: asyncio.wait_for's
timeout cancels it) is cancelled on its replica, which stops generating it and frees its slot.

Failures. A request that fails on the ranks (its prefill or its decoding step raised) fails alone on a replica of one
rank: its future raises RequestError with the message, and the replica goes on. On a tensor-parallel replica the
same error is a replica failure (batching.py says why), handled as a dead rank is: a rank that dies ends them all
(launch ends every rank when one fails, and the replicas share one launch): every pending future raises
ClusterDown, later submits too, `running` turns False and `on_stop` is called, so that a server can report it and
exit (its supervisor restarts it; app.py).
The ranks block SIGINT: Ctrl-C in a terminal reaches the whole process group, and only this process should decide.
"""
import itertools
import multiprocessing as mp
import queue
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from multiprocessing.connection import wait as mp_wait

import torch

from ..launch import launch
from .balancer import least_outstanding_tokens, make_balancer
from .batching import CANCELLED, Request
from .inference import check_request, context_length
from .replica import build_model, check_tp, replica_rank  # noqa: F401  (build_model: the model served)


class RequestError(RuntimeError):
    """The request failed on its replica (the message says why); the cluster goes on serving."""


class ClusterDown(RuntimeError):
    """The ranks have stopped (closed, or one of them failed): nothing can be served."""


class ClusterBusy(RuntimeError):
    """Every replica holds as many requests as it may (slots + max_waiting): try again later."""


@dataclass
class Result:
    rid: int
    output: list[int]
    replica: int
    prompt_tokens: int
    submitted_at: float
    first_token_at: float
    finished_at: float


class Cluster:
    """`replicas` copies of model `name`, each on `tp` ranks, each batching continuously over `slots` sequences."""

    def __init__(self, name: str = "tiny-llama", tp: int = 1, replicas: int = 1, slots: int = 8,
                 balancer: str = "least-tokens", listener=None, start_timeout: float = 120, on_stop=None,
                 close_in_ranks: tuple[int, ...] = (), max_waiting: int | None = None):
        for label, value in (("tp", tp), ("replicas", replicas), ("slots", slots)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        if max_waiting is not None and (not isinstance(max_waiting, int) or max_waiting < 0):
            raise ValueError(f"max_waiting must be a non-negative integer or None, got {max_waiting!r}")
        self.limit = None if max_waiting is None else slots + max_waiting  # requests a replica may hold
        check_tp(name, tp)
        with torch.device("meta"):
            model, _, self.vocab_size = build_model(name)
        self.name, self.tp, self.replicas, self.context = name, tp, replicas, context_length(model)
        self.balancer, self.listener = make_balancer(balancer), listener
        self.outstanding, self.pending, self.pids, self.held = [0] * replicas, {}, [], [0] * replicas
        self.lock, self.ids, self.error, self.closed, self.on_stop = threading.Lock(), itertools.count(), None, False, \
            on_stop
        self.tokens, self.steps, self.busy_seconds = [0] * replicas, [0] * replicas, [0.0] * replicas  # per replica
        if name == "tiny-llama":  # imported once here: the forked ranks inherit it
            import transformers.models.llama.modeling_llama  # noqa: F401
        ctx = mp.get_context("fork")
        self.inboxes, self.outbox = [ctx.Queue() for _ in range(replicas)], ctx.Queue()
        self._stopped_r, self._stopped_w = ctx.Pipe(duplex=False)  # the ranks have ended (from this process only)
        self._ranks = threading.Thread(target=self._run, args=(slots, close_in_ranks), daemon=True,
                                       name="minidist-ranks")
        self._ranks.start()
        try:
            self._wait_ready(start_timeout)
        except BaseException:  # Ctrl-C, a timeout, a rank that failed: stop whatever started
            self.close()
            raise
        self._reader = threading.Thread(target=self._read, daemon=True, name="minidist-outbox")
        self._reader.start()

    def _run(self, slots: int, close_in_ranks) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # this thread forks the ranks: they inherit it
        try:
            launch(replica_rank, self.replicas * self.tp, self.name, self.tp, self.replicas, slots, self.inboxes,
                   self.outbox, close_in_ranks, timeout=60)
        except BaseException as e:  # a rank failed: every pending request fails with it
            self.error = e
        finally:  # not through the outbox: a rank killed while it wrote there holds the outbox's lock for good
            self._stopped_w.send_bytes(b"closed")

    def _wait_ready(self, timeout: float) -> None:
        """Read the outbox here (no other thread yet) until every rank reported its pid and every leader is ready."""
        ready, deadline = 0, time.time() + timeout
        while ready < self.replicas or len(self.pids) < self.replicas * self.tp:
            msg = self._next_message(timeout=max(0.01, deadline - time.time()))
            if msg is None:
                raise ClusterDown(f"the {self.replicas * self.tp} ranks did not start within {timeout} s")
            if msg[0] == "closed":
                self.closed = True
                raise ClusterDown(f"the ranks failed while starting: {self.error}")
            ready += msg[0] == "ready"
            if msg[0] == "pid":
                self.pids.append(msg[2])

    @property
    def running(self) -> bool:
        """True while the ranks serve (False once closed, or once a rank failed)."""
        return not self.closed and self.error is None and self._ranks.is_alive()

    def submit(self, input_ids: list[int], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
               arrived_at: float | None = None) -> Future:
        """Route one request to a replica; the Future resolves to a Result, or raises RequestError (it failed on
        its replica) or ClusterDown. ValueError at once for a bad request; ClusterDown at once if the ranks stopped;
        ClusterBusy at once if every replica is full. `arrived_at` (time.time() when the request reached the server,
        default now): its latency counts from there. Cancelling the Future cancels the request on its replica."""
        check_request(len(input_ids), max_new_tokens, temperature, self.context, seed)
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in input_ids):
            raise ValueError(f"token ids must be integers in [0, {self.vocab_size})")
        future, cost = Future(), len(input_ids) + max_new_tokens
        with self.lock:  # the reader's last sweep takes the lock too: a request is either swept or refused here
            if not self.running:
                raise ClusterDown(f"the cluster is not running: {self.error or 'closed'}")
            replica, rid = self._route(), next(self.ids)
            self.outstanding[replica] += cost
            self.held[replica] += 1
            self.pending[rid] = (future, replica, cost, len(input_ids), arrived_at or time.time())
        if self.listener:
            self.listener.submitted(replica, len(input_ids))
        self.inboxes[replica].put(Request(rid, list(input_ids), max_new_tokens, float(temperature), int(seed)))
        future.add_done_callback(lambda f: f.cancelled() and self.inboxes[replica].put(("cancel", rid)))
        return future

    def _route(self) -> int:
        """The balancer's pick, or, if that replica is full, the least loaded one with room (lock held)."""
        room = [self.limit is None or held < self.limit for held in self.held]
        if not any(room):
            raise ClusterBusy(f"every replica holds {self.limit} requests (its slots and max_waiting), try again "
                              f"later")
        replica = self.balancer.pick(self.outstanding)
        return replica if room[replica] else least_outstanding_tokens(self.outstanding, room)

    def _read(self) -> None:
        """The outbox reader: progress and finished requests, until the ranks stop. A message that cannot be
        handled is reported and skipped: this thread must outlive every request."""
        while True:
            msg = self._next_message()
            if msg[0] == "closed":
                break
            try:
                self._handle(msg)
            except Exception:  # noqa: BLE001
                print(f"minidist cluster: could not handle {msg[:2]}:\n{traceback.format_exc()}", file=sys.stderr)
        with self.lock:
            self.closed = True
            failed, self.pending = list(self.pending.values()), {}
        down = ClusterDown(f"the cluster stopped: {self.error or 'closed'}")
        for future, replica, *_ in failed:
            _resolve(future, error=down)
            if self.listener:
                self.listener.failed_request(replica)
        if self.on_stop:
            self.on_stop(self.error)

    def _next_message(self, timeout: float | None = None):
        """The next message of the ranks from the outbox; ("closed",) once the ranks have ended and everything they
        wrote has been read; None after `timeout` seconds without either. The end of the ranks does not travel
        through the outbox: the ranks share its write lock, and one killed (SIGKILL) while its feeder thread held
        that lock leaves it held for good, so that nothing more could be put there, "closed" included."""
        stopped = False
        while True:
            try:
                return self.outbox.get_nowait()
            except queue.Empty:
                if stopped:  # launch has ended every rank: whatever they wrote is in the pipe, and has been read
                    return ("closed",)
            ready = mp_wait([self.outbox._reader, self._stopped_r], timeout)  # noqa: SLF001 (the queue's pipe end)
            if not ready:
                return None
            stopped = self._stopped_r in ready

    def _handle(self, msg) -> None:
        if msg[0] == "step":
            _, replica, batch, waiting, generated, seconds = msg
            with self.lock:
                self.outstanding[replica] -= generated  # tokens done: the work left shrinks every step
                self.tokens[replica] += generated
                self.steps[replica] += 1
                self.busy_seconds[replica] += seconds
            if self.listener:
                self.listener.step(replica, batch, waiting)
        if msg[0] != "done":
            return
        _, rid, output, first, replica, error = msg
        with self.lock:
            future, replica, cost, prompt, submitted = self.pending.pop(rid)
            self.outstanding[replica] -= cost - len(output)  # the rest: its prompt (its tokens went step by step)
            self.held[replica] -= 1
        if error == CANCELLED:  # nobody waits for it: its future is cancelled already
            if self.listener:
                self.listener.cancelled(replica)
            return
        if error is not None:
            if self.listener:
                self.listener.failed_request(replica)
            _resolve(future, error=RequestError(f"the request failed on replica {replica}: {error}"))
            return
        result = Result(rid, output, replica, prompt, submitted, first or time.time(), time.time())
        if self.listener:
            self.listener.finished(result)
        _resolve(future, result)

    def queue_depth(self) -> list[int]:
        """Requests routed to each replica and not finished yet."""
        with self.lock:
            return [sum(1 for _, r, *_ in self.pending.values() if r == k) for k in range(self.replicas)]

    def close(self, timeout: float = 60) -> None:
        """Stop the ranks (they finish their current step) and wait for them; pending requests raise ClusterDown."""
        for inbox in self.inboxes:
            inbox.put(None)
        self._ranks.join(timeout)
        if getattr(self, "_reader", None):
            self._reader.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _resolve(future: Future, value=None, error: BaseException | None = None) -> None:
    """Resolve a request's future, unless its caller cancelled it (asyncio.wrap_future does when the awaiting task
    is cancelled, by a timeout or a shutdown): nobody waits for that one any more."""
    try:
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
    except InvalidStateError:
        pass
