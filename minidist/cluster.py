"""Replicas of a model on ranks, fed by a router: what `python -m minidist serve` runs behind its HTTP endpoint.

    with Cluster("tiny-llama", tp=2, replicas=2) as cluster:     # 4 ranks: Mesh.build(dp=2, tp=2)
        result = cluster.submit(prompt_ids, max_new_tokens=16).result()
        result.output                                           # the generated token ids

R data-parallel replicas, each tensor-parallel over tp ranks: R * tp processes that minidist.launch starts from a
thread of this process. Requests travel through queues:

    submit --(balancer picks replica r)--> inbox[r] --> the replica's first rank (its leader)
        leader --broadcast over the replica's tp group--> every rank of the replica adds the same new requests
        every rank runs the same continuous-batching step (batching.Engine) on its shard of the model
        leader --outbox--> finished requests, batch sizes --> the future returned by submit resolves

An idle leader waits at most HEARTBEAT seconds for a request, then broadcasts an empty list anyway, so that its peers,
blocked in the broadcast, never reach the process-group timeout. close() sends every leader a stop, the ranks leave
their loop and return, launch ends them cleanly; if this process dies, the kernel ends the ranks (launch asks it to).
"""
import itertools
import multiprocessing as mp
import os
import pickle
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import comm
from .balancer import make_balancer
from .batching import Engine, Request
from .inference import check_request, context_length
from .launch import device, launch
from .mesh import Mesh

HEARTBEAT = 0.5  # seconds an idle leader waits for a request before it lets its peers go round once more


def build_model(name: str):
    """A serving model with seed-0 random weights (the same on every rank), its tensor-parallel plan, its vocab.

    The output layer is untied from the embedding: a random model whose output layer *is* its embedding mostly
    repeats its last input token, which would make a poor demonstration."""
    from .models import GPT, GPTConfig, build_llama
    from .tp_plans import GPT_PLAN, LLAMA_PLAN
    if name not in ("tiny-gpt", "tiny-llama"):
        raise ValueError(f"unknown model {name!r}; serve one of ['tiny-gpt', 'tiny-llama']")
    torch.manual_seed(0)
    if name == "tiny-gpt":
        return GPT(GPTConfig(tie_weights=False)).eval(), GPT_PLAN, 512
    return build_llama(tie_word_embeddings=False).eval(), LLAMA_PLAN, 512


def check_tp(name: str, tp: int) -> None:
    """ValueError, before any rank starts, when tensor-parallel size tp does not divide the model's sizes."""
    from .tp_plans import check_sizes, match_plan
    with torch.device("meta"):
        model, plan, _ = build_model(name)
    for module, style in match_plan(model, plan).items():
        check_sizes(module, model.get_submodule(module), style, tp)


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
                 balancer: str = "least-tokens", listener=None, start_timeout: float = 120):
        for label, value in (("tp", tp), ("replicas", replicas), ("slots", slots)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        check_tp(name, tp)
        with torch.device("meta"):
            model, _, self.vocab_size = build_model(name)
        self.name, self.tp, self.replicas, self.context = name, tp, replicas, context_length(model)
        self.balancer, self.listener = make_balancer(balancer), listener
        self.outstanding, self.pending, self.pids = [0] * replicas, {}, []
        self.lock, self.ids, self.error = threading.Lock(), itertools.count(), None
        if name == "tiny-llama":  # imported once here: the forked ranks inherit it
            import transformers.models.llama.modeling_llama  # noqa: F401
        ctx = mp.get_context("fork")
        self.inboxes, self.outbox = [ctx.Queue() for _ in range(replicas)], ctx.Queue()
        self._ranks = threading.Thread(target=self._run, args=(slots,), daemon=True, name="minidist-ranks")
        self._ranks.start()
        self._wait_ready(start_timeout)
        self._reader = threading.Thread(target=self._read, daemon=True, name="minidist-outbox")
        self._reader.start()

    def _run(self, slots: int) -> None:
        try:
            launch(replica_rank, self.replicas * self.tp, self.name, self.tp, self.replicas, slots, self.inboxes,
                   self.outbox, timeout=60)
        except BaseException as e:  # a rank failed: every pending request fails with it
            self.error = e
        finally:
            self.outbox.put(("closed",))

    def _wait_ready(self, timeout: float) -> None:
        """Read the outbox here (no other thread yet) until every rank reported its pid and every leader is ready."""
        ready, deadline = 0, time.time() + timeout
        while ready < self.replicas or len(self.pids) < self.replicas * self.tp:
            try:
                msg = self.outbox.get(timeout=max(0.01, deadline - time.time()))
            except queue.Empty:
                self.close()
                raise RuntimeError(f"the {self.replicas * self.tp} ranks did not start within {timeout} s") from None
            if msg[0] == "closed":
                raise RuntimeError(f"the ranks failed while starting: {self.error}")
            ready += msg[0] == "ready"
            if msg[0] == "pid":
                self.pids.append(msg[2])

    def submit(self, input_ids: list[int], max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> Future:
        """Route one request to a replica; the Future resolves to a Result (ValueError at once for a bad request)."""
        check_request(len(input_ids), max_new_tokens, temperature, self.context)
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in input_ids):
            raise ValueError(f"token ids must be integers in [0, {self.vocab_size})")
        if self.error is not None or not self._ranks.is_alive():
            raise RuntimeError(f"the cluster is not running: {self.error}")
        future, cost = Future(), len(input_ids) + max_new_tokens
        with self.lock:
            replica, rid = self.balancer.pick(self.outstanding), next(self.ids)
            self.outstanding[replica] += cost
            self.pending[rid] = (future, replica, cost, len(input_ids), time.time())
        if self.listener:
            self.listener.submitted(replica, len(input_ids))
        self.inboxes[replica].put(Request(rid, list(input_ids), max_new_tokens, float(temperature), int(seed)))
        return future

    def _read(self) -> None:
        while True:
            msg = self.outbox.get()
            if msg[0] == "closed":
                break
            if msg[0] == "step":
                _, replica, batch, waiting, generated = msg
                with self.lock:
                    self.outstanding[replica] -= generated  # tokens done: the work left shrinks every step
                if self.listener:
                    self.listener.step(replica, batch, waiting)
            if msg[0] != "done":
                continue
            _, rid, output, first, replica = msg
            with self.lock:
                future, replica, cost, prompt, submitted = self.pending.pop(rid)
                self.outstanding[replica] -= cost - len(output)  # the rest: its prompt (its tokens went step by step)
            result = Result(rid, output, replica, prompt, submitted, first or time.time(), time.time())
            if self.listener:
                self.listener.finished(result)
            future.set_result(result)
        with self.lock:
            for future, *_ in self.pending.values():
                future.set_exception(RuntimeError(f"the cluster stopped: {self.error or 'closed'}"))
            self.pending.clear()

    def queue_depth(self) -> list[int]:
        """Requests routed to each replica and not finished yet."""
        with self.lock:
            return [sum(1 for _, r, *_ in self.pending.values() if r == k) for k in range(self.replicas)]

    def close(self, timeout: float = 60) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        self._ranks.join(timeout)
        if getattr(self, "_reader", None):
            self._reader.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def replica_rank(name: str, tp: int, replicas: int, slots: int, inboxes, outbox) -> int:
    """The loop every rank runs: receive new requests (the leader from its inbox, the others from the leader),
    add them, run one continuous-batching step, and (the leader) report what finished. Returns the steps run."""
    from .tp_plans import parallelize
    mesh = Mesh.build(dp=replicas, tp=tp)
    replica, leader, group = mesh.local_rank("dp"), mesh.local_rank("tp") == 0, mesh.group("tp")
    model, plan, vocab = build_model(name)
    model = parallelize(model.to(device()), group, plan) if tp > 1 else model.to(device())
    engine = Engine(model, slots, vocab)
    outbox.put(("pid", dist.get_rank(), os.getpid()))
    if leader:
        outbox.put(("ready", replica))
    while True:
        new = _next_requests(inboxes[replica], engine.idle()) if leader else None
        if tp > 1:
            new = _broadcast_object(new, group)
        if new is None:
            return engine.steps
        for r in new:
            engine.add(r)
        if engine.idle():
            continue
        finished = engine.step()
        if leader:  # the step's progress first: when a request's future resolves, its tokens are accounted for
            outbox.put(("step", replica, engine.batch_sizes[-1], len(engine.waiting), engine.tokens_last_step))
            for r in finished:
                outbox.put(("done", r.rid, r.output, r.first_token_at, replica))


def _next_requests(inbox, idle: bool):
    """New requests from the inbox (waiting up to HEARTBEAT for the first when idle); None means stop."""
    new = []
    try:
        item = inbox.get(timeout=HEARTBEAT) if idle else inbox.get_nowait()
        while True:
            if item is None:
                return None
            new.append(item)
            item = inbox.get_nowait()
    except queue.Empty:
        return new


def _broadcast_object(obj, group):
    """obj on group rank 0, pickled and broadcast (its length, then its bytes) to the others; returned on all."""
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8) if dist.get_rank(group) == 0 \
        else torch.empty(0, dtype=torch.uint8)
    size = comm.broadcast(torch.tensor([payload.numel()], device=device()), 0, group)
    data = payload.to(device()) if payload.numel() else torch.empty(int(size), dtype=torch.uint8, device=device())
    return pickle.loads(comm.broadcast(data, 0, group).cpu().numpy().tobytes())
