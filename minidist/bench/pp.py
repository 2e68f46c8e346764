"""Pipeline parallel: minidist's 1F1B runtime against torch.distributed.pipelining's Schedule1F1B (chapter 07)."""
import torch
import torch.distributed as dist

from ..data import random_batches, token_ids
from ..launch import device, launch
from ..models import GPT, lm_loss
from .ddp import median_step_times

def pp_step_times(microbatches: int, steps: int, warmup: int, batch_size: int, n_layer: int) -> dict[str, float]:
    """On every rank: the median seconds per training step of minidist's 1F1B and torch's Schedule1F1B on the same
    stages of the tiny GPT (both exchange the tied embedding's gradient between the first and last rank)."""
    import copy

    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from ..models import GPTConfig
    from ..pipeline.runtime import PipelineRuntime, sync_tied_grads, tied_parameters
    from ..pipeline.schedule import one_f_one_b
    from ..pipeline.stages import rank_stages
    dev, rank, p = device(), dist.get_rank(), dist.get_world_size()
    cfg = GPTConfig(n_layer=n_layer)
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


def bench_pp(world_size: int = 2, steps: int = 20, warmup: int = 3, microbatches: int = 4,
             batch_size: int = 16, n_layer: int = 4) -> dict:
    """minidist's 1F1B pipeline against torch's Schedule1F1B: median step times and their ratio."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if microbatches < world_size or batch_size % microbatches:
        raise ValueError(f"need micro-batches >= ranks (torch's Schedule1F1B requires it) dividing the batch: got "
                         f"{microbatches} micro-batches, {world_size} ranks, batch {batch_size}")
    per_rank = launch(pp_step_times, world_size, microbatches, steps, warmup, batch_size, n_layer)
    medians = {name: max(r[name] for r in per_rank) for name in per_rank[0]}  # the slowest rank sets the pace
    return {"world_size": world_size, "model": f"tiny-gpt, {n_layer} layers", "schedule": "1f1b", "steps": steps,
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
        f"ratio {result['ratio']:.3f} (goal <= 1.20)",
    ])
