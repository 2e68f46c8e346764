"""Ulysses attention (Jacobs et al. 2023, DeepSpeed-Ulysses): context parallelism by two all-to-alls.

Outside attention each of the N ranks holds T/N positions of every sequence with all H heads (as under ring
attention). Attention needs every position but treats heads independently, so Ulysses re-cuts the data for it:

    q, k, v   (B, H, T/N, d) sequence-sharded    --all-to-all 1-->  (B, H/N, T, d) head-sharded
    attention over the whole sequence, H/N heads, on each rank alone (any kernel: causal SDPA here)
    out       (B, H/N, T, d)                     --all-to-all 2-->  (B, H, T/N, d) sequence-sharded

All-to-all 1 sends heads block j of this rank's positions to rank j (q, k and v in one message); all-to-all 2 sends
this rank's heads at positions block j back to rank j. Each is a permutation of values across the ranks, so its
gradient is the other one: the backward runs them in reverse order (dout: all-to-all 2 backwards, dq, dk, dv: 1).
By default rank r holds the contiguous positions r T/N .. (r+1) T/N - 1, so the blocks in rank order are the
sequence in order and the causal mask is the ordinary one (no load balancing needed: every rank sees all positions).
Under another layout (`positions`, as ring attention takes, e.g. its load-balanced default) the gathered T axis holds
the positions in the order positions.flatten(): it is sorted into position order before the attention and put back
after, a permutation (exact; autograd carries its gradient back).

The constraint: each rank gets H/N whole heads, so N must divide the head count (and with fewer K/V heads, as in
GQA, those too; here q, k, v have the same heads). Ring attention has no such limit.

Bytes one rank sends per attention layer and training step, each all-to-all moving (N-1)/N of its input, with
A = B H (T/N) d values (one of q, k, v, out on one rank):
    forward (N-1)/N (3A + A), backward the same: 8 (N-1)/N A in all,  vs ring attention's (3N-2) 2A.
Ulysses sends fewer bytes (its volume per rank shrinks as N grows, ring's grows), but all-to-all reaches every rank
and cannot hide behind the attention compute; ring only talks to neighbours, overlapping each hop with a block.
Memory: q, k, v of H/N heads over T positions are as many values as H heads over T/N; a kernel that materializes
scores holds B (H/N) T^2 of them (FlashAttention: none), ring B H (T/2N) (T/N) at most (one query chunk of
T/2N positions against a block of T/N keys at a time).
"""
from fractions import Fraction

import torch
import torch.nn.functional as F

from . import comm
from .positions import check_positions


def seq_to_heads(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-to-all 1: this rank's positions of all heads (B, H, T/N, d) -> all positions of its heads (B, H/N, T, d).

    Rank j receives heads j H/N .. (j+1) H/N - 1 of every rank's positions, placed in rank order along T.
    Graded at N = 1 to 4: the exact values and shape against one process's tensor cut by hand, and bytes counted
    through comm.all_to_all (one call). The head count is checked before your part (given).
    """
    n = comm.group_size(group)
    B, H, t, d = x.shape
    check_heads(H, n)
    # <exercise seq_to_heads points=2>
    # hint: comm.all_to_all(parts, group) sends parts[j] (along dim 0) to rank j and returns what rank j sent in
    #       slot j. Which block of heads must reach rank j, and where in T does rank j's reply belong?
    parts = x.reshape(B, n, H // n, t, d).transpose(0, 1).contiguous()     # (N, B, H/N, T/N, d): heads block j
    got = comm.all_to_all(parts, group)                                    # (N, B, H/N, T/N, d): positions block j
    return got.permute(1, 2, 0, 3, 4).reshape(B, H // n, n * t, d)
    # </exercise>


def heads_to_seq(y: torch.Tensor, group=None) -> torch.Tensor:
    """All-to-all 2, the inverse of seq_to_heads: (B, H/N, T, d) -> (B, H, T/N, d), this rank's positions back.

    Graded at N = 1 to 4: heads_to_seq(seq_to_heads(x)) is x exactly, the shape, and bytes counted through
    comm.all_to_all (one call).
    """
    n = comm.group_size(group)
    B, h, T, d = y.shape
    if T % n:
        raise ValueError(f"sequence length {T} is not divisible by the context-parallel size {n}")
    # <exercise heads_to_seq points=2>
    # hint: slot j of what you send goes to rank j: it must be positions block j of your H/N heads.
    # hint: what comes back in slot j is heads block j of your positions: heads blocks go in rank order.
    parts = y.reshape(B, h, n, T // n, d).permute(2, 0, 1, 3, 4).contiguous()  # (N, B, H/N, T/N, d)
    got = comm.all_to_all(parts, group)                                        # slot j: heads block j
    return got.transpose(0, 1).reshape(B, n * h, T // n, d)
    # </exercise>


def check_heads(heads: int, n: int) -> None:
    if heads % n:
        raise ValueError(f"Ulysses gives each of the {n} context-parallel ranks whole heads: {heads} heads are not "
                         f"divisible by {n} (use ring attention, or a context-parallel size dividing {heads})")


class _SeqToHeads(torch.autograd.Function):
    """seq_to_heads, whose gradient is heads_to_seq (a permutation's adjoint is its inverse)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return heads_to_seq(grad.contiguous(), ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    """heads_to_seq, whose gradient is seq_to_heads."""

    @staticmethod
    def forward(ctx, y, group):
        ctx.group = group
        return heads_to_seq(y, group)

    @staticmethod
    def backward(ctx, grad):
        return seq_to_heads(grad.contiguous(), ctx.group), None


def ulysses_attention(q, k, v, group=None, causal: bool = True, *, positions: torch.Tensor | None = None):
    """Self-attention of this rank's positions over the whole sequence, exact: q, k, v (B, H, T/N, d). `positions`
    (N, pieces, chunk), the same on every rank, says where every rank's tokens sit (ring attention's argument, e.g.
    context_parallel.layout(T, N)); default None: rank r holds r T/N .. (r+1) T/N - 1. Refuses a head count that
    the group size does not divide. Returns (B, H, T/N, d)."""
    if not q.shape == k.shape == v.shape or q.dim() != 4:
        raise ValueError(f"q, k, v must share one (B, H, T/N, d) shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    n, B = comm.group_size(group), q.shape[0]
    check_heads(q.shape[1], n)
    qkv = _SeqToHeads.apply(torch.cat([q, k, v]), group)                   # (3B, H/N, T, d): one all-to-all
    if positions is not None:          # slot i of the gathered T axis holds position order[i]: sort, attend, unsort
        order = check_positions(positions, n, q.shape[2]).flatten().to(q.device)
        qkv = qkv[:, :, order.argsort()]                                    # (3B, H/N, T, d) in position order
    out = F.scaled_dot_product_attention(qkv[:B], qkv[B:2 * B], qkv[2 * B:], is_causal=causal)  # (B, H/N, T, d)
    if positions is not None:
        out = out[:, :, order]                                              # back to the gathered order
    return _HeadsToSeq.apply(out, group)                                   # (B, H, T/N, d)


def ulysses_attention_bytes(n: int, batch: int, heads: int, local_len: int, head_dim: int,
                            bytes_per_value: int = 4):
    """Bytes one rank sends per attention layer in one training step (forward and backward): 8 (N-1)/N of one of
    q, k, v, out (A = B H (T/N) d values). An exact Fraction (N need not divide A's bytes)."""
    return Fraction(8 * (n - 1) * batch * heads * local_len * head_dim * bytes_per_value, n)
