"""The production references for chapter 13: Hugging Face's Mixtral block and DeepSpeed's MoE layer.

Mixtral (transformers' MixtralSparseMoeBlock) keeps the experts as two 3-D tensors, gate_up_proj (E, 2F, d) (the gate
rows, then the up rows) and down_proj (E, d, F), and the router as gate.weight (E, d); `from_mixtral` copies them into
a minidist MoE, expert by expert. DeepSpeed's `deepspeed.moe.layer.MoE` (GShard's algorithm: one-hot dispatch into
(E, capacity, d) buffers, an even all-to-all of those buffers) holds `num_experts / ep_size` local copies of the
expert module it is given; `load_deepspeed` copies a minidist MoE's router and this rank's experts into it.
"""
import contextlib
import io

import torch

from .layer import MoE


def mixtral_block(d_model: int, d_ff: int, n_experts: int, top_k: int = 2, seed: int = 0):
    """A MixtralSparseMoeBlock built from a MixtralConfig with random weights (nothing downloaded)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    config = MixtralConfig(hidden_size=d_model, intermediate_size=d_ff, num_local_experts=n_experts,
                           num_experts_per_tok=top_k, router_jitter_noise=0.0)
    config._experts_implementation = "eager"   # its loop over experts (a model sets this; a lone block must)
    torch.manual_seed(seed)
    block = MixtralSparseMoeBlock(config)
    for p in block.parameters():   # its tensors are created empty (the model's init fills them): fill them here
        torch.nn.init.normal_(p, std=0.2)
    return block


@torch.no_grad()
def from_mixtral(block, capacity_factor=None) -> MoE:
    """A minidist MoE with the weights of a Hugging Face MixtralSparseMoeBlock."""
    n_experts, two_ff, d_model = block.experts.gate_up_proj.shape
    moe = MoE(d_model, two_ff // 2, n_experts, block.top_k, capacity_factor=capacity_factor)
    moe.router.weight.copy_(block.gate.weight)
    for e, expert in enumerate(moe.experts):
        gate, up = block.experts.gate_up_proj[e].chunk(2, dim=0)
        expert.gate.weight.copy_(gate)
        expert.up.weight.copy_(up)
        expert.down.weight.copy_(block.experts.down_proj[e])
    return moe


def mixtral_aux_loss(block, x: torch.Tensor) -> torch.Tensor:
    """transformers' own load-balancing loss (load_balancing_loss_func) on the block's router logits for x."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    logits = block.gate(x.reshape(-1, x.shape[-1]))[0]
    return load_balancing_loss_func((logits,), block.gate.num_experts, block.top_k)


def deepspeed_moe(moe: MoE, ep_size: int):
    """DeepSpeed's MoE layer with `moe`'s weights (this rank's experts among the ep_size ranks), top-2, dropless
    (drop_tokens=False: its capacity becomes the largest count, all-reduced over the ep group), no random second
    choice (top2_2nd_expert_sampling=False), no random token priority (use_rts=False). DeepSpeed is set up already
    (deepspeed.init_distributed). Its forward returns (output, aux loss, counts)."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE
    from .layer import Expert
    if moe.top_k != 2:
        raise ValueError(f"the DeepSpeed reference is built top-2 here, this MoE is top-{moe.top_k}")
    d_ff = moe.experts[0].gate.out_features
    theirs = DeepSpeedMoE(moe.d_model, Expert(moe.d_model, d_ff), moe.n_experts, ep_size=ep_size, k=2,
                          drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
    with contextlib.redirect_stdout(io.StringIO()):   # it prints the group it creates, from every rank
        theirs.set_deepspeed_parallelism()
    with torch.no_grad():
        theirs.deepspeed_moe.gate.wg.weight.copy_(moe.router.weight)
        local = theirs.deepspeed_moe.experts.deepspeed_experts
        rank = torch.distributed.get_rank(theirs.deepspeed_moe.ep_group) if ep_size > 1 else 0
        per_rank = moe.n_experts // ep_size
        by_id = dict(zip(moe.expert_ids, moe.experts))
        for mine, target in zip([by_id[e] for e in range(rank * per_rank, (rank + 1) * per_rank)], local):
            target.load_state_dict(mine.state_dict())
            for p in target.parameters():
                p.expert_parallel = True   # for parallel.reduce_gradients (DeepSpeed's engine is not used)
    return theirs


def with_minidist_moe(model) -> list[MoE]:
    """Replace every MixtralSparseMoeBlock of a Hugging Face Mixtral model by a minidist MoE with its weights (in
    place); returns the MoE layers, in order. The model's forward is unchanged: its decoder layers call `mlp(h)`."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    layers = []
    for layer in model.model.layers:
        if isinstance(layer.mlp, MixtralSparseMoeBlock):
            layer.mlp = from_mixtral(layer.mlp)
            layers.append(layer.mlp)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MixtralSparseMoeBlock to replace")
    return layers
