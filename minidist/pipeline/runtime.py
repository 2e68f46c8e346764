"""Executing a pipeline schedule on ranks: the actions of pipeline/schedule.py become compute and messages.

    stages = rank_stages(model, p, rank, v)                            # this rank's v chunks (pipeline/stages.py)
    pipe = PipelineRuntime(stages, one_f_one_b(p, m), hidden_size=model.cfg.n_embd, group=pp_group)
    loss = pipe.step(x, y)     # every rank passes the global batch; the loss on the last stage's rank, else None
    optimizer.step()           # over pipe.parameters(): the gradients are those of the mean loss over the batch

What an action does on pipeline rank r, for its stage s = stage_of(r, chunk) of S = v p (looped: chunk p + r; the
V: r for chunk 0, 2p - 1 - r for chunk 1, pipeline/actions.py):
  F  take the input (token ids at s = 0, else the activation received from stage s - 1), run the stage under
     autograd (the last stage also computes loss / m, so the gradients summed over the m micro-batches are those of
     the mean loss), send the output (b, T, C) to stage s + 1. Its activations stay saved for the backward.
  B  receive d loss / d output from stage s + 1 (the last stage starts from its loss), run the backward, send
     d loss / d input to stage s - 1. When the schedule has W, B computes only the input gradient (backward.py),
     unless its W comes right after it on this rank: then B runs the whole backward at once (one pass over the
     graph; split into B and W it walks it twice) and that W does nothing.
  W  compute the weight gradients B left for later; only then are the micro-batch's activations freed.

Messages follow a plan made before the step (pipeline/messages.py): between two actions a rank issues one batch
(comm.batch_isend_irecv) holding the send of what the last action produced and the receives due by then, in the
order of a clock shared by all ranks, so that NCCL, which runs a rank's messages in order, cannot hang. A rank
waits only for the receive its next action needs; `validate` proves the schedule itself has no cycle of such waits.
A sent tensor is held until the plan's clock says it has arrived (then its send is waited for, at no cost when the
ranks keep pace) and counted meanwhile: `memory.peak_messages`.

Bytes: every micro-batch crosses each of the S - 1 boundaries between consecutive stages twice (activation forward,
gradient backward), each a message of b T C values through comm.batch_isend_irecv (the ledger records every one):
2 m (v p - 1) per step over the ranks when looped; in the V, whose turn (stage p - 1 to p) stays inside the last
rank, 2 m (2p - 2) = 4 m (p - 1). Tied embeddings add one exchange of their gradient between the first and the last
rank (`sync_tied_grads`), not counted there; in the V both stages are on rank 0 and autograd adds them: none.

Measured, not assumed: `timeline` holds each action's compute interval (after its input arrived), and `memory`
follows every tensor autograd saves, from its forward until autograd frees it: its peak is the most activation bytes
this rank held at once. `action_seconds=(t_f, t_b, t_w)` pads every action to a fixed time (a sleep, which uses no
CPU, then a 2 ms spin), so that a timeline measures the schedule and the runtime, not how 4 ranks share 2 cores.
"""
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from .. import comm
from ..launch import device, synchronize
from ..memory import SavedActivations
from ..models import lm_loss
from .backward import backward_input
from .messages import plan, received_by, sent_by
from .schedule import Action, is_v, shape, splits_backward, stage_of
from .stages import check_placement, checked_schedule


class ActivationMemory:
    """Bytes held for backward on this rank right now, counted per storage, with their peak, and the number of
    (micro-batch, chunk) pairs holding any (`peak_in_flight`); apart, the bytes of sent messages not yet delivered
    (`peak_messages`)."""

    def __init__(self):
        self.live = self.peak = self.peak_in_flight = self.messages = self.peak_messages = 0
        self._refs, self._owners = Counter(), Counter()

    def hold_message(self, nbytes: int) -> Callable[[], None]:
        """Count an outgoing message's buffer; returns the function that releases it (once its send completed)."""
        self.messages += nbytes
        self.peak_messages = max(self.peak_messages, self.messages)

        def release():
            self.messages -= nbytes
        return release

    def hold(self, ptr: int, nbytes: int, owner) -> Callable[[], None]:
        """Count a saved storage for `owner`; returns the function that releases it."""
        if not self._refs[ptr]:
            self.live += nbytes
        self._refs[ptr] += 1
        self._owners[owner] += 1
        self.peak, self.peak_in_flight = max(self.peak, self.live), max(self.peak_in_flight, len(self._owners))

        def release():
            self._refs[ptr] -= 1
            if not self._refs[ptr]:
                del self._refs[ptr]
                self.live -= nbytes
            self._owners[owner] -= 1
            if not self._owners[owner]:
                del self._owners[owner]
        return release


class _Held:
    """A saved tensor as autograd keeps it: when autograd frees this, the tensor's bytes are released."""
    __slots__ = ("tensor", "release")

    def __init__(self, tensor, release):
        self.tensor, self.release = tensor, release

    def __del__(self):
        self.release()


class LiveActivations(SavedActivations):
    """SavedActivations (bytes saved inside the block, `.bytes`) that also reports each saved tensor's lifetime to
    an ActivationMemory, on behalf of `owner`."""

    def __init__(self, exclude, memory: ActivationMemory, owner):
        super().__init__(exclude)
        self.memory, self.owner = memory, owner
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack_live, self._unpack_live)

    def _pack_live(self, t):
        storage = self._pack(t).untyped_storage()
        if storage.data_ptr() in self._excluded:  # a parameter: not an activation
            return t
        # Hold a detached alias: the tensor itself may be this node's output, whose grad_fn points back at the node
        # holding us, a reference cycle through C++ that would never be freed.
        return _Held(t.detach(), self.memory.hold(storage.data_ptr(), storage.nbytes(), self.owner))

    @staticmethod
    def _unpack_live(held):
        return held.tensor if isinstance(held, _Held) else held


def _wait_until(deadline: float, spin: float = 0.002) -> None:
    """Sleep (no CPU) until `spin` seconds before the deadline, then spin: a sleeping process on a busy machine
    wakes up late, and that lateness would be measured as pipeline bubble."""
    if (left := deadline - time.perf_counter() - spin) > 0:   # read the clock once: twice, the sleep could go negative
        time.sleep(left)
    while time.perf_counter() < deadline:
        pass


class PipelineRuntime:
    """Runs `schedule` (one list of Actions per pipeline rank) on this rank's `stages` (chunk c = stages[c])."""

    def __init__(self, stages, schedule, hidden_size: int, group=None, loss_fn=lm_loss, action_seconds=None,
                 dtype: torch.dtype = torch.float32, track_memory: bool = True, timeline: bool = False,
                 v_shape: bool | None = None):
        schedule = checked_schedule(schedule, v_shape)   # v_shape: say it of a copy that lost its VSchedule type
        p, self.m, self.v = shape(schedule)
        self.p, self.rank, self.group = comm.group_size(group), dist.get_rank(group), group
        if p != self.p:
            raise ValueError(f"the schedule is for {p} pipeline ranks, but the group has {self.p}")
        if len(stages) != self.v:
            raise ValueError(f"the schedule runs {self.v} chunk(s) per rank, but this rank was given {len(stages)}")
        self.stages, self.actions, self.n_stages = list(stages), schedule[self.rank], p * self.v
        self.split, self.v_shape = splits_backward(schedule), is_v(schedule)
        check_placement(self.stages, self.rank, p, self.v_shape)
        self.batches = plan(schedule)[self.rank]  # batches[k]: the messages to issue before action k
        self._fused = {(a.microbatch, a.chunk) for a, b in zip(self.actions, self.actions[1:])  # B then its W: one
                       if a.kind == "B" and b == Action("W", a.microbatch, a.chunk)}         # fused backward
        self.hidden_size, self.dtype, self.loss_fn, self.action_seconds = hidden_size, dtype, loss_fn, action_seconds
        self.track_memory = track_memory  # the saved-tensor hooks cost time: off for benchmarks
        self.measure = timeline           # record self.timeline (so does action_seconds): a device sync per action
        self.tied = tied_parameters(self.stages)
        self.timeline, self.memory, self.saved_bytes = [], ActivationMemory(), {}

    def parameters(self):
        """This rank's parameters, each once (the optimizer's)."""
        return list({id(q): q for s in self.stages for q in s.parameters()}.values())

    def step(self, inputs: torch.Tensor, targets: torch.Tensor):
        """One training step's gradients: run the schedule, then add the tied embeddings' gradients."""
        loss = self.run_schedule(inputs, targets)
        self.sync_tied_grads()
        return loss

    def run_schedule(self, inputs: torch.Tensor, targets: torch.Tensor):
        """Run this rank's actions on the global batch cut into m micro-batches (gradients accumulate into .grad)."""
        if inputs.shape[0] % self.m:
            raise ValueError(f"a global batch of {inputs.shape[0]} does not cut into {self.m} equal micro-batches")
        # Own storage per micro-batch, so each one's saved token ids are its own bytes, not a view of the batch.
        self._x = [c.clone() for c in inputs.chunk(self.m)]
        self._y = [c.clone() for c in targets.chunk(self.m)]
        self._shape = (inputs.shape[0] // self.m, *inputs.shape[1:], self.hidden_size)   # (b, T, C)
        self._outbox, self._inbox, self._sending, self._graphs, self._weight_grads = {}, {}, {}, {}, {}
        self.timeline, self.memory, self.saved_bytes, losses = [], ActivationMemory(), {}, []
        for a, batch in zip(self.actions, self.batches):
            self._exchange(batch)
            if a.kind == "F":
                losses += self._forward(a)
            elif a.kind == "B":
                self._backward(a)
            else:
                with self._timed(a):
                    self._weight_grads.pop((a.microbatch, a.chunk))()
                del self._graphs[(a.microbatch, a.chunk)]  # the micro-batch's activations are freed here
        self._exchange(self.batches[-1])
        self._free_sent(list(self._sending))
        return sum(losses) if losses else None

    def _forward(self, a: Action) -> list:
        s, key = stage_of(self.rank, a.chunk, self.p, self.v_shape), (a.microbatch, a.chunk)
        x = self._x[a.microbatch] if s == 0 else self._receive(a)
        x = x if s == 0 else x.requires_grad_()                                 # (b, T) ids or (b, T, C)
        tracker = LiveActivations(self.stages[a.chunk], self.memory, key) if self.track_memory else nullcontext()
        with self._timed(a), tracker:
            y = self.stages[a.chunk](x)
            if s == self.n_stages - 1:
                y = self.loss_fn(y, self._y[a.microbatch]) / self.m
        if self.track_memory:
            self.saved_bytes[key] = tracker.bytes
        self._graphs[key] = (x if s > 0 else None, y)
        if s < self.n_stages - 1:
            self._send(y.detach(), a)
            return []
        return [y.detach()]

    def _backward(self, a: Action) -> None:
        s, key = stage_of(self.rank, a.chunk, self.p, self.v_shape), (a.microbatch, a.chunk)
        grad = None if s == self.n_stages - 1 else self._receive(a)
        x, y = self._graphs[key] if self.split else self._graphs.pop(key)
        with self._timed(a):
            if self.split and key not in self._fused:
                dx, self._weight_grads[key] = backward_input(y, grad, x, list(self.stages[a.chunk].parameters()))
            else:
                torch.autograd.backward(y, grad)   # frees the saved activations as it goes
                dx = None if x is None else x.grad
                self._weight_grads[key] = lambda: None   # a fused backward's W (if any): already done
        if s > 0:
            self._send(dx, a)

    @contextmanager
    def _timed(self, a: Action):
        """Record the action's compute interval; with action_seconds, pad it to its fixed length first. Only when
        measuring: reading a clock needs a device sync, which would stop compute overlapping the messages."""
        if self.action_seconds is None and not self.measure:
            yield
            return
        start = time.perf_counter()
        yield
        if self.action_seconds is not None:
            t_f, t_b, t_w = self.action_seconds
            seconds = {"F": t_f, "B": t_b if self.split else t_b + t_w, "W": t_w}[a.kind] / self.v
            synchronize()
            _wait_until(start + seconds)
        synchronize()
        self.timeline.append((a, start, time.perf_counter()))

    def _send(self, t: torch.Tensor, a: Action) -> None:
        """Leave what `a` produced for the next batch (or, between two chunks of this rank, for its next chunk)."""
        message = sent_by(a, self.rank, self.p, self.n_stages, self.v_shape)
        self._outbox[message] = t.detach().contiguous()

    def _receive(self, a: Action) -> torch.Tensor:
        """The input of `a`: its receive was posted in this or an earlier batch; wait for it now."""
        message = received_by(a, self.rank, self.p, self.n_stages, self.v_shape)
        if message.src == self.rank:  # consecutive stages on one rank (p = 1, the V's turn): no message
            return self._outbox.pop(message)
        return self._inbox.pop(message).wait()

    def _exchange(self, batch) -> None:
        """Issue one batch of the plan: first wait for (and free) the sends it says have arrived, then post its sends
        (each tensor held, and counted in memory.messages, until then) and its receives."""
        self._free_sent(batch.delivered)
        ops = []
        for op in batch.ops:
            if op.send:
                ops.append(comm.P2POp(comm.isend, self._outbox.pop(op.message), op.peer, self.group))
            else:
                buffer = torch.empty(self._shape, dtype=self.dtype, device=device())
                ops.append(comm.P2POp(comm.irecv, buffer, op.peer, self.group))
        for op, p2p, work in zip(batch.ops, ops, comm.batch_isend_irecv(ops)):
            if op.send:
                self._sending[op.message] = work, self.memory.hold_message(p2p.tensor.nbytes)
            else:
                self._inbox[op.message] = work

    def _free_sent(self, messages) -> None:
        for message in messages:
            work, release = self._sending.pop(message)
            work.wait()
            release()

    def sync_tied_grads(self) -> None:
        if not self.v_shape:   # in the V the first and the last stage are both on rank 0: autograd added them
            sync_tied_grads(self.tied, self.group)


def tied_parameters(stages) -> list:
    """The parameters of `stages` tied between the first and the last stage (each once)."""
    return list({id(t): t for s in stages for t in getattr(s, "tied", [])}.values())


def sync_tied_grads(tied: list, group=None) -> None:
    """Add the gradients of parameters tied between the first stage (rank 0) and the last (rank p - 1), on both."""
    p, rank = comm.group_size(group), dist.get_rank(group)
    if p == 1 or not tied:   # one rank: its stages share the parameter and autograd already added the two parts
        return
    peer = p - 1 if rank == 0 else 0
    mine = [(t.grad if t.grad is not None else torch.zeros_like(t)).contiguous() for t in tied]
    theirs = [torch.empty_like(g) for g in mine]
    ops = [op for g, h in zip(mine, theirs) for op in (comm.P2POp(comm.isend, g, peer, group),
                                                       comm.P2POp(comm.irecv, h, peer, group))]
    for work in comm.batch_isend_irecv(ops):   # one batch each way: two plain sends could wait for each other
        work.wait()
    for t, g, h in zip(tied, mine, theirs):
        t.grad = g + h if rank == 0 else h + g   # first + last on both ranks: bitwise equal
