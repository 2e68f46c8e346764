"""Tensor parallel: minidist's parallelize against PyTorch's DTensor parallelize_module (chapter 04)."""
import copy
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data import random_batches, token_ids
from ..launch import device, launch, synchronize
from ..models import GPT
from .suite import gpt_config, prepare, shape_fields


def tp_step_times(steps: int, warmup: int, batch_size: int, sequence_parallel: bool, cfg=None) -> dict[str, float]:
    """On every rank: the median seconds per AdamW step of the GPT of `cfg` (the tiny one by default) under
    minidist's and DTensor's tensor parallelism (every rank trains on the same batch), their steps interleaved."""
    from torch.distributed.tensor.parallel import loss_parallel

    from ..mesh import Mesh
    from ..tensor_parallel import GPT_PLAN, parallelize, vocab_parallel_cross_entropy
    from ..tour.tp_dtensor import dtensor_model
    dev, n = device(), dist.get_world_size()
    mesh = Mesh.build(tp=n)
    torch.manual_seed(0)
    base = GPT(cfg).to(dev)
    ours = parallelize(copy.deepcopy(base), mesh.group("tp"), GPT_PLAN, sequence_parallel)
    theirs = dtensor_model(base, GPT_PLAN, sequence_parallel, mesh.device_mesh(axes=("tp",)), n)

    def dtensor_loss(logits, y):
        with loss_parallel():
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            loss.backward()
        return loss
    runs = {"minidist": (ours, lambda logits, y: vocab_parallel_cross_entropy(logits, y, mesh.group("tp")), True),
            "reference": (theirs, dtensor_loss, False)}
    opts = {name: torch.optim.AdamW(model.parameters(), lr=1e-3) for name, (model, _, _) in runs.items()}
    times = {name: [] for name in runs}
    batches = random_batches(token_ids(), batch_size, base.cfg.block_size, steps + warmup)
    for step, (x, y) in enumerate(batches):
        x, y = x.to(dev), y.to(dev)
        names = list(runs)[step % 2:] + list(runs)[:step % 2]  # rotate who goes first
        for name in names:
            model, loss_fn, needs_backward = runs[name]
            dist.barrier()
            start = time.perf_counter()
            loss = loss_fn(model(x), y)
            if needs_backward:
                loss.backward()
            opts[name].step()
            opts[name].zero_grad()
            synchronize()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def check_tp(world_size: int, *, n_layer: int | None = None, n_embd: int | None = None, seq: int | None = None,
             batch_size: int | None = None, sequence_parallel: bool = False) -> None:
    """Refuse, naming the sizes, a GPT that GPT_PLAN cannot cut over world_size ranks (heads, features, sequence)."""
    from ..models import GPT
    from ..tensor_parallel import GPT_PLAN
    from ..tensor_parallel.plans import check_sizes, match_plan
    cfg, n = gpt_config(n_layer, n_embd, seq), world_size
    with torch.device("meta"):
        model = GPT(cfg)
    for name, style in match_plan(model, GPT_PLAN).items():
        check_sizes(name, model.get_submodule(name), style, n)
    if sequence_parallel and cfg.block_size % n:
        raise ValueError(f"sequence length {cfg.block_size} is not divisible by tensor-parallel size {n}")


def bench_tp(world_size: int = 2, steps: int = 30, warmup: int = 5, batch_size: int | None = None,
             sequence_parallel: bool = False, *, n_layer: int | None = None, n_embd: int | None = None,
             seq: int | None = None) -> dict:
    """minidist's tensor parallel GPT against DTensor's on the same weights and batches: the tiny GPT unless n_layer,
    n_embd, seq say otherwise; batch_size: sequences per step, the same on every rank (default 8)."""
    batch_size = 8 if batch_size is None else batch_size
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0 and batch_size >= 1, got steps={steps}, warmup={warmup}, "
                         f"batch_size={batch_size}")
    check_tp(world_size, n_layer=n_layer, n_embd=n_embd, seq=seq, sequence_parallel=sequence_parallel)
    cfg = gpt_config(n_layer, n_embd, seq)
    prepare()
    per_rank = launch(tp_step_times, world_size, steps, warmup, batch_size, sequence_parallel, cfg)
    medians = {name: max(r[name] for r in per_rank) for name in per_rank[0]}  # the slowest rank sets the pace
    return {"world_size": world_size, **shape_fields(cfg), "steps": steps, "warmup": warmup,
            "batch_size": batch_size, "sequence_parallel": sequence_parallel,
            "minidist_s": medians["minidist"], "reference_s": medians["reference"],
            "ratio": medians["minidist"] / medians["reference"]}


def format_tp(result: dict) -> str:
    sp = " + sequence parallel" if result["sequence_parallel"] else ""
    return "\n".join([
        f"{result['model']}, tensor parallel{sp} on {result['world_size']} ranks, batch {result['batch_size']}, "
        f"median of "
        f"{result['steps']} steps (after {result['warmup']} warm-up), AdamW",
        f"  DTensor parallelize_module      {result['reference_s'] * 1e3:8.2f} ms/step",
        f"  minidist parallelize            {result['minidist_s'] * 1e3:8.2f} ms/step   "
        f"ratio {result['ratio']:.3f} (goal <= 1.05)",
    ])
