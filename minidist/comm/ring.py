"""Collectives built from point-to-point send/recv: the ring algorithms, a pipelined broadcast, and their cost model.

Ring all-reduce (Patarasuk & Yuan 2009; Baidu's "bringing HPC techniques to deep learning", 2017). Cut the tensor
into N chunks. The ranks form a ring: each sends only to its right neighbour and receives only from its left.

  reduce-scatter, N-1 steps: at step s rank r sends chunk (r-s-1) mod N and adds the chunk (r-s-2) mod N it receives
      to its own copy. A chunk picks up one rank's contribution per hop; after N-1 hops chunk r is complete on rank r.
  all-gather, N-1 steps: at step s rank r sends the finished chunk (r-s) mod N and keeps the chunk it receives.

Each step every rank sends one chunk (S/N bytes) while receiving another, so every link is busy all the time and each
rank sends 2(N-1)/N * S bytes in all: nearly 2S, independent of N. That is why the ring is bandwidth-optimal.

Cost model (alpha-beta, Hockney; gamma for the reduction, as Thakur et al. 2005): one message of m bytes costs
alpha + m * beta (latency plus bytes over bandwidth), and adding m received bytes into a local chunk m * gamma.
    ring all-gather:                 (N-1) alpha + (N-1)/N * S * beta
    ring reduce-scatter:             (N-1) alpha + (N-1)/N * S * (beta + gamma)
    ring all-reduce:                 2(N-1) alpha + 2(N-1)/N * S * beta + (N-1)/N * S * gamma
    pipelined chain broadcast, k pieces: (N-2+k) * (alpha + S/k * beta)
The latency term grows with N: for small messages a tree beats the ring, which is why NCCL has both. The
coefficients are fitted to measured times on relative error (fit_relative), so small messages count as much as big.
"""
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import flight, strict
from .backend import RING_TAG, simulate_message
from .ledger import count_send, in_counted_collective
from .p2p import global_rank


def ring_exchange(send: torch.Tensor, recv: torch.Tensor, group=None) -> None:
    """Send `send` to the right neighbour while receiving `recv` (in place) from the left one; both may be empty.

    Every byte a ring algorithm moves goes through here, so the ledger counts exactly what was sent (and a simulated
    link, under comm.ring_backend(link=...), holds each message as long as the network would).
    """
    n, me = dist.get_world_size(group), dist.get_rank(group)
    right, left = global_rank((me + 1) % n, group), global_rank((me - 1) % n, group)
    # A step of a ring algorithm called directly (chapter 01) is recorded as one; inside a collective of comm/collectives.py,
    # that collective is the record.
    entry = None if in_counted_collective() else flight.enter("ring_step", send, group)
    ops = []  # one batch: at N = 2 left and right are the same peer, and on NCCL an unbatched send then receive with
    #           one peer deadlocks (each rank's receive waits behind its own send, which waits for the other's receive)
    if send.numel():  # both sides know the chunk sizes, so an empty chunk is skipped on both
        count_send(send, group, n)
        simulate_message(send.numel() * send.element_size(), right)
        ops.append(dist.P2POp(dist.isend, send.contiguous(), right, group, RING_TAG))
    if recv.numel():
        ops.append(dist.P2POp(dist.irecv, recv, left, group, RING_TAG))
    strict.exchange(ops)
    flight.complete(entry)


def ring_reduce_scatter_(chunks: list[torch.Tensor], group=None) -> None:
    """Ring reduce-scatter in place: `chunks` are this rank's N pieces; afterwards chunks[rank] is their sum over ranks.

    The other chunks hold partial sums afterwards (they are scratch space). Chunks may differ in size by one element
    and may be empty. Graded: chunks[rank] on every rank at N = 1 to 4 (integers, so exactly), the bytes sent
    (N-1 chunks per rank, counted by ring_exchange), and which ranks' data each partial chunk holds afterwards.
    """
    # <exercise ring_reduce_scatter points=3>
    # hint: at step s, send chunks[(rank - s - 1) % n] and receive into a scratch buffer shaped like
    #       chunks[(rank - s - 2) % n]; then add the scratch into that chunk.
    # hint: use ring_exchange(send, recv, group) for the step's communication
    #       (from minidist.comm.ring import ring_exchange).
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    for s in range(n - 1):
        send, into = chunks[(rank - s - 1) % n], chunks[(rank - s - 2) % n]
        incoming = torch.empty_like(into)
        ring_exchange(send, incoming, group)
        into += incoming
    # </exercise>


def ring_all_gather_(chunks: list[torch.Tensor], group=None) -> None:
    """Ring all-gather in place: chunks[rank] is this rank's piece; afterwards every chunks[i] holds rank i's piece.

    Graded: every chunk on every rank at N = 1 to 4, chunks of unequal and zero size included, and N-1 sends a rank.
    """
    # <exercise ring_all_gather points=2>
    # hint: at step s, send chunks[(rank - s) % n] and receive straight into chunks[(rank - s - 1) % n].
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    for s in range(n - 1):
        ring_exchange(chunks[(rank - s) % n], chunks[(rank - s - 1) % n], group)
    # </exercise>


def ring_all_reduce(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of `tensor` over the group, computed with the ring, in a new tensor (the input is not modified).

    Works for any size: the flattened tensor is cut into N chunks whose sizes differ by at most one element, so a
    tensor smaller than N simply has some empty chunks. Graded: exact sums (integer tensors) of every shape from
    empty to (64, 64) at N = 1 to 4, the input unmodified, the result's shape and dtype, and the bytes sent.
    """
    # <exercise ring_all_reduce points=2>
    # hint: copy and flatten the tensor, cut it with torch.tensor_split into one chunk per rank (views, so working
    #       on the chunks fills the flat copy), then reduce-scatter and all-gather them.
    out = tensor.detach().clone().reshape(-1)
    chunks = list(torch.tensor_split(out, dist.get_world_size(group)))
    ring_reduce_scatter_(chunks, group)
    ring_all_gather_(chunks, group)
    return out.view_as(tensor)
    # </exercise>


def ring_reduce_scatter(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's chunk (`torch.tensor_split` of the flattened tensor) of the sum over the group.

    Any size works (chunks differ by at most one element); comm.reduce_scatter_sum instead cuts along a dimension
    that must divide evenly, as the backends require.
    """
    chunks = list(torch.tensor_split(tensor.detach().clone().reshape(-1), dist.get_world_size(group)))
    ring_reduce_scatter_(chunks, group)
    return chunks[dist.get_rank(group)].clone()  # its own storage: the shard does not keep the whole tensor alive


def ring_all_gather(shard: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's (equally shaped) shard concatenated along dim 0, in rank order."""
    n = dist.get_world_size(group)
    out = shard.new_empty((n * shard.shape[0], *shard.shape[1:]))
    chunks = list(out.tensor_split(n))
    chunks[dist.get_rank(group)].copy_(shard)
    ring_all_gather_(chunks, group)
    return out


def chain_broadcast(tensor: torch.Tensor, src: int = 0, group=None, pieces: int = 4) -> torch.Tensor:
    """A copy of rank `src`'s tensor on every rank, passed along the ring src -> src+1 -> ... in `pieces` pieces.

    Pipelining: while rank src+1 forwards piece 0, rank src already sends piece 1, so the time is
    (N-2+pieces) piece-times instead of (N-1) whole-tensor times. On other ranks `tensor` only gives shape and dtype.
    """
    n, me = dist.get_world_size(group), dist.get_rank(group)
    out = tensor.detach().clone().reshape(-1)
    pos = (me - src) % n  # position along the chain, src is 0
    for piece in torch.tensor_split(out, pieces):
        if not piece.numel():
            continue
        if pos > 0:
            strict.exchange([dist.P2POp(dist.irecv, piece, global_rank((me - 1) % n, group), group, RING_TAG)])
        if pos < n - 1:
            count_send(piece, group, n)
            simulate_message(piece.numel() * piece.element_size(), global_rank((me + 1) % n, group))
            strict.exchange([dist.P2POp(dist.isend, piece, global_rank((me + 1) % n, group), group, RING_TAG)])
    return out.view_as(tensor)


def cost_terms(op: str, nbytes: float, n: int, pieces: int = 4) -> tuple[float, float, float]:
    """(messages, bytes sent, bytes reduced) one rank pays for `op` on a full tensor of `nbytes` over n ranks.

    The time is then alpha * messages + beta * bytes sent + gamma * bytes reduced (see AlphaBeta).
    """
    if n == 1:
        return 0.0, 0.0, 0.0
    share = (n - 1) / n * nbytes
    terms = {"send": (1, nbytes, 0), "all_gather": (n - 1, share, 0), "reduce_scatter": (n - 1, share, share),
             "all_reduce": (2 * (n - 1), 2 * share, share),
             "broadcast": (n - 2 + pieces, (n - 2 + pieces) * nbytes / pieces, 0)}
    if op not in terms:
        raise ValueError(f"no cost formula for op {op!r}; known: {sorted(terms)}")
    return tuple(float(t) for t in terms[op])


def fit_relative(terms: list[tuple[float, ...]], seconds: list[float]) -> list[float]:
    """Non-negative coefficients c minimizing the sum of squared *relative* errors ((terms_i . c - t_i) / t_i)^2.

    An absolute least-squares fit is ruled by the largest timings: a 16 MB all-reduce taking 15 ms is 75x a 256 B one
    taking 0.2 ms, so its squared error weighs about 75^2 = 5600 times as much, and the small messages end up
    predicted several times too fast. Dividing every equation by its own
    time weighs each measurement by how wrong the prediction is *relative* to it. A coefficient that would come out
    negative (noise, or a term the data cannot see) is fixed at 0 and the others refitted.
    Graded: exact recovery of known coefficients, the relative weighting, and the non-negativity.
    """
    # <exercise fit_relative points=2>
    # hint: scale each row of terms and each time by 1 / t_i, then solve an ordinary least-squares problem
    #       (torch.linalg.lstsq in float64) whose right-hand side is all ones.
    # hint: while some coefficient is negative, drop the most negative one (fix it at 0) and solve again.
    a = torch.tensor(terms, dtype=torch.float64) / torch.tensor(seconds, dtype=torch.float64).unsqueeze(1)
    free = list(range(a.shape[1]))
    while True:
        c = torch.zeros(a.shape[1], dtype=torch.float64)
        if free:
            ones = torch.ones(a.shape[0], 1, dtype=torch.float64)
            c[free] = torch.linalg.lstsq(a[:, free], ones).solution.squeeze(1)
        if (c >= 0).all():
            return c.tolist()
        free.remove(int(c.argmin()))
    # </exercise>


@dataclass(frozen=True)
class AlphaBeta:
    """The cost of communication on one link: `alpha` seconds per message (latency), `beta` seconds per byte sent
    (inverse bandwidth), `gamma` seconds per byte reduced (adding a received chunk into the local one)."""

    alpha: float
    beta: float
    gamma: float = 0.0

    def predict(self, op: str, nbytes: float, n: int, pieces: int = 4) -> float:
        """Predicted seconds for `op` on a full tensor of `nbytes` over n ranks (formulas in the module docstring)."""
        messages, sent, reduced = cost_terms(op, nbytes, n, pieces)
        return self.alpha * messages + self.beta * sent + self.gamma * reduced

    @classmethod
    def fit(cls, samples: list[tuple[str, float, int, float]]) -> "AlphaBeta":
        """Fit (alpha, beta, gamma) to timings [(op, nbytes, n, seconds), ...] on relative error (fit_relative).

        gamma is only visible when the samples mix a reducing op (all_reduce, reduce_scatter) with one that does not
        reduce (send, all_gather); otherwise it stays 0 and beta absorbs it.
        """
        if not samples:
            raise ValueError("AlphaBeta.fit needs at least one timing")
        terms = [cost_terms(op, b, n) for op, b, n, _ in samples]
        alpha, beta, gamma = fit_relative(terms, [t for *_, t in samples])
        return cls(alpha, beta, gamma)


def time_op(fn, repeats: int = 5, group=None) -> float:
    """Median wall time of fn() over `repeats` runs, each started together on all ranks (collective)."""
    times = []
    for _ in range(repeats):
        dist.barrier(group)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ring_step_time(nbytes: int, repeats: int = 5, group=None) -> float:
    """Median seconds of one ring step: every rank sends `nbytes` right while receiving as many from the left.

    Fitting AlphaBeta to these times calibrates the model on the very pattern the ring algorithms repeat (a one-way
    ping-pong would measure an idle link, faster than a ring step where every link works both ways at once).
    """
    if dist.get_world_size(group) < 2:
        raise ValueError("ring_step_time needs a group of at least 2 ranks")
    send, recv = torch.zeros(max(nbytes // 4, 1)), torch.empty(max(nbytes // 4, 1))
    return time_op(lambda: ring_exchange(send, recv, group), repeats, group)
