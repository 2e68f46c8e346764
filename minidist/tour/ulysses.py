"""Tour check for Ulysses attention (chapter 08): exact against one process and against ring attention on the same
layout (contiguous; the tests also take ring attention's load-balanced default), forward and backward, at cp = N;
the bytes it sends against 8 (N-1)/N B H (T/N) d values, ring's against (3N-2) K/V blocks."""
import time

import torch
import torch.distributed as dist

from .. import comm
from ..context_parallel import layout, ring_attention, ring_attention_bytes
from ..launch import launch
from ..ulysses import ulysses_attention, ulysses_attention_bytes
from .parallel3d import ATTN_TOL, attention_problem, causal_attention
from .rows import covers, make_row

SHAPE = (2, 4, 24, 8)   # (B, H, T, d): 4 heads, so cp 1, 2 and 4 (3 does not divide them: refused, see the tests)


def ulysses_vs_ring(shape=SHAPE, balanced: bool = False) -> dict:
    """On this rank: the largest difference of Ulysses' output and q, k, v gradients from one process's and from
    ring attention's (same positions, contiguous or load-balanced, same dout); the bytes each sent, counted, and
    their formulas."""
    n = dist.get_world_size()
    (q, k, v), dout, dense, positions, mine = attention_problem(shape, balanced)
    given = {"positions": positions} if balanced else {}   # contiguous: the interface with no positions
    results = {}
    for name, fn in (("ulysses", lambda *t: ulysses_attention(*t, None, **given)),
                     ("ring", lambda *t: ring_attention(*t, None, positions))):
        local = [t[:, :, mine].clone().requires_grad_() for t in (q, k, v)]
        with comm.ByteLedger() as ledger:
            out = fn(*local)
            out.backward(dout[:, :, mine])
        results[name] = out.detach(), [t.grad for t in local], ledger
    (uo, ug, ul), (ro, rg, rl) = results["ulysses"], results["ring"]
    diff = lambda o, gs: max([(o - causal_attention(q, k, v)[:, :, mine]).abs().max().item()] +  # noqa: E731
                             [(a - d.grad[:, :, mine]).abs().max().item() for a, d in zip(gs, dense)])
    local_shape = (shape[0], shape[1], shape[2] // n, shape[3])
    return {"diff": diff(uo, ug), "vs_ring": max([(uo - ro).abs().max().item()] +
                                                 [(a - b).abs().max().item() for a, b in zip(ug, rg)]),
            "bytes": ul.total_bytes(), "counted": ul.counted, "formula": ulysses_attention_bytes(n, *local_shape),
            "ring_bytes": rl.total_bytes(), "ring_formula": ring_attention_bytes(n, *local_shape)}


@covers("context parallel Ulysses attention")
def check_ulysses(world_size: int) -> list[dict]:
    """Ulysses at cp = world_size where the 4 heads allow it (1, 2, 4)."""
    n = world_size
    if SHAPE[1] % n:
        return []
    start = time.perf_counter()
    per_rank = launch(ulysses_vs_ring, n)
    seconds = time.perf_counter() - start
    ring = float(sum(r["ring_bytes"] for r in per_rank) / n)
    return [make_row(f"context parallel Ulysses attention, cp={n} (ring: {ring:,.0f} B/rank)",
                     "one process and ring attention (fwd+bwd)",
                     max_abs_diff=max(max(r["diff"], r["vs_ring"]) for r in per_rank), tolerance=ATTN_TOL,
                     comm_bytes=sum(r["bytes"] for r in per_rank) / n if all(r["counted"] for r in per_rank)
                     else None, comm_bytes_theory=per_rank[0]["formula"], seconds=seconds)]


CHECKS = [check_ulysses]


def bytes_by_length(lengths, heads: int = 4, head_dim: int = 8) -> list[tuple]:
    """On this rank, for each sequence length T: (T, Ulysses' counted bytes, ring's counted bytes) of one attention
    forward and backward (batch 1), with their formulas."""
    n, r, out = dist.get_world_size(), dist.get_rank(), []
    for T in lengths:
        q, k, v = (torch.randn(1, heads, T // n, head_dim, requires_grad=True) for _ in range(3))
        counted = []
        for fn in (lambda: ulysses_attention(q, k, v, None),
                   lambda: ring_attention(q, k, v, None, layout(T, n, balanced=False))):
            with comm.ByteLedger() as ledger:
                fn().sum().backward()
            counted.append(ledger.total_bytes())
        shape = (1, heads, T // n, head_dim)
        out.append((T, *counted, ulysses_attention_bytes(n, *shape), ring_attention_bytes(n, *shape)))
    return out
