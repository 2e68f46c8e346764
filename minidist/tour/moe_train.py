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


ATTENTION_TP = {"model.layers.*.self_attn": "attention", "model.layers.*.self_attn.[qkv]_proj": "colwise",
                "model.layers.*.self_attn.o_proj": "rowwise"}   # tensor parallelism of the attention only


def mixtral_ep_against_one_process(steps: int = 4, rows: int = 8, block: int = 16, tp: int = 1) -> dict:
    """The tiny Mixtral, experts sharded over an ep group (world / tp ranks, each on its slice of the batch), the
    attention tensor-parallel over tp ranks when tp > 1 (they share a slice: every tp rank runs the same tokens through
    the same experts), AdamW, against one process on every slice (losses averaged): per step the mean of the slices'
    losses and the reference's, the largest difference at the end between this rank's weights and its part of the
    reference's, and the all-to-all bytes of the run (counted)."""
    from ..mesh import Mesh
    from ..tensor_parallel import parallelize
    from ..tensor_parallel.plans import local_shard
    world = dist.get_world_size()
    mesh = Mesh.from_axes([("ep", world // tp), ("tp", tp)])
    ep, rank = mesh.size("ep"), mesh.local_rank("ep")
    reference, ref_layers = mixtral()
    model = copy.deepcopy(reference)
    if tp > 1:
        parallelize(model, mesh.group("tp"), ATTENTION_TP)
    layers = [expert_parallel(m, mesh.group("ep")) for m in with_minidist_moe_layers(model)]
    opts = [torch.optim.AdamW(m.parameters(), lr=MIXTRAL_LR) for m in (reference, model)]
    losses, ref_losses = [], []
    with comm.ByteLedger() as ledger:
        for x, y in random_batches(TOKENS, rows, block, steps):
            ref = sum(lm_step(reference, ref_layers, xr, yr) for xr, yr in zip(x.chunk(ep), y.chunk(ep)))
            (ref / ep).backward()
            loss = lm_step(model, layers, x.chunk(ep)[rank], y.chunk(ep)[rank])
            loss.backward()
            reduce_gradients(model, mesh.group("ep"))   # the tp ranks' experts are identical copies: no replicas
            for opt in opts:
                opt.step()
                opt.zero_grad()
            losses.append((comm.all_reduce_sum(loss.detach().clone(), mesh.group("ep")) / ep).item())
            ref_losses.append(ref.item() / ep)
    ref_params = dict(reference.named_parameters())
    diff = 0.0
    for name, p in model.named_parameters():
        dense = name
        if ".experts." in name:   # experts.<local index>.<...>: the global expert of this rank's block
            layer_name, local, rest = name.split(".experts.")[0], *name.split(".experts.")[1].split(".", 1)
            dense = f"{layer_name}.experts.{model.get_submodule(layer_name).expert_ids[int(local)]}.{rest}"
        expected = local_shard(model, name, ref_params[dense].detach(), mesh.group("tp")) if tp > 1 \
            else ref_params[dense]
        diff = max(diff, (p - expected).abs().max().item())
    return {"losses": losses, "reference_losses": ref_losses, "weights": diff,
            "alltoall_bytes": ledger.total_bytes("all_to_all")}


def with_minidist_moe_layers(model) -> list[MoE]:
    """The MoE layers of a model whose blocks were replaced already (a deep copy of `mixtral()`'s model)."""
    return [m for m in model.modules() if isinstance(m, MoE)]
