"""Tour checks for the V-shaped schedules of chapter 07 (ZB-V, DualPipeV): equal to one process and to torch's
ScheduleZBVZeroBubble / ScheduleDualPipeV, bytes against 4 m (p - 1) messages, peak in-flight chunks and measured
bubbles against their closed forms, next to 1F1B, interleaved 1F1B and ZB-H1 on the same model and m.

The closed forms, for t_f = t_b = t_w = t per micro-batch through a rank's share (each chunk's action t / 2):
  ZB-V (Qi et al. 2024, section 6): no idle time between a rank's first and last action (the paper's "zero bubble",
    counted in the parallelogram that consecutive steps tile when the optimizer step does not synchronize them);
    in one step between a common start and end, the V's fill remains: p - 1 chunk forwards, (p - 1) t / 2 per rank,
    a fraction (p - 1) / (6 m + p - 1). Peak memory 2p chunks on every rank: p micro-batches, as 1F1B's rank 0.
  DualPipeV (deepseek-ai/DualPipe README): activations of PP + 1 = 2p + 1 chunks (PP counts stages); the step here
    has the same (p - 1) t / 2 per rank as ZB-V (the overlapped pairs run serially on CPU).
Messages: every micro-batch crosses 2p - 1 stage boundaries each way, one of them (stages p - 1 -> p, the V's turn)
inside the last rank: 4 m (p - 1) messages, twice 1F1B's 2 m (p - 1).
"""

import torch.distributed as dist

from .pipeline import (CFG, MICRO, REPEATS, SECONDS, GRAD_TOL, _timed, calibrated_timelines,
                       closed_form_bubble, median_bubble, one_process_row, pipeline_vs_one_process, pipeline_vs_torch)
from .rows import covers, make_row

NAMES = {"zbv": "ZB-V", "dualpipev": "DualPipeV"}
V_SECONDS = tuple(2 * t for t in SECONDS)   # a V action is one chunk, half a rank's share: padded to the same 40 ms
                                            # as the other schedules' actions, the runtime's own costs weigh as much


def v_message_bytes(m: int, p: int) -> int:
    """What one step of a V schedule sends, summed over the ranks: 4 m (p - 1) messages of b T C fp32 values."""
    return 4 * m * (p - 1) * MICRO * CFG.block_size * CFG.n_embd * 4


def v_bubble(p: int, m: int, seconds=V_SECONDS) -> float:
    """ZB-V's and DualPipeV's bubble in one step at t_f = t_b = t_w (see the module docstring): (p-1)/(6m + p-1)."""
    if len(set(seconds)) != 1:
        raise ValueError(f"the V schedules' closed form here is for equal F, B and W times, got {seconds}")
    return (p - 1) / (6 * m + p - 1)


def v_in_flight(name: str, p: int) -> int:
    """Peak chunks of activations held by every rank at m >= 2p: ZB-V 2p, DualPipeV 2p + 1."""
    return 2 * p + (name == "dualpipev")


def v_configs(p: int) -> list[tuple[str, int, int]]:
    return [("zbv", 2 * p, 2), ("dualpipev", 2 * p, 2)]


def neighbours(p: int) -> dict[str, float]:
    """The closed-form bubbles of 1F1B, interleaved 1F1B (v = 2) and ZB-H1 at the V rows' m = 2p."""
    return {n: closed_form_bubble(n, p, 2 * p, v) for n, v in (("1f1b", 1), ("interleaved", 2), ("zb", 1))}


@covers("pipeline ZB-V DualPipeV", "held by rank", "bubble of")
def check_v_pipeline(world_size: int) -> list[dict]:
    """Rows for ZB-V and DualPipeV at p = world_size (none below 2 ranks)."""
    p, rows = world_size, []
    if p < 2:
        return rows
    configs = v_configs(p)
    per_rank, seconds = _timed(pipeline_vs_one_process, p, configs)
    for k, (name, m, v) in enumerate(configs):
        rs = [r[k] for r in per_rank]
        rows.append(one_process_row(NAMES[name], m, rs, v_message_bytes(m, p), seconds / len(configs)))
        measured = [r["peak_in_flight"] for r in rs]
        rows.append(make_row(f"  held by rank: {'/'.join(map(str, measured))} chunks",
                             f"{v_in_flight(name, p)} (= {'2p + 1, DualPipe' if name == 'dualpipev' else '2p, ZB'})",
                             max_abs_diff=max(abs(a - v_in_flight(name, p)) for a in measured), tolerance=0,
                             seconds=0.0))
    per_rank, seconds = _timed(pipeline_vs_torch, p, configs)
    for k, (name, m, v) in enumerate(configs):
        torch_name = {"zbv": "ScheduleZBVZeroBubble", "dualpipev": "ScheduleDualPipeV"}[name]
        rows.append(make_row(f"pipeline {NAMES[name]}, m={m}", f"torch {torch_name}",
                             max_abs_diff=max(max(r[k]["grad_diff"], r[k]["loss_diff"]) for r in per_rank),
                             tolerance=GRAD_TOL, seconds=seconds / len(configs)))
    per_rank, seconds = _timed(calibrated_timelines, p, configs, V_SECONDS, REPEATS)
    others = neighbours(p)
    for k, (name, m, v) in enumerate(configs):
        got, formula = median_bubble([r[k] for r in per_rank]), v_bubble(p, m)
        rows.append(make_row(   # held, like interleaving and ZB-H1, nearer their closed form than 1F1B's
            f"bubble of {NAMES[name]}, m={m}: {got:.3f} measured", f"closed form {formula:.3f}, not 1F1B's "
            f"{others['1f1b']:.3f} (ZB-H1 {others['zb']:.3f})", max_abs_diff=abs(got - formula),
            tolerance=(others["1f1b"] - formula) / 2, seconds=seconds / len(configs)))
    return rows


CHECKS = [check_v_pipeline]


def v_equivalence(steps: int = 1) -> tuple[list[dict], list[dict]]:
    """On this rank, for v_configs(p): pipeline_vs_one_process over `steps` SGD steps and pipeline_vs_torch."""
    p = dist.get_world_size()
    return pipeline_vs_one_process(v_configs(p), steps), pipeline_vs_torch(v_configs(p))
