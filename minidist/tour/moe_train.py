"""Chapter 13's training runs: what the load-balancing loss does to the routing over training (one process), and a
tiny Mixtral-style language model (Hugging Face's MixtralForCausalLM with minidist's MoE in its blocks) trained with
expert parallelism against one process. Shared by the notebook, the tests and the example script.
"""
import copy

import torch
import torch.distributed as dist

from .. import comm
from ..data import random_batches
from ..models import build_mixtral
from ..moe import MoE, expert_parallel, reduce_gradients
from ..moe.reference import with_minidist_moe

MIXTRAL_LR, AUX_COEF = 1e-3, 0.02
TOKENS = torch.randint(512, (5000,), generator=torch.Generator().manual_seed(0))


def balance_run(aux_coef: float, steps: int = 120, n_experts: int = 8, seed: int = 0) -> dict:
    """One MoE (d 16, 8 experts, top-2) fitting a random linear map on inputs with a common offset (a router at
    initialisation then already prefers a few experts, as it does on real hidden states), with the load-balancing
    loss weighted by `aux_coef` (0: none). Returns the kept assignments per expert at every step (steps x E) and the
    losses."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    moe = MoE(16, 32, n_experts, 2)
    target = torch.randn(16, 16, generator=g) / 4
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    per_expert, losses = [], []
    for _ in range(steps):
        x = torch.randn(8, 16, 16, generator=g) + 1.0
        loss = torch.nn.functional.mse_loss(moe(x), x @ target)
        (loss + aux_coef * moe.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        per_expert.append(moe.tokens_per_expert.tolist())
        losses.append(loss.item())
    return {"tokens_per_expert": per_expert, "losses": losses}


def mixtral(seed: int = 0):
    """The tiny Mixtral (models.TINY_MIXTRAL) with minidist's MoE in its blocks: (model, its MoE layers)."""
    torch.manual_seed(seed)
    model = build_mixtral()
    return model, with_minidist_moe(model)


def lm_step(model, layers, x, y) -> torch.Tensor:
    """The loss of one batch: next-token cross-entropy plus AUX_COEF x the layers' load-balancing losses."""
    logits = model(x).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    return loss + AUX_COEF * sum(m.aux_loss for m in layers)


def mixtral_ep_against_one_process(steps: int = 4, rows: int = 8, block: int = 16) -> dict:
    """The tiny Mixtral, experts sharded over every rank, each rank on its slice of the batch, AdamW, against one
    process on every slice (losses averaged): per step the mean of the ranks' losses and the reference's, the largest
    weight difference at the end over what this rank holds, and the all-to-all bytes of the run (counted)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    reference, ref_layers = mixtral()
    model = copy.deepcopy(reference)
    layers = [expert_parallel(m) for m in with_minidist_moe_layers(model)]
    opts = [torch.optim.AdamW(m.parameters(), lr=MIXTRAL_LR) for m in (reference, model)]
    losses, ref_losses = [], []
    with comm.ByteLedger() as ledger:
        for x, y in random_batches(TOKENS, rows, block, steps):
            ref = sum(lm_step(reference, ref_layers, xr, yr) for xr, yr in zip(x.chunk(world), y.chunk(world)))
            (ref / world).backward()
            loss = lm_step(model, layers, x.chunk(world)[rank], y.chunk(world)[rank])
            loss.backward()
            reduce_gradients(model)
            for opt in opts:
                opt.step()
                opt.zero_grad()
            mean = comm.all_reduce_sum(loss.detach().clone()) / world
            losses.append(mean.item())
            ref_losses.append(ref.item() / world)
    ref_params = dict(reference.named_parameters())
    diff = 0.0
    for name, p in model.named_parameters():
        if ".experts." in name:   # experts.<local index>.<...>: the global expert of this rank's block
            layer_name, local, rest = name.split(".experts.")[0], *name.split(".experts.")[1].split(".", 1)
            moe = model.get_submodule(layer_name)
            name = f"{layer_name}.experts.{moe.expert_ids[int(local)]}.{rest}"
        diff = max(diff, (p - ref_params[name]).abs().max().item())
    return {"losses": losses, "reference_losses": ref_losses, "weights": diff,
            "alltoall_bytes": ledger.total_bytes("all_to_all")}


def with_minidist_moe_layers(model) -> list[MoE]:
    """The MoE layers of a model whose blocks were replaced already (a deep copy of `mixtral()`'s model)."""
    return [m for m in model.modules() if isinstance(m, MoE)]
