"""Pipeline parallel: minidist's 1F1B runtime against torch.distributed.pipelining's Schedule1F1B (chapter 07)."""
import torch
import torch.distributed as dist

from ..data import random_batches, token_ids
from ..launch import device, launch
from ..models import GPT, lm_loss
from .ddp import median_step_times
from .suite import gpt_config, prepare, shape_fields


def pp_step_times(microbatches: int, steps: int, warmup: int, batch_size: int, cfg) -> dict[str, float]:
    """On every rank: the median seconds per training step of minidist's 1F1B and torch's Schedule1F1B on the same
    stages of the GPT of `cfg` (both exchange the tied embedding's gradient between the first and last rank)."""
    import copy

    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from ..pipeline.runtime import PipelineRuntime, sync_tied_grads, tied_parameters
    from ..pipeline.schedule import one_f_one_b
    from ..pipeline.stages import rank_stages
    dev, rank, p = device(), dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ours = GPT(cfg).to(dev)
    theirs = copy.deepcopy(ours)
    pipe = PipelineRuntime(rank_stages(ours, p, rank), one_f_one_b(p, microbatches), cfg.n_embd,
                           track_memory=False)
    stages = rank_stages(theirs, p, rank)
    schedule = Schedule1F1B(PipelineStage(stages[0], rank, p, dev), microbatches, loss_fn=lm_loss)

    def torch_step(x, y):
        schedule.step(*([x] if rank == 0 else []), **(dict(target=y) if rank == p - 1 else {}))
        sync_tied_grads(tied_parameters(stages))
    runs = {"minidist": (pipe.step, torch.optim.AdamW(pipe.parameters(), lr=1e-3)),
            "reference": (torch_step, torch.optim.AdamW([q for s in stages for q in s.parameters()], lr=1e-3))}
    batches = random_batches(token_ids(), batch_size, cfg.block_size, steps + warmup)
    return median_step_times(runs, [(x.to(dev), y.to(dev)) for x, y in batches], warmup)


def check_pp(world_size: int, *, n_layer: int | None = None, n_embd: int | None = None, seq: int | None = None,
             batch_size: int | None = None, microbatches: int = 4) -> None:
    """Refuse, naming the numbers, fewer layers than stages, or micro-batches that torch's 1F1B cannot run."""
    from ..pipeline.stages import partition
    cfg, batch_size = gpt_config(n_layer, n_embd, seq, default_layers=4), batch_size or 16
    partition(cfg.n_layer, world_size)  # "cannot cut 2 blocks into 4 pipeline stages: ..."
    if microbatches < world_size or batch_size % microbatches:
        raise ValueError(f"need micro-batches >= ranks (torch's Schedule1F1B requires it) dividing the batch: got "
                         f"{microbatches} micro-batches, {world_size} ranks, batch {batch_size}")


def bench_pp(world_size: int = 2, steps: int = 20, warmup: int = 3, microbatches: int = 4,
             batch_size: int | None = None, *, n_layer: int | None = None, n_embd: int | None = None,
             seq: int | None = None) -> dict:
    """minidist's 1F1B pipeline against torch's Schedule1F1B: median step times and their ratio. The GPT: the tiny
    one with 4 layers unless n_layer, n_embd, seq say otherwise; batch_size: sequences per step (default 16)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    check_pp(world_size, n_layer=n_layer, n_embd=n_embd, seq=seq, batch_size=batch_size, microbatches=microbatches)
    cfg, batch_size = gpt_config(n_layer, n_embd, seq, default_layers=4), batch_size or 16
    prepare()
    per_rank = launch(pp_step_times, world_size, microbatches, steps, warmup, batch_size, cfg)
    medians = {name: max(r[name] for r in per_rank) for name in per_rank[0]}  # the slowest rank sets the pace
    return {"world_size": world_size, **shape_fields(cfg), "schedule": "1f1b", "steps": steps,
            "warmup": warmup, "microbatches": microbatches, "batch_size": batch_size,
            "minidist_s": medians["minidist"], "reference_s": medians["reference"],
            "ratio": medians["minidist"] / medians["reference"]}


def format_pp(result: dict) -> str:
    return "\n".join([
        f"{result['model']}, {result['world_size']} pipeline ranks, 1F1B, {result['microbatches']} micro-batches of "
        f"{result['batch_size'] // result['microbatches']}, median of {result['steps']} steps "
        f"(after {result['warmup']} warm-up), AdamW",
        f"  torch Schedule1F1B              {result['reference_s'] * 1e3:8.2f} ms/step",
        f"  minidist PipelineRuntime 1F1B   {result['minidist_s'] * 1e3:8.2f} ms/step   "
        f"ratio {result['ratio']:.3f} (goal <= 1.05)",
    ])
