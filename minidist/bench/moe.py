"""Expert parallelism: minidist's expert_parallel against DeepSpeed's MoE layer (chapter 13), and the same layer
without EP (every rank holding every expert, data parallel), steps interleaved in one run."""
import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..launch import default_backend, device, launch
from ..moe import MoE, expert_parallel, reduce_gradients
from .ddp import median_step_times


def moe_step_times(steps: int, warmup: int, tokens: int, d_model: int, d_ff: int, n_experts: int) -> dict:
    """On every rank: the median seconds per AdamW step (forward, backward, gradient reduction, update) of one MoE
    layer (top-2, dropless) under minidist's EP, DeepSpeed's MoE layer (ep = world) and minidist's layer without EP,
    on this rank's `tokens` tokens, the three interleaved."""
    import deepspeed
    from ..moe.reference import deepspeed_moe
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    dev, n, rank = device(), dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    full = MoE(d_model, d_ff, n_experts, 2).to(dev)
    runs = {"minidist EP": expert_parallel(copy.deepcopy(full)), "DeepSpeed MoE": deepspeed_moe(full, n).to(dev),
            "no EP (DP)": copy.deepcopy(full)}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in runs.items()}
    g = torch.Generator().manual_seed(rank)
    batches = [(x, x) for x in (torch.randn(1, tokens, d_model, generator=g).to(dev) for _ in range(steps + warmup))]

    def step(model):
        def run(x, y):
            out = model(x)
            F.mse_loss(out[0] if isinstance(out, tuple) else out, y).backward()
            reduce_gradients(model)
        return run
    return median_step_times({name: (step(model), opts[name]) for name, model in runs.items()}, batches, warmup)


def bench_moe(world_size: int = 2, steps: int = 30, warmup: int = 5, tokens: int = 512, d_model: int = 64,
              d_ff: int = 128, n_experts: int = 8) -> dict:
    """minidist's expert parallel MoE layer against DeepSpeed's, and against itself without EP."""
    from ..tour.zero import import_deepspeed
    if steps < 1 or warmup < 0 or tokens < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0 and tokens >= 1, got steps={steps}, warmup={warmup}, "
                         f"tokens={tokens}")
    if world_size < 2 or n_experts % world_size:
        raise ValueError(f"bench moe needs 2 or more ranks dividing the {n_experts} experts, got {world_size}")
    import_deepspeed(cpu=default_backend(world_size) == "gloo")
    per_rank = launch(moe_step_times, world_size, steps, warmup, tokens, d_model, d_ff, n_experts)
    medians = {name: max(r[name] for r in per_rank) for name in per_rank[0]}  # the slowest rank sets the pace
    return {"world_size": world_size, "steps": steps, "warmup": warmup, "tokens_per_rank": tokens,
            "d_model": d_model, "d_ff": d_ff, "n_experts": n_experts, "seconds": medians,
            "ratio": medians["minidist EP"] / medians["DeepSpeed MoE"],
            "ratio_no_ep": medians["minidist EP"] / medians["no EP (DP)"]}


def format_moe(result: dict) -> str:
    lines = [f"one MoE layer (d {result['d_model']}, F {result['d_ff']}, {result['n_experts']} experts, top-2, "
             f"dropless), {result['tokens_per_rank']} tokens per rank on {result['world_size']} ranks, median of "
             f"{result['steps']} AdamW steps (after {result['warmup']} warm-up)"]
    for name, s in result["seconds"].items():
        lines.append(f"  {name:<16}{s * 1e3:8.2f} ms/step")
    lines.append(f"  ratio minidist EP / DeepSpeed MoE: {result['ratio']:.3f}; minidist EP / no EP: "
                 f"{result['ratio_no_ep']:.3f}")
    return "\n".join(lines)
