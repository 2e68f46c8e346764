"""Point-to-point messages between ranks, recorded in the byte ledger: what pipelines and ring attention send.

Ranks given as `src`/`dst`/`peer` are ranks *within the group*; torch.distributed's own send/recv take global ranks,
and mixing the two up is a classic pipeline bug (the message goes to the wrong stage, or the rank waits forever).
Sent bytes are always *counted* (minidist hands this very message to the network); a receive is recorded with 0 bytes
sent. Under `comm.ring_backend()` the messages are posted from the communication thread, after every collective
issued before them, and a simulated link holds each one for alpha + bytes / bandwidth.

`batch_isend_irecv` posts several sends and receives as one batch (torch.distributed.batch_isend_irecv; under NCCL
one group, whose operations progress together): two ranks that must each send to and receive from the other do it
in one batch each, where separate sends could block each other (NCCL runs a rank's operations in order, and a send
may wait for its receive).
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import backend, flight, strict
from .backend import ALL_TO_ALL_TAG, RESERVED_TAGS, Work
from .ledger import count_recv, count_send, counting


def group_size(group=None) -> int:
    return dist.get_world_size(group)


def global_rank(group_rank: int, group=None) -> int:
    """The global rank of `group`'s rank `group_rank` (torch's point-to-point ops take global ranks)."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _enter_send(x: torch.Tensor, dst: int, group, batch: int = 0) -> tuple[int, object]:
    """Record a message leaving for group rank `dst` (flight recorder, ledger, simulated link): (global dst, entry)."""
    to = global_rank(dst, group)
    entry = flight.enter("send", x, group, peer=to, batch=batch)
    count_send(x, group, group_size(group))
    backend.simulate_message(x.numel() * x.element_size(), to)
    return to, entry


def _enter_recv(x: torch.Tensor, src: int, group, batch: int = 0) -> tuple[int, object]:
    frm = global_rank(src, group)
    entry = flight.enter("recv", x, group, peer=frm, batch=batch)
    count_recv(x, group, group_size(group))
    return frm, entry


def _start(ops: list, entries: list) -> list[Work]:
    """Post dist.P2POps (global peers) as one batch, each recorded by its flight entry; one Work per op.

    Under MINIDIST_STRICT_P2P=1 the batch obeys NCCL's point-to-point rules (strict.py)."""
    if strict.active():
        futures = strict.each(strict.post(ops), [op.tensor for op in ops])
        return [Work(future=f, entry=entry) for f, entry in zip(futures, entries)]
    # Even a single message goes as a batch: NCCL runs a lone isend/irecv on a communicator of its own for the pair,
    # and a batch on the group's, so a message posted alone on one side and in a batch on the other never matches
    # (all_to_all with an empty message to skip, at 3 ranks or more). Through one path, every message is on the group's.
    works = dist.batch_isend_irecv(ops)
    works = works if len(works) == len(ops) else works[-1:] * len(ops)   # NCCL: one Work for the whole batch
    return [Work(op.tensor, torch_work=w, entry=entry) for op, w, entry in zip(ops, works, entries)]


def _post_send(x: torch.Tensor, dst: int, group, tag: int) -> Work:
    to, entry = _enter_send(x, dst, group)
    return _start([dist.P2POp(dist.isend, x, to, group, tag)], [entry])[0]


def _post_recv(x: torch.Tensor, src: int, group, tag: int) -> Work:
    frm, entry = _enter_recv(x, src, group)
    return _start([dist.P2POp(dist.irecv, x, frm, group, tag)], [entry])[0]


def _check_message(sending: bool, peer, group, tag) -> None:
    n, me = group_size(group), dist.get_rank(group)
    if not isinstance(tag, int) or (0 < tag < RESERVED_TAGS) or tag < 0:
        raise ValueError(f"tag {tag!r}: use 0 or a tag >= {RESERVED_TAGS} (1-{RESERVED_TAGS - 1} are minidist's own)")
    if not isinstance(peer, int) or not 0 <= peer < n or peer == me:
        raise ValueError(f"{'destination' if sending else 'source'} {peer!r} is not another rank of the "
                         f"group (group ranks 0..{n - 1}, this rank is {me})")


def _post(fn, x, peer, group, tag) -> Work:
    """Post a message now, or, under the ring backend, from the communication thread after what was issued before."""
    _check_message(fn is _post_send, peer, group, tag)
    return backend.submit(lambda: fn(x, peer, group, tag)) if backend.ring_active() else fn(x, peer, group, tag)


def isend(x: torch.Tensor, dst: int, group=None, tag: int = 0) -> Work:
    """Start sending x (contiguous) to group rank `dst`; wait() on the Work before modifying x."""
    return _post(_post_send, x, dst, group, tag)


def irecv(x: torch.Tensor, src: int, group=None, tag: int = 0) -> Work:
    """Start receiving into x (contiguous) from group rank `src`; wait() returns x once it has arrived."""
    return _post(_post_recv, x, src, group, tag)


def send(x: torch.Tensor, dst: int, group=None, tag: int = 0) -> None:
    isend(x.contiguous(), dst, group, tag).wait()


def recv(x: torch.Tensor, src: int, group=None, tag: int = 0) -> torch.Tensor:
    return irecv(x, src, group, tag).wait()


@dataclass(frozen=True)
class P2POp:
    """One message of a batch: `op` is comm.isend or comm.irecv, `peer` a *group* rank (torch's P2POp takes a
    global one), x contiguous."""
    op: object
    tensor: torch.Tensor
    peer: int
    group: object = None
    tag: int = 0


def batch_isend_irecv(ops: list[P2POp]) -> list[Work]:
    """Post every send and receive of `ops` as one batch; returns one Work per op, in order.

    Within a batch the order of sends and receives does not matter; messages between two ranks in one direction
    still match in the order they are posted. Each message is recorded as isend / irecv record it (ledger, flight
    recorder). All ops must use the same group. Under NCCL the batch completes as a whole (its Works share one).
    """
    if not ops:
        return []
    for op in ops:
        if op.op not in (isend, irecv):
            raise ValueError(f"a P2POp's op is comm.isend or comm.irecv, got {op.op!r}")
        if op.group is not ops[0].group:
            raise ValueError("every operation of a batch must use the same process group")
        _check_message(op.op is isend, op.peer, op.group, op.tag)

    def post() -> list[Work]:
        batch = flight.new_batch()
        entered = [(_enter_send if op.op is isend else _enter_recv)(op.tensor, op.peer, op.group, batch) for op in ops]
        return _start([dist.P2POp(dist.isend if op.op is isend else dist.irecv, op.tensor, peer, op.group, op.tag)
                       for op, (peer, _) in zip(ops, entered)], [entry for _, entry in entered])
    if not backend.ring_active():
        return post()
    batch = backend.submit(post)   # then one job per op on the same thread, each handing over its op's Work
    return [backend.submit(lambda i=i: batch.wait()[i]) for i in range(len(ops))]


def all_to_all(x: torch.Tensor, group=None, dim: int = 0) -> torch.Tensor:
    """Chunk j of x (along `dim`) goes to group rank j; returns the chunks received, concatenated in rank order.

    Built from point-to-point messages (step s: send to rank me+s, receive from me-s, posted as one batch: at N = 2
    both are the same peer, and an unbatched send then receive deadlocks on NCCL), so its bytes are counted:
    (N-1)/N of x per rank.
    """
    n, me = group_size(group), dist.get_rank(group)
    if x.shape[dim] % n:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the group size {n}")
    chunks = [c.contiguous() for c in x.detach().chunk(n, dim)]

    def exchange():
        out = [torch.empty_like(c) for c in chunks]
        out[me].copy_(chunks[me])
        with counting("all_to_all", x, group, n):
            for s in range(1, n):
                batch = flight.new_batch()
                (to, sent), (frm, received) = (_enter_send(chunks[(me + s) % n], (me + s) % n, group, batch),
                                               _enter_recv(out[(me - s) % n], (me - s) % n, group, batch))
                for w in _start([dist.P2POp(dist.isend, chunks[(me + s) % n], to, group, ALL_TO_ALL_TAG),
                                 dist.P2POp(dist.irecv, out[(me - s) % n], frm, group, ALL_TO_ALL_TAG)],
                                [sent, received]):
                    w.wait()
        return torch.cat(out, dim)
    return backend.submit(exchange).wait() if backend.ring_active() else exchange()


def all_to_all_uneven(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group=None) -> torch.Tensor:
    """The next send_counts[j] rows of x (dim 0) go to group rank j; returns the rows received, in rank order
    (recv_counts[i] from rank i). torch's all_to_all_single with split sizes, decided at run time.

    Every rank must know what it will receive before it posts the receives (NCCL needs the sizes), so the counts are
    exchanged first (moe.exchange_counts). Both sides of an empty message know it is empty and skip it. Counted: the
    rows sent to other ranks x row bytes.
    """
    n, me = group_size(group), dist.get_rank(group)
    if len(send_counts) != n or len(recv_counts) != n:
        raise ValueError(f"send_counts {list(send_counts)} and recv_counts {list(recv_counts)} need one count per "
                         f"rank of the group ({n})")
    if sum(send_counts) != x.shape[0]:
        raise ValueError(f"send_counts add up to {sum(send_counts)} rows, x has {x.shape[0]}")
    chunks = list(x.detach().contiguous().split(list(send_counts)))

    def exchange():
        out = [x.new_empty((c, *x.shape[1:])) for c in recv_counts]
        out[me].copy_(chunks[me])
        with counting("all_to_all", x, group, n):
            for s in range(1, n):
                to, frm, batch, ops, entries = (me + s) % n, (me - s) % n, flight.new_batch(), [], []
                if chunks[to].numel():
                    peer, entry = _enter_send(chunks[to], to, group, batch)
                    ops.append(dist.P2POp(dist.isend, chunks[to], peer, group, ALL_TO_ALL_TAG))
                    entries.append(entry)
                if out[frm].numel():
                    peer, entry = _enter_recv(out[frm], frm, group, batch)
                    ops.append(dist.P2POp(dist.irecv, out[frm], peer, group, ALL_TO_ALL_TAG))
                    entries.append(entry)
                for w in _start(ops, entries) if ops else []:
                    w.wait()
        return torch.cat(out)
    return backend.submit(exchange).wait() if backend.ring_active() else exchange()


class DifferentiableAllToAll(torch.autograd.Function):
    """Forward: all_to_all_uneven. Backward: the same exchange reversed (each row's gradient goes back to the rank
    that sent the row). Assumes each rank has its own loss on the rows it received (expert parallelism): a sent row's
    gradient is the one computed where it went, nothing is summed."""

    @staticmethod
    def forward(ctx, x, send_counts, recv_counts, group):
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        return all_to_all_uneven(x, send_counts, recv_counts, group)

    @staticmethod
    def backward(ctx, grad):
        send_counts, recv_counts = ctx.counts
        return all_to_all_uneven(grad.contiguous(), recv_counts, send_counts, ctx.group), None, None, None
