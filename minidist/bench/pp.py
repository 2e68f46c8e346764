"""Pipeline parallel: minidist's runtime against torch.distributed.pipelining on the same stages (chapter 07): 1F1B
against Schedule1F1B, ZB-V against ScheduleZBVZeroBubble, DualPipeV against ScheduleDualPipeV."""
import torch
import torch.distributed as dist

from ..data import random_batches, token_ids
from ..launch import device, launch
from ..models import GPT, lm_loss
from .ddp import median_step_times
from .suite import gpt_config, prepare, shape_fields

TORCH = {"1f1b": "Schedule1F1B", "zbv": "ScheduleZBVZeroBubble", "dualpipev": "ScheduleDualPipeV"}


def pp_step_times(microbatches: int, steps: int, warmup: int, batch_size: int, cfg,
                  schedule_name: str = "1f1b") -> dict[str, float]:
    """On every rank: the median seconds per training step of minidist's runtime and torch's schedule of the same
    name (TORCH) on the same stages of the GPT of `cfg`. With one stage per rank both exchange the tied embedding's
    gradient between the first and last rank; in the V both ends are on rank 0 and neither needs to."""
    import copy

    import torch.distributed.pipelining as pipelining

    from ..pipeline.runtime import PipelineRuntime, sync_tied_grads, tied_parameters
    from ..pipeline.schedule import build, is_v, stage_of
    from ..pipeline.stages import rank_stages
    dev, rank, p = device(), dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ours = GPT(cfg).to(dev)
    theirs = copy.deepcopy(ours)
    plan = build(schedule_name, p, microbatches)
    v = 2 if is_v(plan) else 1
    pipe = PipelineRuntime(rank_stages(ours, p, rank, v, v > 1), plan, cfg.n_embd, track_memory=False)
    stages = rank_stages(theirs, p, rank, v, v > 1)
    wrapped = [pipelining.PipelineStage(s, stage_of(rank, c, p, v > 1), p * v, dev) for c, s in enumerate(stages)]
    if v == 1:
        schedule = pipelining.Schedule1F1B(wrapped[0], microbatches, loss_fn=lm_loss)
    else:   # a tied weight in two stages of rank 0: torch's 1/m gradient scaling would apply twice (tour/pipeline.py)
        schedule = getattr(pipelining, TORCH[schedule_name])(
            wrapped, microbatches, loss_fn=lambda out, y: lm_loss(out, y) / microbatches, scale_grads=False)
    last = 0 if v > 1 else p - 1

    def torch_step(x, y):
        schedule.step(*([x] if rank == 0 else []), **(dict(target=y) if rank == last else {}))
        if v == 1:
            sync_tied_grads(tied_parameters(stages))
    runs = {"minidist": (pipe.step, torch.optim.AdamW(pipe.parameters(), lr=1e-3)),
            "reference": (torch_step, torch.optim.AdamW(   # each once: in the V the tied weight is in two stages
                torch.nn.ModuleList(stages).parameters(), lr=1e-3))}
    batches = random_batches(token_ids(), batch_size, cfg.block_size, steps + warmup)
    return median_step_times(runs, [(x.to(dev), y.to(dev)) for x, y in batches], warmup)


def pp_config(world_size: int, n_layer: int | None, n_embd: int | None, seq: int | None, schedule: str):
    """The GPT: the tiny one with the sizes given; 4 layers by default, at least 2p for a V (2 chunks per rank)."""
    return gpt_config(n_layer, n_embd, seq, default_layers=4 if schedule == "1f1b" else max(4, 2 * world_size))


def check_pp(world_size: int, *, n_layer: int | None = None, n_embd: int | None = None, seq: int | None = None,
             batch_size: int | None = None, microbatches: int = 4, schedule: str = "1f1b") -> None:
    """Refuse, on the host before any rank starts and naming the numbers, an unknown schedule, fewer layers than
    stages, or micro-batches that the schedules cannot run."""
    from ..pipeline.schedule import build
    from ..pipeline.stages import partition
    if schedule not in TORCH:
        raise ValueError(f"bench pp compares the schedules {sorted(TORCH)} with torch's, got {schedule!r}")
    cfg, v_shape = pp_config(world_size, n_layer, n_embd, seq, schedule), schedule != "1f1b"
    batch_size = batch_size or 16
    if v_shape and cfg.n_layer < 2 * world_size:
        raise ValueError(f"a V schedule cuts the model into 2p = {2 * world_size} stages: {cfg.n_layer} layers are "
                         f"too few")
    partition(cfg.n_layer, world_size)  # "cannot cut 2 blocks into 4 pipeline stages: ..."
    if batch_size % microbatches:
        raise ValueError(f"{microbatches} micro-batches do not divide the batch of {batch_size}")
    if not v_shape and microbatches < world_size:
        raise ValueError(f"torch's Schedule1F1B needs micro-batches >= ranks: got {microbatches} micro-batches, "
                         f"{world_size} ranks")
    build(schedule, world_size, microbatches)   # the schedule's own refusals (DualPipeV: m >= 2p); ZB-V takes any m


def bench_pp(world_size: int = 2, steps: int = 20, warmup: int = 3, microbatches: int = 4,
             batch_size: int | None = None, schedule: str = "1f1b", *, n_layer: int | None = None,
             n_embd: int | None = None, seq: int | None = None) -> dict:
    """minidist's pipeline against torch's schedule of the same name (1f1b, zbv, dualpipev): median step times and
    their ratio. The GPT: the tiny one with 4 layers (a V: max(4, 2p)) unless n_layer, n_embd, seq say otherwise;
    batch_size: sequences per step (default 16)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    check_pp(world_size, n_layer=n_layer, n_embd=n_embd, seq=seq, batch_size=batch_size, microbatches=microbatches,
             schedule=schedule)
    cfg, batch_size = pp_config(world_size, n_layer, n_embd, seq, schedule), batch_size or 16
    prepare()
    per_rank = launch(pp_step_times, world_size, microbatches, steps, warmup, batch_size, cfg, schedule)
    medians = {name: max(r[name] for r in per_rank) for name in per_rank[0]}  # the slowest rank sets the pace
    return {"world_size": world_size, **shape_fields(cfg), "schedule": schedule, "steps": steps,
            "warmup": warmup, "microbatches": microbatches, "batch_size": batch_size,
            "minidist_s": medians["minidist"], "reference_s": medians["reference"],
            "ratio": medians["minidist"] / medians["reference"]}


def format_pp(result: dict) -> str:
    return "\n".join([
        f"{result['model']}, {result['world_size']} pipeline ranks, {result['schedule']}, {result['microbatches']} "
        f"micro-batches of "
        f"{result['batch_size'] // result['microbatches']}, median of {result['steps']} steps "
        f"(after {result['warmup']} warm-up), AdamW",
        f"  torch {TORCH[result['schedule']]:<26}{result['reference_s'] * 1e3:8.2f} ms/step",
        f"  minidist PipelineRuntime {result['schedule']:<10}{result['minidist_s'] * 1e3:8.2f} ms/step   "
        f"ratio {result['ratio']:.3f} (goal <= 1.05)",
    ])
