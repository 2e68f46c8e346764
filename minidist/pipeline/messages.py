"""The messages of a pipeline schedule, planned before any rank runs: which batch of point-to-point operations each
send and each receive belongs to, so that NCCL runs them without hanging.

Why a plan is needed. Under gloo a message finds its receive whatever else is pending. NCCL instead runs a rank's
point-to-point operations in the order they were issued, one batch (`comm.batch_isend_irecv`, a NCCL group) after
the other, and a send may not finish before its receive is posted (large messages never do). So two ranks that
each send something, then post the receive of what the other sent, wait for each other forever: each receive sits
behind its rank's own unfinished send. It happens where activations and gradients cross on one link (interleaving
on 2 ranks, as soon as backwards start) even when every receive is posted just before it is needed; and posting
every receive one action ahead, as this runtime first did, hangs GPipe at once: rank 0 would post the receive of
the first gradient before sending its second activation, which the gradient needs.

The plan gives every message one moment on a clock that all ranks share, then cuts each rank's messages into
batches between its computations:

  1. play the schedule on a lockstep clock (`simulate(schedule, 1, 1, 1)`: each action as soon as its input is
     there, a backward twice as long as a forward);
  2. a message leaves when the action producing it ends, at tick t. Its send goes in the sender's next batch (the
     one before its next action); its receive in the receiver's batch before the first action that starts at tick
     t or later: just before the action that needs it when the receiver is waiting for it, a little earlier when
     the receiver is still busy (the message can then land while it computes);
  3. each batch between two computations is one comm.batch_isend_irecv; a rank waits only for the receive its next
     action needs (under NCCL, for that receive's whole batch);
  4. a sent tensor is kept until its send completes (gloo and NCCL's large messages wait for the receive). The
     sender waits for it, and frees it, after its first action that starts once the receiving action has started
     (`Batch.delivered`): on the clock the message has arrived by then, so the wait costs nothing when the ranks
     keep pace, and memory holds a few messages, not all 2m of a step.

Why it cannot hang: every rank issues its messages in the order of the one clock, so the oldest message not yet
delivered always has both of its ends in batches whose earlier batches are all done; it gets delivered, and so
does the next (`play` checks a plan under the strictest model: one queue per rank, a batch done only when all its
messages are: a send waited for before the next batch; step 4 waits later, which can only remove waiting). On each
link, receives are posted in the order of the sends, so messages also match by order, as NCCL, which ignores tags,
requires.
"""
from typing import NamedTuple

from .schedule import Action, is_v, place, shape, simulate, stage_of


class Message(NamedTuple):
    kind: str         # "act" (forward) or "grad" (backward)
    microbatch: int
    stage: int        # the virtual stage that receives it
    src: int          # sending rank
    dst: int          # receiving rank


class Op(NamedTuple):
    send: bool        # True: this rank sends `message`; False: it receives it
    message: Message

    @property
    def peer(self) -> int:
        return self.message.dst if self.send else self.message.src


class Batch(NamedTuple):
    ops: list         # the Ops issued together (one comm.batch_isend_irecv)
    delivered: list   # Messages this rank sent earlier, to wait for (and free) before issuing `ops`


def sent_by(action: Action, rank: int, p: int, stages: int, v_shape: bool = False) -> Message | None:
    """The message `action` of `rank` sends: F of stage s its output to s + 1, B of stage s its input's gradient to
    s - 1 (None for the last forward, the first backward and W). v_shape: the V placement (actions.py)."""
    s = stage_of(rank, action.chunk, p, v_shape)
    if action.kind == "F" and s < stages - 1:
        return Message("act", action.microbatch, s + 1, rank, place(s + 1, p, v_shape)[0])
    if action.kind == "B" and s > 0:
        return Message("grad", action.microbatch, s - 1, rank, place(s - 1, p, v_shape)[0])
    return None


def received_by(action: Action, rank: int, p: int, stages: int, v_shape: bool = False) -> Message | None:
    """The message `action` of `rank` needs before it can run (None for the first forward, the last backward, W)."""
    s = stage_of(rank, action.chunk, p, v_shape)
    if action.kind == "F" and s > 0:
        return Message("act", action.microbatch, s, place(s - 1, p, v_shape)[0], rank)
    if action.kind == "B" and s < stages - 1:
        return Message("grad", action.microbatch, s, place(s + 1, p, v_shape)[0], rank)
    return None


def plan(schedule) -> list[list[Batch]]:
    """Per rank, len(actions) + 1 Batches: batch k is issued before action k, the last one after the last action
    (sends still undelivered then are waited for at the end of the step). Messages between two chunks of one rank
    (p = 1, or the V's turn on the last rank) are no messages: they are left out."""
    p, _, v = shape(schedule)
    vee = is_v(schedule)
    timeline = simulate(schedule, 1, 1, 1).timeline
    starts = [[start for _, start, _ in events] for events in timeline]
    batches = [[Batch([], []) for _ in range(len(actions) + 1)] for actions in schedule]
    needed_at = {msg: start for r, events in enumerate(timeline) for a, start, _ in events
                 if (msg := received_by(a, r, p, p * v, vee)) is not None}
    leaving = sorted((end, r, k, msg) for r, events in enumerate(timeline) for k, (a, _, end) in enumerate(events)
                     if (msg := sent_by(a, r, p, p * v, vee)) is not None and msg.src != msg.dst)
    for end, r, k, msg in leaving:
        batches[r][k + 1].ops.append(Op(True, msg))
        batches[msg.dst][_first(starts[msg.dst], end)].ops.append(Op(False, msg))
        free = _first(starts[r], needed_at[msg]) + 1     # after the first action starting once it is needed
        if free < len(batches[r]):
            batches[r][free].delivered.append(msg)
    return batches


def _first(starts: list, t) -> int:
    """Index of the first action starting at t or later (len(starts) if none)."""
    return next((j for j, start in enumerate(starts) if start >= t), len(starts))


def play(plan: list[list[Batch]]) -> int:
    """Run a plan under NCCL's strictest rules: each rank's batches in order, a batch done when every message in it
    met its other end in the peer's current batch (so each send is waited for no later than `delivered` says).
    Returns the number of messages delivered; raises ValueError naming every rank's stuck batch if it would hang."""
    batches = [[b.ops for b in rank] for rank in plan]
    p, at = len(batches), [0] * len(batches)
    done = [[set() for _ in rank] for rank in batches]
    while True:
        for r in range(p):  # move past finished batches
            while at[r] < len(batches[r]) and len(done[r][at[r]]) == len(batches[r][at[r]]):
                at[r] += 1
        if all(at[r] == len(batches[r]) for r in range(p)):
            return sum(op.send for rank in batches for batch in rank for op in batch)
        progress = False
        for r in range(p):
            for i, op in enumerate(batches[r][at[r]] if at[r] < len(batches[r]) else []):
                peer = op.peer
                other = batches[peer][at[peer]] if at[peer] < len(batches[peer]) else []
                j = next((j for j, o in enumerate(other) if o == Op(not op.send, op.message)), None)
                if i not in done[r][at[r]] and j is not None:
                    done[r][at[r]].add(i)
                    done[peer][at[peer]].add(j)
                    progress = True
        if not progress:
            stuck = [f"rank {r} in batch {at[r]} ({', '.join(describe(op) for op in batches[r][at[r]])})"
                     for r in range(p) if at[r] < len(batches[r])]
            raise ValueError("the plan hangs under NCCL: " + "; ".join(stuck))


def describe(op: Op) -> str:
    """'send act 3 to stage 2 (rank 0)' style text for an Op."""
    m = op.message
    return (f"send {m.kind} {m.microbatch} to stage {m.stage} (rank {m.dst})" if op.send
            else f"recv {m.kind} {m.microbatch} for stage {m.stage} (rank {m.src})")
