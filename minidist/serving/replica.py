"""What every rank of a serving cluster runs (cluster.py starts the ranks and routes the requests).

Each rank builds the model with the same seed, parallelizes it over its replica's tensor-parallel group and runs a
continuous-batching Engine (batching.py) in a loop:

    leader:   new requests from its inbox (waiting up to HEARTBEAT seconds when idle)
    all:      the new requests broadcast over the replica's tp group (pickled), added to the engine in the same order
    all:      one engine step, in lockstep (the same slots, the same seeded samples, the same collectives)
    leader:   the step's progress, then the finished requests (or their error), into the outbox

An idle leader broadcasts an empty list after HEARTBEAT seconds anyway, so that its peers, blocked in the broadcast,
never reach the process-group timeout. A None from the inbox stops the loop on every rank of the replica. A request
the engine refuses fails alone (its error goes back with it): the loop goes on; so does one that fails in a step on
a replica of one rank. With tp > 1 an error in a step ends the rank (batching.py: its peers may be waiting inside a
collective), and with it the replica and the cluster. ("cancel", rid) from the inbox, broadcast like a request,
cancels request rid on every rank (its caller stopped waiting).
"""
import os
import pickle
import queue
import signal
import time

import torch
import torch.distributed as dist

from .. import comm
from ..launch import device
from ..mesh import Mesh
from .batching import Engine

HEARTBEAT = 0.5  # seconds an idle leader waits for a request before it lets its peers go round once more


def build_model(name: str):
    """A serving model with seed-0 random weights (the same on every rank), its tensor-parallel plan, its vocab.

    The output layer is untied from the embedding: a random model whose output layer *is* its embedding mostly
    repeats its last input token, which would make a poor demonstration."""
    from ..models import GPT, GPTConfig, build_llama
    from ..tensor_parallel.plans import GPT_PLAN, LLAMA_PLAN
    if name not in ("tiny-gpt", "tiny-llama"):
        raise ValueError(f"unknown model {name!r}; serve one of ['tiny-gpt', 'tiny-llama']")
    torch.manual_seed(0)
    if name == "tiny-gpt":
        return GPT(GPTConfig(tie_weights=False)).eval(), GPT_PLAN, 512
    return build_llama(tie_word_embeddings=False).eval(), LLAMA_PLAN, 512


def check_tp(name: str, tp: int) -> None:
    """ValueError, before any rank starts, when tensor-parallel size tp does not divide the model's sizes."""
    from ..tensor_parallel.plans import check_sizes, match_plan
    with torch.device("meta"):
        model, plan, _ = build_model(name)
    for module, style in match_plan(model, plan).items():
        check_sizes(module, model.get_submodule(module), style, tp)


def replica_rank(name: str, tp: int, replicas: int, slots: int, inboxes, outbox, close_in_ranks=()) -> int:
    """The loop every rank runs: receive new requests (the leader from its inbox, the others from the leader),
    add them, run one continuous-batching step, and (the leader) report what finished. Returns the steps run."""
    from ..tensor_parallel.plans import parallelize
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the server's to handle (blocked since the fork, too)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # launch ends a rank with SIGTERM, whatever the server set
    for fd in close_in_ranks:                      # the server's listening socket: a rank must not hold the port
        os.close(fd)
    mesh = Mesh.build(dp=replicas, tp=tp)
    replica, leader, group = mesh.local_rank("dp"), mesh.local_rank("tp") == 0, mesh.group("tp")
    model, plan, vocab = build_model(name)
    model = parallelize(model.to(device()), group, plan) if tp > 1 else model.to(device())
    engine = Engine(model, slots, vocab, lockstep=tp > 1)
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
            if isinstance(r, tuple):  # ("cancel", rid)
                engine.cancel(r[1])
                continue
            try:
                engine.add(r)
            except ValueError as e:  # checked by submit already; a request is refused alone, never the replica
                if leader:
                    outbox.put(("done", r.rid, [], None, replica, f"ValueError: {e}"))
        if engine.idle():
            continue
        start = time.perf_counter()
        finished = engine.step()
        if leader:  # the step's progress first: when a request's future resolves, its tokens are accounted for
            outbox.put(("step", replica, engine.tokens_last_step, len(engine.waiting), engine.tokens_last_step,
                        time.perf_counter() - start))
            for r in finished:
                outbox.put(("done", r.rid, r.output, r.first_token_at, replica, r.error))


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
