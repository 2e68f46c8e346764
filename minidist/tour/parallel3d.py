"""Tour checks for chapter 08: ring attention (context parallelism) against one process's attention, its causal load
balance, and the tiny GPT trained on meshes (dp x pp x tp and dp x cp x tp on 8 ranks, pp x cp on 4) against one
process.

The rank functions are shared with the tests, which assert on their results.
"""
import math
import time
from contextlib import nullcontext
from fractions import Fraction

import torch
import torch.distributed as dist
import torch._dynamo  # noqa: F401  imported once before launch forks: torch.optim loads it lazily, 2 s per rank

from .. import comm
from ..context_parallel import layout, ring_attention, ring_attention_bytes
from ..data import random_batches
from ..launch import launch
from ..mesh import Mesh
from ..models import GPT, GPTConfig, lm_loss
from ..parallel3d import ParallelRun, mean_loss
from ..tensor_parallel import padded_size
from ..tensor_parallel.plans import local_shard
from ..zero import ZeroOptimizer
from .rows import covers, make_row
from .tensor_parallel import tp_bytes_per_step

CFG = GPTConfig(n_layer=2, n_embd=32, n_head=4, block_size=24)  # 24 positions cut into 2N chunks for N = 1..4
LR, STEPS = 1e-3, 5
ADAM_TOL = 0.01 * LR * STEPS   # README: 1% of the most AdamW can move a weight in STEPS steps
ATTN_TOL = 1e-5                # reduction order: softmax merged block by block, sums over blocks in another order
GRAD_TOL = 1e-5                # reduction order, relative to each gradient's largest entry (one step, no optimizer)
TOKENS = torch.randint(512, (5000,), generator=torch.Generator().manual_seed(0))
ZERO_STAGE = 1                 # on the data-parallel axis: ZeRO-1 (chapter 05)
SHAPES = {"dp x pp x tp": dict(dp=2, pp=2, tp=2), "dp x cp x tp": dict(dp=2, cp=2, tp=2), "pp x cp": dict(pp=2, cp=2)}


def batches(rows: int, steps: int = STEPS, seed: int = 0):
    return random_batches(TOKENS, rows, CFG.block_size, steps, seed=seed)


def causal_attention(q, k, v):
    """One process's causal attention: (B, H, T, d) -> (B, H, T, d)."""
    T = q.shape[2]
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf")).softmax(-1) @ v


def attention_problem(shape, balanced: bool):
    """The same seeded q, k, v and dout (B, H, T, d) on every rank; `dense`, copies of q, k, v that one process's
    causal attention ran backward on (their .grad is the reference); the layout's positions (contiguous or
    load-balanced) and this rank's, flattened."""
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(*shape, generator=g) for _ in range(4))
    dense = [t.clone().requires_grad_() for t in (q, k, v)]
    causal_attention(*dense).backward(dout)
    positions = layout(shape[2], dist.get_world_size(), balanced)
    return (q, k, v), dout, dense, positions, positions[dist.get_rank()].flatten()


def ring_vs_one_process(balanced: bool = True, shape=(2, 3, 24, 8)) -> dict:
    """Ring attention over all ranks and one process's attention on the same q, k, v, dout: the largest difference
    of this rank's outputs and of its q, k, v gradients; the bytes it sent (counted: point-to-point messages) and
    the formula's; the score entries it computed."""
    n = dist.get_world_size()
    (q, k, v), dout, dense, positions, mine = attention_problem(shape, balanced)
    local = [t[:, :, mine].clone().requires_grad_() for t in (q, k, v)]
    stats = {}
    with comm.ByteLedger() as ledger:
        out = ring_attention(*local, None, positions, stats)
        out.backward(dout[:, :, mine])
    expected = causal_attention(q, k, v)[:, :, mine]
    diff = max([(out - expected).abs().max().item()] +
               [(a.grad - d.grad[:, :, mine]).abs().max().item() for a, d in zip(local, dense)])
    return {"diff": diff, "bytes": ledger.total_bytes(), "counted": ledger.counted, "messages": ledger.count("send"),
            "formula": ring_attention_bytes(n, shape[0], shape[1], shape[2] // n, shape[3]),
            "work": stats["score_entries"]}


def one_process(rows: int, steps: int = STEPS) -> GPT:
    """The reference: the whole model trained by one process on the global batches (AdamW)."""
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    for x, y in batches(rows, steps):
        lm_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model


def dp_bytes_formula(optimizer, n: int) -> Fraction:
    """Bytes this rank sends on the gradient-averaging group in one step: an all-reduce of every gradient (ZeRO
    stage 0), or ZeRO-1's reduce-scatter of the Ψ_rank fp32 gradients and all-gather of the parameters, in one
    bucket (the tiny model is far below its 25 MiB cap) padded to N ceil(Ψ_rank / N) values, 2 (N-1)/N x 4 x that,
    plus an all-reduce of one int32 flag per tensor (which ones had a gradient)."""
    if isinstance(optimizer, ZeroOptimizer):
        padded = 4 * n * math.ceil(sum(p.numel() for p in optimizer.params) / n)
        return comm.ring_bytes("reduce_scatter", padded, n) + comm.ring_bytes("all_gather", padded, n) + \
            comm.ring_bytes("all_reduce", 4 * len(optimizer.params), n)
    return sum((comm.ring_bytes("all_reduce", 4 * p.numel(), n) for p in optimizer.params), Fraction(0))


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of AdamW's moments this rank holds (the per-element states of the optimizer that steps its tensors)."""
    inner = getattr(optimizer, "optimizer", None) or optimizer.inner
    return sum(t.numel() * t.element_size() for state in inner.state.values() for t in state.values()
               if torch.is_tensor(t) and t.dim() > 0)


def step_bytes_formula(shape: dict, microbatches: int, b: int, dp_mean: Fraction) -> dict[str, Fraction]:
    """Bytes one rank sends in one training step on each axis, the mean over all ranks, with b sequences per
    micro-batch (fp32): the stages of a pipeline share one model's tensor-parallel and ring-attention traffic; each
    micro-batch crosses pp - 1 stage boundaries twice, and the tied embedding's gradient shard travels once each way
    between the first and last stage. dp_mean: the mean of dp_bytes_formula over the ranks."""
    dp, pp, cp, tp = (shape.get(a, 1) for a in ("dp", "pp", "cp", "tp"))
    T, C, L, H = CFG.block_size, CFG.n_embd, CFG.n_layer, CFG.n_head
    tokens = b * T // cp
    tied = 2 * padded_size(CFG.vocab_size, tp) // tp * C * 4 if pp > 1 else 0
    return {"tp": Fraction(microbatches * tp_bytes_per_step(tp, L, C, tokens, False), pp),
            "cp": Fraction(microbatches * L * ring_attention_bytes(cp, b, H // tp, T // cp, C // H), pp),
            "pp": Fraction(2 * microbatches * (pp - 1) * tokens * C * 4 + tied, pp), "dp": dp_mean}


def mesh_vs_one_process(shape: dict, microbatches: int = 2, steps: int = STEPS, zero_stage: int | None = None,
                        count_bytes: bool = False) -> dict:
    """The tiny GPT trained by ParallelRun on Mesh.build(**shape) next to one process on the same global batches.

    Returns the largest weight difference on this rank, the replica divergence over its gradient group, the losses
    (global means), and with count_bytes the bytes sent in the first step on each axis (counted on minidist's ring,
    or None if any was only modelled) with this rank's dp_bytes_formula.
    """
    zero_stage = ZERO_STAGE if zero_stage is None else zero_stage
    mesh = Mesh.build(**shape)
    rows = mesh.dp * microbatches * 2
    reference = one_process(rows, steps)
    torch.manual_seed(0)
    run = ParallelRun(GPT(CFG), mesh, lr=LR, microbatches=microbatches, zero_stage=zero_stage)
    ledger, losses = comm.ByteLedger(), []
    for step, (x, y) in enumerate(batches(rows, steps)):
        measuring = count_bytes and step == 0
        with (comm.ring_backend() if measuring else nullcontext()), (ledger if measuring else nullcontext()):
            loss = run.step(x, y)
        losses.append(mean_loss(loss, mesh))
    by_axis = {}   # the gradient group under context parallelism (dp_cp) is counted as the dp axis
    for a in dict.fromkeys(r.axis for r in ledger.records):
        axis = "dp" if a == "dp_cp" else a
        by_axis[axis] = by_axis.get(axis, 0) + ledger.total_bytes(axis=a)
    by_axis = by_axis if ledger.counted else None
    return {"diff": run.diff_from(reference), "divergence": run.replica_divergence(), "losses": losses,
            "bytes": by_axis, "dp_formula": dp_bytes_formula(run.optimizer, comm.group_size(run.grad_group)),
            "table": ledger.table(), "coords": dict(mesh.coords), "b": rows // (mesh.dp * microbatches),
            "states": optimizer_state_bytes(run.optimizer), "psi": sum(p.numel() for p in run.pipe.parameters()),
            "group": comm.group_size(run.grad_group)}


def gradients_vs_one_process(shape: dict, microbatches: int = 2) -> float:
    """One step's gradients of ParallelRun on Mesh.build(**shape), averaged over the gradient group (as the
    optimizer does), against one process's on the same global batch: the largest difference on this rank, relative
    to the largest entry of the reference gradient of each parameter (its tensor-parallel shard)."""
    mesh = Mesh.build(**shape)
    x, y = batches(mesh.dp * microbatches * 2, 1)[0]
    torch.manual_seed(0)
    dense = GPT(CFG)
    lm_loss(dense(x), y).backward()
    torch.manual_seed(0)
    run = ParallelRun(GPT(CFG), mesh, lr=LR, microbatches=microbatches, zero_stage=0)
    run.pipe.step(*run.local_batch(x, y))
    n, worst = comm.group_size(run.grad_group), 0.0
    for name, p in run.parameters().items():
        grad = comm.all_reduce_sum(p.grad, run.grad_group) / n
        ref = local_shard(run.model, name, dense.get_parameter(name).grad, run.tp_group)
        worst = max(worst, ((grad - ref).abs().max() / ref.abs().max()).item())
    return worst


def states_formula(per_rank: list[dict], zero_stage: int | None = None) -> Fraction:
    """AdamW's two fp32 moments of this rank's Ψ_rank parameters, 8 Ψ_rank bytes, held once per replica group under
    ZeRO-1 (each rank 1/N of them: the mean over ranks is exact whatever the padding), N times under stage 0."""
    zero_stage = ZERO_STAGE if zero_stage is None else zero_stage
    return sum((Fraction(8 * r["psi"], r["group"] if zero_stage == 1 else 1) for r in per_rank),
               Fraction(0)) / len(per_rank)


def _timed(fn, world_size, *args, **kwargs):
    start = time.perf_counter()
    return launch(fn, world_size, *args, **kwargs), time.perf_counter() - start


@covers("ring attention", "causal load balance", "context parallel tiny GPT")
def check_context_parallel(world_size: int) -> list[dict]:
    n, rows = world_size, []
    per_rank, seconds = _timed(ring_vs_one_process, n)
    counted = Fraction(sum(r["bytes"] for r in per_rank), n) if all(r["counted"] for r in per_rank) else None
    rows.append(make_row(f"ring attention, cp={n}: outputs, gradients", "one process's causal attention",
                         max_abs_diff=max(r["diff"] for r in per_rank), tolerance=ATTN_TOL, comm_bytes=counted,
                         comm_bytes_theory=per_rank[0]["formula"] if n > 1 else None, seconds=seconds))  # 1: no ring
    work = [r["work"] for r in per_rank]
    contiguous = [r["work"] for r in launch(ring_vs_one_process, n, False)]
    rows.append(make_row(f"causal load balance, cp={n}: {'/'.join(map(str, work))} scores/rank",
                         f"equal (contiguous: {'/'.join(map(str, contiguous))})", max_abs_diff=max(work) - min(work),
                         tolerance=0, seconds=0.0))
    per_rank, seconds = _timed(mesh_vs_one_process, n, dict(cp=n), 1)
    rows.append(make_row(f"context parallel tiny GPT, cp={n}: {STEPS} AdamW steps", "one process (AdamW)",
                         max_abs_diff=max(r["diff"] for r in per_rank), tolerance=ADAM_TOL,
                         replica_divergence=max(r["divergence"] for r in per_rank), seconds=seconds))
    return rows


def bytes_by_axis(shape: dict, per_rank: list[dict], microbatches: int = 2) -> tuple[dict, dict]:
    """(counted, formula): the mean bytes per rank on each axis in the first step, measured and predicted."""
    n = len(per_rank)
    formula = step_bytes_formula(shape, microbatches, per_rank[0]["b"],
                                 sum((r["dp_formula"] for r in per_rank), Fraction(0)) / n)
    if any(r["bytes"] is None for r in per_rank):
        return None, formula
    return {a: sum((r["bytes"].get(a, 0) for r in per_rank), Fraction(0)) / n for a in formula}, formula


def composition_row(name: str, per_rank: list[dict], seconds: float) -> dict:
    shape = SHAPES[name]
    sizes = " x ".join(shape) + " = " + "x".join(map(str, shape.values()))
    dp = "ZeRO-1" if ZERO_STAGE == 1 else "all-reduce"
    counted, formula = bytes_by_axis(shape, per_rank)
    return make_row(f"{len(shape)}D {sizes}, {dp}: {STEPS} AdamW steps",
                    f"{len(per_rank)} ranks: one process (AdamW)",
                    max_abs_diff=max(r["diff"] for r in per_rank), tolerance=ADAM_TOL,
                    replica_divergence=max(r["divergence"] for r in per_rank), seconds=seconds,
                    comm_bytes=None if counted is None else sum(counted.values()),
                    comm_bytes_theory=sum(formula.values()),
                    state_bytes_per_rank=Fraction(sum(r["states"] for r in per_rank), len(per_rank)),
                    state_bytes_per_rank_theory=states_formula(per_rank))


@covers("3D dp x pp x tp, dp x cp x tp, 2D pp x cp")
def check_compositions(world_size: int) -> list[dict]:
    """The compositions on 8 and 4 ranks whatever the tour's world size: three axes of 2 need 8."""
    rows = []
    for name, shape in SHAPES.items():
        per_rank, seconds = _timed(mesh_vs_one_process, math.prod(shape.values()), shape, count_bytes=True)
        rows.append(composition_row(name, per_rank, seconds))
    return rows


CHECKS = [check_context_parallel, check_compositions]
