"""Tour checks for chapter 13 against the production implementations: minidist's MoE loaded from a Hugging Face
MixtralSparseMoeBlock (outputs, the load-balancing loss against transformers' own), expert parallelism against
DeepSpeed's MoE layer (deepspeed.moe.layer.MoE) with ep over gloo, trained side by side; and a tiny Mixtral (Hugging
Face's model, minidist's MoE in its blocks) trained with EP, and with ep x tp (the attention tensor-parallel).

DeepSpeed's layer is compared on the mean squared error alone: its auxiliary loss is GShard's (the first choice's
share only), not Mixtral's, so the two losses differ by design.
"""
import copy
import time

import torch
import torch.distributed as dist

from ..launch import default_backend, launch
from ..moe import expert_parallel, reduce_gradients
from ..moe.reference import deepspeed_moe, from_mixtral, mixtral_aux_loss, mixtral_block
from ..testing import on_device
from .moe import ADAM_TOL, D_FF, D_MODEL, FWD_TOL, LR, STEPS, TOP_K, MoE, batch, experts_for
from .rows import covers, make_row


def mixtral_against_minidist(n_experts: int = 8, seed: int = 0) -> dict:
    """A random MixtralSparseMoeBlock and minidist's MoE loaded from it on the same input: the largest difference of
    the outputs, and of the load-balancing losses (minidist's .aux_loss against transformers' function)."""
    block = mixtral_block(D_MODEL, D_FF, n_experts, TOP_K, seed).eval()
    moe = from_mixtral(block)
    x = batch(seed)[0]
    with torch.no_grad():
        diff = (moe(x) - block(x)).abs().max().item()
        aux = abs(moe.aux_loss.item() - mixtral_aux_loss(block, x).item())
    return {"outputs": diff, "aux_loss": aux}


@on_device
def deepspeed_against_minidist(n_experts: int) -> dict:
    """DeepSpeed's MoE layer (ep = world) and minidist's expert_parallel with the same weights, each rank on its own
    tokens, STEPS AdamW steps on the mean squared error (gradients reduced the same way, reduce_gradients): the
    largest difference of the outputs and gradients (each step) and of this rank's weights at the end."""
    import deepspeed
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    full = MoE(D_MODEL, D_FF, n_experts, TOP_K)
    theirs, ours = deepspeed_moe(full, world), expert_parallel(copy.deepcopy(full))
    opts = [torch.optim.AdamW(m.parameters(), lr=LR) for m in (theirs, ours)]
    out = {"outputs": 0.0, "grads": 0.0}
    for step in range(STEPS):
        x, y = (t.chunk(world)[rank] for t in batch(step))
        results = []
        for model, opt in zip((theirs, ours), opts):
            o = model(x)
            o = o[0] if isinstance(o, tuple) else o
            torch.nn.functional.mse_loss(o, y).backward()
            reduce_gradients(model)
            results.append((o.detach(), [p.grad.clone() for p in model.parameters()]))
            opt.step()
            opt.zero_grad()
        (a, ga), (b, gb) = results
        out["outputs"] = max(out["outputs"], (a - b).abs().max().item())
        out["grads"] = max([out["grads"]] + [(u - v).abs().max().item() for u, v in zip(ga, gb)])
    out["weights"] = max((u - v).abs().max().item() for u, v in zip(theirs.parameters(), ours.parameters()))
    return out


@covers("Mixtral")
def check_mixtral(world_size: int) -> list[dict]:
    start = time.perf_counter()
    r = mixtral_against_minidist()
    seconds = time.perf_counter() - start
    return [make_row("MoE loaded from HF MixtralSparseMoeBlock: outputs", "transformers (random weights)",
                     max_abs_diff=r["outputs"], tolerance=FWD_TOL, seconds=seconds),
            make_row("MoE load-balancing loss (Mixtral's)", "transformers load_balancing_loss_func",
                     max_abs_diff=r["aux_loss"], tolerance=FWD_TOL, seconds=seconds)]


@covers("DeepSpeed MoE")
def check_deepspeed(world_size: int) -> list[dict]:
    """At the tour's world size when it is above 1 (DeepSpeed's layer needs ep > 1 to all-to-all), else 2 ranks."""
    from .zero import import_deepspeed
    world = max(world_size, 2)
    import_deepspeed(cpu=default_backend(world) == "gloo")
    start = time.perf_counter()
    per_rank = launch(deepspeed_against_minidist, world, experts_for(world))
    seconds = time.perf_counter() - start
    label = f"EP, {experts_for(world)} experts on {world} ranks"
    return [make_row(f"{label}: outputs, gradients", "DeepSpeed MoE layer (ep on gloo)",
                     max_abs_diff=max(max(r["outputs"], r["grads"]) for r in per_rank), tolerance=FWD_TOL,
                     seconds=seconds),
            make_row(f"{label}: {STEPS} AdamW steps", "DeepSpeed MoE layer (ep on gloo)",
                     max_abs_diff=max(r["weights"] for r in per_rank), tolerance=ADAM_TOL, seconds=seconds)]


@covers("tiny Mixtral", "ep x tp")
def check_mixtral_training(world_size: int) -> list[dict]:
    """The tiny Mixtral (HF MixtralForCausalLM with minidist's MoE) trained 3 AdamW steps with EP over 2 ranks, and
    with ep 2 x tp 2 (attention tensor-parallel) on 4 ranks, whatever the tour's world size."""
    from .moe_train import mixtral, mixtral_ep_against_one_process
    mixtral()   # built once here: transformers' lazy imports (seconds) then happen before the ranks fork
    rows = []
    for label, world, tp in (("EP 2, tiny Mixtral (HF, minidist MoE)", 2, 1),
                             ("ep 2 x tp 2 (attention), tiny Mixtral", 4, 2)):
        start = time.perf_counter()
        per_rank = launch(mixtral_ep_against_one_process, world, 3, 8, 16, tp)
        rows.append(make_row(f"{label}: 3 AdamW steps", "one process (AdamW)",
                             max_abs_diff=max(r["weights"] for r in per_rank), tolerance=ADAM_TOL,
                             seconds=time.perf_counter() - start))
    return rows


CHECKS = [check_mixtral, check_deepspeed, check_mixtral_training]
