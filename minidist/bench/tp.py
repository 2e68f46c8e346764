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

def tp_step_times(steps: int, warmup: int, batch_size: int, sequence_parallel: bool) -> dict[str, float]:
    """On every rank: the median seconds per AdamW step of the tiny GPT under minidist's and DTensor's tensor
    parallelism (every rank trains on the same batch), their steps interleaved."""
    from torch.distributed.tensor.parallel import loss_parallel

    from ..mesh import Mesh
    from ..tensor_parallel import GPT_PLAN, parallelize, vocab_parallel_cross_entropy
    from ..tour.tp_dtensor import dtensor_model
    dev, n = device(), dist.get_world_size()
    mesh = Mesh.build(tp=n)
    torch.manual_seed(0)
    base = GPT().to(dev)
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


def bench_tp(world_size: int = 2, steps: int = 30, warmup: int = 5, batch_size: int = 8,
             sequence_parallel: bool = False) -> dict:
    """minidist's tensor parallel tiny GPT against DTensor's on the same weights and batches."""
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0 and batch_size >= 1, got steps={steps}, warmup={warmup}, "
                         f"batch_size={batch_size}")
    per_rank = launch(tp_step_times, world_size, steps, warmup, batch_size, sequence_parallel)
    medians = {name: max(r[name] for r in per_rank) for name in per_rank[0]}  # the slowest rank sets the pace
    return {"world_size": world_size, "model": "tiny-gpt", "steps": steps, "warmup": warmup,
            "batch_size": batch_size, "sequence_parallel": sequence_parallel,
            "minidist_s": medians["minidist"], "reference_s": medians["reference"],
            "ratio": medians["minidist"] / medians["reference"]}


def format_tp(result: dict) -> str:
    sp = " + sequence parallel" if result["sequence_parallel"] else ""
    return "\n".join([
        f"tiny GPT, tensor parallel{sp} on {result['world_size']} ranks, batch {result['batch_size']}, median of "
        f"{result['steps']} steps (after {result['warmup']} warm-up), AdamW",
        f"  DTensor parallelize_module      {result['reference_s'] * 1e3:8.2f} ms/step",
        f"  minidist parallelize            {result['minidist_s'] * 1e3:8.2f} ms/step   "
        f"ratio {result['ratio']:.3f} (goal <= 1.15)",
    ])
