"""Tour checks for chapters 00 (where memory goes) and 01 (collectives from scratch)."""
import time

import torch
import torch.distributed as dist

from .. import comm
from ..comm.ring import chain_broadcast, ring_all_gather, ring_all_reduce, ring_reduce_scatter, time_op
from ..launch import launch
from ..memory import SavedActivations, activation_bytes_per_layer, measure_state_bytes, zero_state_bytes
from ..models import GPT, count_params, lm_loss
from ..testing import on_device
from .rows import covers, make_row

SUM_TOL = 1e-5  # fp32 sums of N values in another order than gloo's: a few ulps of the largest partial sum


# Chapter 01: ring collectives from send/recv against gloo's own.

@on_device
def ring_vs_backend() -> dict:
    """On each rank: (max |ring - backend|, bytes this rank sent, seconds) for each collective."""
    n, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(rank)
    x = torch.randn(65536 * n)  # divisible by n: every rank sends exactly the formula's bytes
    shard = torch.randn(65536)
    ops = {
        "all_reduce": (lambda: ring_all_reduce(x), lambda: comm.all_reduce_sum(x), x),
        "reduce_scatter": (lambda: ring_reduce_scatter(x), lambda: comm.reduce_scatter_sum(x), x),
        "all_gather": (lambda: ring_all_gather(shard), lambda: comm.all_gather_cat(shard), x),
        "broadcast": (lambda: chain_broadcast(x, src=0), lambda: comm.broadcast(x, src=0), x),
    }
    out = {}
    for op, (mine, ref, full) in ops.items():
        with comm.ByteLedger() as ledger:
            result = mine()
        diff = (result - ref()).abs().max().item()
        out[op] = (diff, ledger.total_bytes(), time_op(mine, repeats=3), full.numel() * full.element_size())
    # Awkward sizes: a single element, fewer elements than ranks, a prime count.
    awkward = [torch.randn(s) for s in (1, max(n - 1, 1), 1009)] + [torch.randn(3, 5, 7)]
    out["awkward"] = max((ring_all_reduce(t) - comm.all_reduce_sum(t)).abs().max().item() for t in awkward)
    return out


@covers("ring all-reduce", "ring reduce-scatter", "ring all-gather", "chain broadcast")
def check_collectives(world_size: int) -> list[dict]:
    per_rank = launch(ring_vs_backend, world_size)
    rows = []
    for op, tol in (("all_reduce", SUM_TOL), ("reduce_scatter", SUM_TOL), ("all_gather", 0.0), ("broadcast", 0.0)):
        diff = max(r[op][0] for r in per_rank)
        if op == "all_reduce":
            diff = max(diff, *(r["awkward"] for r in per_rank))
        nbytes = per_rank[0][op][3]
        rows.append(make_row(
            f"ring {op.replace('_', '-')}" if op != "broadcast" else "chain broadcast (4 pieces)",
            f"gloo {op}", max_abs_diff=diff, tolerance=tol,
            comm_bytes=sum(r[op][1] for r in per_rank) / world_size,  # mean bytes sent per rank (a Fraction)
            comm_bytes_theory=comm.ring_bytes(op, nbytes, world_size),
            seconds=max(r[op][2] for r in per_rank)))
    return rows


@on_device
def comm_backward_errors() -> dict[str, float]:
    """On each rank: max |autograd gradient - closed form| for every differentiable collective, along dims 0 and 1.

    Rank r weights its loss with C_r = (r + 1) * w, w a fixed pattern, so gradients reveal which ranks were summed.
    all_reduce is checked in both of its uses: a replicated loss (every rank the same weights: backward identity),
    and per-rank losses through identity composed with all_reduce (backward: the sum of every rank's gradient).
    """
    n, r = dist.get_world_size(), dist.get_rank()
    w = torch.arange(1.0, 2 * n + 1).view(2 * n, 1).expand(2 * n, 3)  # (2n, 3): a distinct value per row
    c = [(q + 1) * w for q in range(n)]                                # every rank's loss weights, known to all
    total = sum(c)
    errors = {}
    for dim in (0, 1):  # dim 1: the same cases transposed, so the collectives cut along the second dimension
        t = (lambda a: a) if dim == 0 else (lambda a: a.transpose(0, 1))  # noqa: E731
        chunk = lambda a, q: t(a).chunk(n, dim)[q]                         # noqa: E731
        mine = lambda a, q: t(a.chunk(n)[q])                               # noqa: E731
        cases = {  # name: (function, input, weights of my loss, closed-form gradient of my input)
            "identity": (comm.identity, t(w), t(c[r]), t(total)),
            "all_reduce (replicated loss)": (comm.all_reduce, t(w), t(w), t(w)),
            "identity + all_reduce (per-rank losses)": (lambda x: comm.all_reduce(comm.identity(x)), t(w), t(c[r]),
                                                        t(total)),
            "all_gather": (lambda x: comm.all_gather(x, dim=dim), mine(w, r), t(c[r]), chunk(total, r)),
            "reduce_scatter": (lambda x: comm.reduce_scatter(x, dim=dim), t(w), mine(c[r], r),
                               torch.cat([chunk(c[q], q) for q in range(n)], dim)),
            "split": (lambda x: comm.split(x, dim=dim), t(w), mine(c[r], r),
                      torch.cat([chunk(c[q], q) for q in range(n)], dim)),
            "gather": (lambda x: comm.gather(x, dim=dim), mine(w, r), t(w), chunk(w, r)),  # replicated loss
        }
        for name, (fn, shape_of, weights, expected) in cases.items():
            x = torch.randn(shape_of.shape, requires_grad=True)
            before = x.detach().clone()
            (fn(x) * weights).sum().backward()
            key = f"{name}, dim {dim}"
            errors[key] = (x.grad - expected).abs().max().item() + (x.detach() - before).abs().max().item()
    return errors


@covers("differentiable collectives")
def check_comm_backward(world_size: int) -> list[dict]:
    start = time.perf_counter()
    per_rank = launch(comm_backward_errors, world_size)
    return [make_row("differentiable collectives (6 duals, dims 0 and 1)", "closed-form rank sums",
                     max_abs_diff=max(max(e.values()) for e in per_rank), tolerance=0.0,
                     seconds=time.perf_counter() - start)]


# Chapter 00: where memory goes, measured against the formulas.

@on_device
def memory_on_rank(batch: int = 4) -> dict:
    torch.manual_seed(0)
    model = GPT()
    cfg = model.cfg
    opt = torch.optim.Adam(model.parameters())
    x = torch.randint(cfg.vocab_size, (batch, cfg.block_size))
    lm_loss(model(x), x).backward()
    opt.step()
    states = measure_state_bytes(model, opt)
    block = model.blocks[0]
    h = torch.randn(batch, cfg.block_size, cfg.n_embd, requires_grad=True)
    with SavedActivations(exclude=block) as saved:
        block(h)
    n = dist.get_world_size()
    return {"states": states.total, "states_theory": zero_state_bytes(count_params(model), n, 0, "fp32").total,
            "act": saved.bytes, "act_theory": activation_bytes_per_layer(
                cfg.block_size, batch, cfg.n_embd, cfg.n_head, bytes_per_value=4, dropout=False)}


@covers("model states", "activations saved by one layer")
def check_memory(world_size: int) -> list[dict]:
    start = time.perf_counter()
    per_rank = launch(memory_on_rank, world_size)
    seconds = time.perf_counter() - start
    act, act_theory = max(r["act"] for r in per_rank), per_rank[0]["act_theory"]
    return [
        make_row("model states: fp32 Adam, replicated (tiny GPT)", "16 bytes/param formula",
                 state_bytes_per_rank=max(r["states"] for r in per_rank),
                 state_bytes_per_rank_theory=per_rank[0]["states_theory"], seconds=seconds),
        make_row("activations saved by one layer (fp32, no dropout)", "Korthikanti et al. 2022",
                 max_abs_diff=abs(act - act_theory) / act_theory, tolerance=ACTIVATION_REL_TOL,
                 seconds=seconds) | {"activation_bytes": act, "activation_bytes_theory": act_theory},
    ]


# The formula leaves out LayerNorm's per-token mean and 1/std (4 values per token and layer, against 16h + a*s):
# 0.3% at the tiny GPT's shapes. The row's max_abs_diff is the relative difference.
ACTIVATION_REL_TOL = 0.01

CHECKS = [check_memory, check_collectives, check_comm_backward]
