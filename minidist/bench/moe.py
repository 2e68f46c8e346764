"""Expert parallelism (chapter 13): a GPT whose every MLP is a top-2 MoE layer, under minidist's expert_parallel
against the same GPT with DeepSpeed's MoE layer (ep = world), and without EP (every rank holding every expert, data
parallel), steps interleaved in one run. The rest of the GPT (embeddings, attention, routers) is data parallel in all
three, its gradients reduced by the same moe.reduce_gradients."""
import copy

import torch
import torch.distributed as dist
import torch.nn as nn

from ..data import random_batches, token_ids
from ..launch import default_backend, device, launch
from ..models import GPT, count_params, lm_loss
from ..moe import MoE, expert_parallel, reduce_gradients
from .ddp import median_step_times
from .suite import gpt_config, prepare

N_EXPERTS = 8


def moe_gpt(cfg, n_experts: int = N_EXPERTS) -> GPT:
    """The GPT of `cfg` with every block's MLP a dropless top-2 MoE of `n_experts` experts of hidden size 2 * n_embd:
    two SwiGLU experts per token (three matrices each: 12 n_embd^2 weights met, against the dense MLP's 8)."""
    model = GPT(cfg)
    for block in model.blocks:
        block.mlp = MoE(cfg.n_embd, 2 * cfg.n_embd, n_experts, 2)
    return model


class _FirstOutput(nn.Module):
    """DeepSpeed's MoE layer returns (output, aux loss, counts): the block adds the output."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        return self.moe(x)[0]


def moe_step_times(steps: int, warmup: int, batch_size: int, cfg) -> dict[str, float]:
    """On every rank: the median seconds per AdamW step (forward, backward, gradient reduction, update) of the MoE
    GPT under minidist's EP, with DeepSpeed's MoE layers (ep = world), and without EP, on this rank's slices."""
    import deepspeed
    from ..moe.reference import deepspeed_moe
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    dev, n, rank = device(), dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    full = moe_gpt(cfg).to(dev)
    ours, theirs = copy.deepcopy(full), copy.deepcopy(full)
    for mine, ds in zip(ours.blocks, theirs.blocks):
        expert_parallel(mine.mlp)
        ds.mlp = _FirstOutput(deepspeed_moe(ds.mlp, n).to(dev))
    runs = {"minidist": ours, "reference": theirs, "no_ep": full}
    batches = [(x.chunk(n)[rank].to(dev), y.chunk(n)[rank].to(dev)) for x, y in   # this rank's slices
               random_batches(token_ids(), batch_size * n, cfg.block_size, steps + warmup)]

    def step(model):
        def run(x, y):
            lm_loss(model(x), y).backward()
            reduce_gradients(model)
        return run

    def losses():  # on batch 0: the same weights and routing give the same loss in all three
        with torch.no_grad():
            return {name: lm_loss(m(batches[0][0]), batches[0][1]).item() for name, m in runs.items()}
    first = losses()
    times = median_step_times({name: (step(m), torch.optim.AdamW(m.parameters(), lr=1e-3))
                               for name, m in runs.items()}, batches, warmup)
    return times | {"losses": {"first": first, "last": losses()}}


def check_moe(world_size: int, *, n_layer=None, n_embd=None, seq=None, batch_size=None) -> None:
    import importlib.util
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError("bench moe compares against DeepSpeed's MoE layer: install it (requirements.txt pins it; "
                         "pip install -e '.[dev]' brings it)")
    if world_size < 2 or N_EXPERTS % world_size:
        raise ValueError(f"bench moe needs 2 or more ranks dividing the {N_EXPERTS} experts, got {world_size}")
    gpt_config(n_layer, n_embd, seq)  # refuses a width its heads cannot divide


def bench_moe(world_size: int = 2, steps: int = 30, warmup: int = 5, batch_size: int | None = None, *,
              n_layer: int | None = None, n_embd: int | None = None, seq: int | None = None) -> dict:
    """minidist's expert-parallel MoE GPT against the same GPT with DeepSpeed's MoE layers, and against itself without
    EP. The GPT: the tiny one's shape unless n_layer, n_embd, seq say otherwise, its MLPs MoE layers (moe_gpt);
    batch_size: sequences per rank (default 16)."""
    from ..tour.zero import import_deepspeed
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    check_moe(world_size, n_layer=n_layer, n_embd=n_embd, seq=seq)
    cfg, batch_size = gpt_config(n_layer, n_embd, seq), batch_size or 16
    with torch.device("meta"):
        params = count_params(moe_gpt(cfg))
    import_deepspeed(cpu=default_backend(world_size) == "gloo")
    prepare()
    per_rank = launch(moe_step_times, world_size, steps, warmup, batch_size, cfg)
    worst = {name: max(r[name] for r in per_rank) for name in per_rank[0] if name != "losses"}  # the slowest rank
    return {"world_size": world_size, "model": f"MoE GPT {cfg.n_layer} x {cfg.n_embd}, sequence {cfg.block_size}, "
            f"{N_EXPERTS} experts of {2 * cfg.n_embd}, top-2", "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
            "seq": cfg.block_size, "params": params, "n_experts": N_EXPERTS, "steps": steps, "warmup": warmup,
            "batch_size_per_rank": batch_size, "minidist_s": worst["minidist"], "reference_s": worst["reference"],
            "ratio": worst["minidist"] / worst["reference"], "no_ep_s": worst["no_ep"],
            "no_ep_ratio": worst["no_ep"] / worst["reference"], "ep_over_no_ep": worst["minidist"] / worst["no_ep"],
            "losses": per_rank[0]["losses"]}  # rank 0's, on its batch 0: before the timed steps and after them


def format_moe(result: dict) -> str:
    return "\n".join([
        f"{result['model']} ({result['params']:,} parameters), {result['batch_size_per_rank']} sequences per rank on "
        f"{result['world_size']} ranks, median of {result['steps']} AdamW steps (after {result['warmup']} warm-up)",
        f"  {'DeepSpeed MoE layers (ep ' + str(result['world_size']) + ')':<34}{result['reference_s'] * 1e3:8.2f} ms/step",
        f"  {'minidist expert_parallel':<34}{result['minidist_s'] * 1e3:8.2f} ms/step   ratio {result['ratio']:.3f} "
        f"(goal <= 1.05)",
        f"  {'minidist, no EP (every expert)':<34}{result['no_ep_s'] * 1e3:8.2f} ms/step   minidist EP / no EP: "
        f"{result['ep_over_no_ep']:.3f}",
    ])
