"""Tour checks for chapter 07 (pipeline parallelism): every schedule against one process and against
torch.distributed.pipelining, the bytes of a step against 2 m (v p - 1) messages, measured bubbles against their
closed forms, measured activation memory against what each schedule's paper says.

The rank functions take a list of (schedule, m, v) configurations and run them all in one launch; the tests call the
same functions and assert on their results.
"""
import copy
import gc
import statistics
import time
from fractions import Fraction

import torch
import torch.distributed as dist
import torch._dynamo  # noqa: F401  imported once here, before launch forks: torch.optim loads it lazily, 2 s per rank

from .. import comm
from ..data import random_batches
from ..launch import launch
from ..models import GPT, GPTConfig, lm_loss
from ..pipeline.runtime import PipelineRuntime, sync_tied_grads, tied_parameters
from ..pipeline.schedule import build, is_v
from ..pipeline.stages import parameter_names, rank_stages
from ..testing import sgd
from .rows import covers, make_row

CFG = GPTConfig(n_layer=8, n_embd=32, block_size=16)   # 8 blocks: 2 chunks on each of 4 ranks; tied embeddings
MICRO = 2            # sequences per micro-batch
TOKENS = torch.randint(512, (5000,), generator=torch.Generator().manual_seed(0))
SGD_TOL = 1e-6       # SGD, 5 steps: the micro-batches' gradients are summed in another order than one batch's;
                     # LayerNorm gains near 1 then round to neighbouring floats (1.2e-7 apart): up to 4.8e-7 seen
GRAD_TOL = 1e-6      # a sum of m micro-batch gradients vs one gradient of the whole batch (reduction order); losses
                     # (about 6.2, whose floats are 4.8e-7 apart) are compared relative to their size
SECONDS = (0.04, 0.04, 0.04)   # (t_f, t_b, t_w) each action is padded to in calibrated runs: B + W = 2 F
BUBBLE_REL_TOL = 0.05             # GPipe's and 1F1B's measured bubble within 5% of their closed form ...
REPEATS = 3                       # ... in the median of 3 steps (a busy machine delays or stretches single steps)
NAMES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "interleaved 1F1B v=2", "zb": "ZB-H1"}
HELD = {"gpipe": "m on every rank (GPipe)", "1f1b": "p - r on rank r (1F1B)", "zb": "p on every rank (ZB-H1)",
        "interleaved": "2(p-r-1) + (v-1)p + 1 (Megatron)"}


def batches(m: int, steps: int, seed: int = 0):
    """`steps` global batches of m micro-batches of MICRO sequences, the same on every rank."""
    return random_batches(TOKENS, MICRO * m, CFG.block_size, steps, seed=seed)


def message_bytes(m: int, p: int, v: int = 1) -> int:
    """What one step sends, summed over the ranks: 2 m (v p - 1) messages of b T C fp32 values."""
    return 2 * m * (v * p - 1) * MICRO * CFG.block_size * CFG.n_embd * 4


def one_process(m: int, steps: int, optimizer=sgd(0.1)):
    """The reference: one process trains the whole model on the global batches. Returns the first step's loss and
    gradients and the final weights, by parameter name."""
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = optimizer(model.parameters())
    for step, (x, y) in enumerate(batches(m, steps)):
        loss = lm_loss(model(x), y)
        loss.backward()
        if step == 0:
            first = loss.item(), {n: q.grad.clone() for n, q in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    return *first, {n: q.detach().clone() for n, q in model.named_parameters()}


def pipeline_vs_one_process(configs, steps: int = 5, optimizer=sgd(0.1)) -> list[dict]:
    """For each (schedule, m, v): a pipeline and one process train from the same weights on the same global batches.

    On each rank: the first step's relative loss difference (last stage's rank) and largest gradient difference,
    the weights' largest difference after `steps` optimizer steps, the counted bytes and messages of the schedule and
    of the tied-weight exchange, the first step's measured activation memory, and the tied weight (both copies must
    agree).
    """
    p, rank, out, references = dist.get_world_size(), dist.get_rank(), [], {}
    for name, m, v in configs:
        if m not in references:  # the same for every schedule with this m
            references[m] = one_process(m, steps, optimizer)
        ref_loss, ref_grads, ref_weights = references[m]
        torch.manual_seed(0)
        model = GPT(CFG)
        pipe = PipelineRuntime(*placed(model, name, p, rank, m, v), CFG.n_embd)
        opt, names = optimizer(pipe.parameters()), parameter_names(model)
        r = {"schedule": name, "m": m, "v": v}
        for step, (x, y) in enumerate(batches(m, steps)):
            with comm.ByteLedger() as sched:
                loss = pipe.run_schedule(x, y)
            with comm.ByteLedger() as tied:
                pipe.sync_tied_grads()
            if step == 0:
                r |= {"loss_diff": 0.0 if loss is None else abs(loss.item() - ref_loss) / ref_loss,
                      "grad_diff": max((q.grad - ref_grads[names[id(q)]]).abs().max().item()
                                       for q in pipe.parameters()),
                      "messages": sched.count("send"), "bytes": sched.total_bytes("send"),
                      "counted": sched.counted and (tied.counted or not tied.records),  # middle: nothing tied
                      "tied_messages": tied.count("send"),
                      "tied_bytes": tied.total_bytes("send"), "peak_bytes": pipe.memory.peak,
                      "peak_messages": pipe.memory.peak_messages,
                      "peak_in_flight": pipe.memory.peak_in_flight, "saved_bytes": dict(pipe.saved_bytes)}
            opt.step()
            opt.zero_grad()
        r["weight_diff"] = max((q - ref_weights[names[id(q)]]).abs().max().item() for q in pipe.parameters())
        r["tied"] = pipe.tied[0].detach().clone() if pipe.tied else None
        out.append(r)
    return out


def placed(model, name: str, p: int, rank: int, m: int, v: int):
    """(this rank's stages, the schedule): the stages where the schedule's placement (looped or V) puts them."""
    schedule = build(name, p, m, v)
    return rank_stages(model, p, rank, 2 if is_v(schedule) else v, is_v(schedule)), schedule


def _torch_schedule(name: str, stages, m: int):
    from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV, ScheduleGPipe,
                                              ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble,
                                              ScheduleZBVZeroBubble)
    p, rank, v = dist.get_world_size(), dist.get_rank(), len(stages)
    index = [c * p + rank if name not in ("zbv", "dualpipev") else (2 * p - 1 - rank if c else rank) for c in range(v)]
    wrapped = [PipelineStage(s, i, p * v, torch.device("cpu")) for i, s in zip(index, stages)]
    if name in ("zbv", "dualpipev"):  # the tied embedding is in two stages of rank 0: torch's 1/m scaling of each
        # stage's gradients would divide it twice, so the loss is divided instead (as minidist does), and summed
        return {"zbv": ScheduleZBVZeroBubble, "dualpipev": ScheduleDualPipeV}[name](
            wrapped, m, loss_fn=lambda out, y: lm_loss(out, y) / m, scale_grads=False)
    if name in ("gpipe", "1f1b"):
        return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name](wrapped[0], m, loss_fn=lm_loss)
    # torch's zero-bubble schedule for one stage per rank (ZB1P) stands for ZB-H1: the same B/W split
    return {"interleaved": ScheduleInterleaved1F1B, "zb": ScheduleInterleavedZeroBubble}[name](wrapped, m,
                                                                                              loss_fn=lm_loss)


def pipeline_vs_torch(configs) -> list[dict]:
    """For each (schedule, m, v): one step of minidist's runtime and of torch.distributed.pipelining's schedule of
    the same name on copies of the same stages; the largest gradient and loss differences on this rank."""
    p, rank, out = dist.get_world_size(), dist.get_rank(), []
    for name, m, v in configs:
        x, y = batches(m, 1)[0]
        torch.manual_seed(0)
        ours_model = GPT(CFG)
        theirs_model = copy.deepcopy(ours_model)
        pipe = PipelineRuntime(*placed(ours_model, name, p, rank, m, v), CFG.n_embd)
        loss = pipe.step(x, y)
        (theirs_stages, _), losses, last = placed(theirs_model, name, p, rank, m, v), [], 0 if pipe.v_shape else p - 1
        schedule = _torch_schedule(name, theirs_stages, m)
        schedule.step(*([x] if rank == 0 else []), **(dict(target=y, losses=losses) if rank == last else {}))
        if not pipe.v_shape:   # torch leaves tied weights alone: the same exchange (in the V both are on rank 0)
            sync_tied_grads(tied_parameters(theirs_stages))
        ours, theirs = parameter_names(ours_model), parameter_names(theirs_model)
        mine = {ours[id(q)]: q.grad for q in pipe.parameters()}
        grads = {theirs[id(q)]: q.grad for s in theirs_stages for q in s.parameters()}
        out.append({"schedule": name, "m": m, "v": v,
                    "grad_diff": max((mine[n] - grads[n]).abs().max().item() for n in mine),
                    "loss_diff": abs(1 - loss.item() / (torch.stack(losses).sum() if pipe.v_shape else torch.stack(
                        losses).mean()).item()) if losses else 0.0})
    return out


def calibrated_timelines(configs, seconds=SECONDS, repeats: int = 1) -> list[list[list[tuple[str, float, float]]]]:
    """For each (schedule, m, v): this rank's timelines of `repeats` steps, every action padded to a fixed time:
    `seconds` = (t_f, t_b, t_w) of one micro-batch through a rank's whole share. An unpadded warm-up step first keeps
    first-use costs (allocations, connections) out of the timing; memory is not tracked (its hooks cost time).

    Python's cyclic garbage collector is frozen: a full collection walks the ~300k objects torch creates and
    stalled a rank for 100 ms in the middle of a step (Megatron-LM's --manual-gc exists for the same reason)."""
    gc.collect()
    gc.freeze()
    p, rank, out = dist.get_world_size(), dist.get_rank(), []
    for name, m, v in configs:
        torch.manual_seed(0)
        pipe = PipelineRuntime(*placed(GPT(CFG), name, p, rank, m, v), CFG.n_embd, track_memory=False)
        x, y = batches(m, 1)[0]
        pipe.run_schedule(x, y)
        pipe.action_seconds, timelines = seconds, []
        for _ in range(repeats):
            dist.barrier()
            pipe.run_schedule(x, y)
            timelines.append([(str(a), start, end) for a, start, end in pipe.timeline])
        out.append(timelines)
    return out


def measured_bubble(timelines: list[list[tuple[str, float, float]]]) -> float:
    """Idle share of one step measured on all ranks (one timeline each): 1 - busy / (p x (last end - first start))."""
    start = min(s for t in timelines for _, s, _ in t)
    window = max(e for t in timelines for _, _, e in t) - start
    return 1 - sum(e - s for t in timelines for _, s, e in t) / (len(timelines) * window)


def median_bubble(steps_per_rank: list[list[list[tuple[str, float, float]]]]) -> float:
    """The median over steps of the measured bubble; steps_per_rank[rank][step] is one step's timeline."""
    return statistics.median(measured_bubble(list(step)) for step in zip(*steps_per_rank))


def timing_configs(p: int) -> list[tuple[str, int, int]]:
    """The calibrated runs: GPipe at m = 2 and at m = p + 1, 1F1B at m = p + 1 (where its order is no longer
    GPipe's), interleaving (v = 2) at m = p, ZB-H1 at m = p + 1."""
    return [("gpipe", 2, 1), ("gpipe", p + 1, 1), ("1f1b", p + 1, 1), ("interleaved", p, 2), ("zb", p + 1, 1)]


def bubble_checks(p: int, measured: dict) -> list[tuple[tuple, str, float, float]]:
    """For the calibrated runs' median bubbles (measured[(name, m, v)]): (run, what it is compared with,
    |difference|, tolerance). GPipe at m = 2: its closed form, within 5%. 1F1B: GPipe's bubble measured at the same
    m, within 5% of the closed form: the same bubble, and the runtime's own costs (a message's latency, bookkeeping:
    well under a millisecond per action on a quiet machine, more on a busy one) on both sides. Interleaving and
    ZB-H1 shrink the bubble, so those costs weigh more (interleaving also has v times the hops): they are held to
    what they claim, a bubble nearer their closed form than 1F1B's at the same m (half the way between the two)."""
    checks = []
    for name, m, v in timing_configs(p):
        formula, got = closed_form_bubble(name, p, m, v), measured[(name, m, v)]
        if name == "gpipe" and m == 2:
            checks.append(((name, m, v), f"closed form {formula:.3f}, within 5%", abs(got - formula),
                           BUBBLE_REL_TOL * formula))
        elif name == "1f1b":
            gpipe = measured[("gpipe", m, 1)]
            checks.append(((name, m, v), f"GPipe's, measured: {gpipe:.3f}", abs(got - gpipe),
                           BUBBLE_REL_TOL * formula))
        elif name != "gpipe":
            checks.append(((name, m, v), f"closed form {formula:.3f}, not 1F1B's", abs(got - formula),
                           (closed_form_bubble("1f1b", p, m, 1) - formula) / 2))
    return checks


def closed_form_bubble(name: str, p: int, m: int, v: int, seconds=SECONDS) -> float:
    """The papers' bubble fractions: GPipe and 1F1B (p-1)/(m+p-1), interleaved (p-1)/(vm+p-1), ZB-H1 a bubble of
    (p-1)(t_f + t_b - t_w) in a step of m (t_f + t_b + t_w) plus that bubble (for m >= p)."""
    t_f, t_b, t_w = seconds
    if name == "zb":
        bubble = (p - 1) * (t_f + t_b - t_w)
        return bubble / (m * (t_f + t_b + t_w) + bubble)
    return (p - 1) / ((v if name == "interleaved" else 1) * m + p - 1)


def expected_in_flight(name: str, p: int, m: int, v: int) -> list[int]:
    """Per rank, the (micro-batch, chunk) pairs the papers say are held at once: GPipe m, 1F1B p - r (at most m),
    interleaved 2 (p - r - 1) + (v - 1) p + 1 chunks (at most m v), ZB-H1 p on every rank (at most m)."""
    per_rank = {"gpipe": lambda r: m, "1f1b": lambda r: min(p - r, m), "zb": lambda r: min(p, m),
                "interleaved": lambda r: min(2 * (p - r - 1) + (v - 1) * p + 1, m * v)}[name]
    return [per_rank(r) for r in range(p)]


def _timed(fn, world_size, *args):
    start = time.perf_counter()
    return launch(fn, world_size, *args), time.perf_counter() - start


def one_process_row(schedule: str, m: int, rs: list[dict], bytes_formula: int, seconds: float, **extra) -> dict:
    """The row of one schedule against one process (rs: pipeline_vs_one_process's result on every rank): the largest
    loss, gradient or weight difference, and the bytes per rank, counted, against the formula's sum over ranks / p."""
    p = len(rs)
    return make_row(f"pipeline {schedule}, m={m} ({sum(r['messages'] for r in rs)} messages/step)",
                    "one process, global batch (SGD)",
                    max_abs_diff=max(max(r["loss_diff"], r["grad_diff"], r["weight_diff"]) for r in rs),
                    tolerance=SGD_TOL,
                    comm_bytes=Fraction(sum(r["bytes"] for r in rs), p) if all(r["counted"] for r in rs) else None,
                    comm_bytes_theory=Fraction(bytes_formula, p), seconds=seconds, **extra)


def tour_configs(p: int) -> list[tuple[str, int, int]]:
    return [("gpipe", p + 1, 1), ("1f1b", p + 1, 1), ("interleaved", 2 * p, 2), ("zb", p + 1, 1)]


@covers("pipeline GPipe 1F1B interleaved ZB-H1", "held by rank", "bubble of")
def check_pipeline(world_size: int) -> list[dict]:
    """Rows for every schedule at p = world_size (a pipeline needs two ranks: none at world size 1)."""
    p, rows = world_size, []
    if p < 2:
        return rows
    configs = tour_configs(p)
    per_rank, seconds = _timed(pipeline_vs_one_process, p, configs)
    for k, (name, m, v) in enumerate(configs):
        rs = [r[k] for r in per_rank]
        rows.append(one_process_row(NAMES[name], m, rs, message_bytes(m, p, v), seconds / len(configs),
                                    replica_divergence=(rs[0]["tied"] - rs[-1]["tied"]).abs().max().item()))
        measured, expected = [r["peak_in_flight"] for r in rs], expected_in_flight(name, p, m, v)
        unit = "chunks of micro-batches" if v > 1 else "micro-batches"
        rows.append(make_row(f"  held by rank: {'/'.join(map(str, measured))} {unit}", HELD[name],
                             max_abs_diff=sum(abs(a - b) for a, b in zip(measured, expected)), tolerance=0,
                             seconds=0.0))
    torch_configs = [(name, 2 * p, v) for name, _, v in configs]
    per_rank, seconds = _timed(pipeline_vs_torch, p, torch_configs)
    for k, (name, m, v) in enumerate(torch_configs):
        rows.append(make_row(f"pipeline {NAMES[name]}, m={m}", "torch.distributed.pipelining",
                             max_abs_diff=max(max(r[k]["grad_diff"], r[k]["loss_diff"]) for r in per_rank),
                             tolerance=GRAD_TOL, seconds=seconds / len(torch_configs)))
    timing = timing_configs(p)
    per_rank, seconds = _timed(calibrated_timelines, p, timing, SECONDS, REPEATS)
    measured = {c: median_bubble([r[k] for r in per_rank]) for k, c in enumerate(timing)}
    for (name, m, v), reference, diff, tolerance in bubble_checks(p, measured):
        rows.append(make_row(f"bubble of {NAMES[name]}, m={m}: {measured[(name, m, v)]:.3f} measured", reference,
                             max_abs_diff=diff, tolerance=tolerance, seconds=seconds / len(timing)))
    return rows


CHECKS = [check_pipeline]
