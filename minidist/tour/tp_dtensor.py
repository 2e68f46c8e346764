"""PyTorch's own tensor parallelism (DTensor `parallelize_module`) on the same model and weights as minidist's.

minidist's plans translate style by style into PyTorch's ParallelStyles, on the same module-name patterns. Two
differences need care: DTensor shards a fused q|k|v projection in contiguous row blocks (so the copy it gets has its
rows laid out rank by rank beforehand, [q_r, k_r, v_r] for each r), and parallelize_module unties tied weights (they
are tied again afterwards).
"""
import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..mesh import Mesh
from ..tensor_parallel import shard_output_features
from ..tensor_parallel.plans import match_plan, parallelize
from ..tensor_parallel.vocab import VocabParallelEmbedding, vocab_parallel_cross_entropy
from .tp_setup import BATCHES, DTENSOR_STEPS, LR, build, logits_of


def dtensor_plan(plan: dict, sequence_parallel: bool, keyword_blocks=()) -> dict:
    """minidist's plan in PyTorch's ParallelStyles (same patterns). keyword_blocks: blocks whose hidden states
    come as hidden_states= (Hugging Face attention)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)
    sp, rep, seq = sequence_parallel, Replicate(), Shard(1)

    def block(pattern):
        if pattern in keyword_blocks:
            return PrepareModuleInput(input_kwarg_layouts={"hidden_states": seq},
                                      desired_input_kwarg_layouts={"hidden_states": rep})
        return PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(rep,))
    styles = {
        "colwise": lambda p: ColwiseParallel(), "colwise_qkv": lambda p: ColwiseParallel(),
        "rowwise": lambda p: RowwiseParallel(output_layouts=seq, use_local_output=False) if sp else RowwiseParallel(),
        "vocab_embedding": lambda p: RowwiseParallel(input_layouts=rep, output_layouts=rep),
        "vocab_head": lambda p: ColwiseParallel(input_layouts=seq if sp else rep, output_layouts=Shard(-1),
                                                use_local_output=False),
        "block_input": lambda p: block(p) if sp else None, "attention": lambda p: block(p) if sp else None,
        "sequence_norm": lambda p: SequenceParallel() if sp else None,
        "sequence_scatter": lambda p: PrepareModuleInput(input_layouts=(rep,), desired_input_layouts=(seq,))
        if sp else None,
    }
    return {p: s for p, style in plan.items() if (s := styles[style](p)) is not None}


def _fused_qkv_names(model: nn.Module, plan: dict) -> list[str]:
    return [name for name, style in match_plan(model, plan).items() if style == "colwise_qkv"]


def dtensor_model(base: nn.Module, plan: dict, sp: bool, mesh, n: int) -> nn.Module:
    """A copy of base parallelized by PyTorch with `plan` translated (see the module docstring)."""
    from torch.distributed.tensor.parallel import parallelize_module
    theirs = copy.deepcopy(base)
    for name in _fused_qkv_names(theirs, plan):
        for p in theirs.get_submodule(name).parameters():
            p.data = torch.cat([shard_output_features(p.data, r, n, 3) for r in range(n)])
    parallelize_module(theirs, mesh, dtensor_plan(plan, sp, keyword_blocks=("model.layers.*.self_attn",)))
    first = {}
    for name, p in base.named_parameters(remove_duplicate=False):
        if id(p) in first:
            prefix, _, leaf = name.rpartition(".")
            setattr(theirs.get_submodule(prefix), leaf, theirs.get_parameter(first[id(p)]))
        first.setdefault(id(p), name)
    return theirs


def local_diff(ours: nn.Module, theirs: nn.Module, grads: bool = False) -> float:
    """Largest difference between the two models' local shards, or gradients (collective when DTensor holds a
    gradient as Partial). Shapes must be equal, but for one case: DTensor splits an uneven vocabulary unevenly
    (171, 171, 170 rows of 512 at N = 3) where minidist pads it; our extra rows must then be padding (zeros).
    A shape that differs otherwise (a parameter one side did not shard) is an infinite difference."""
    worst, their_params = 0.0, dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        a, b = (p.grad, their_params[name].grad) if grads else (p, their_params[name])
        if hasattr(b, "placements"):  # a DTensor: its local shard; a Partial gradient (norms under SP) summed first
            b = b.full_tensor() if any(pl.is_partial() for pl in b.placements) else b.to_local()
        module = ours.get_submodule(name.rpartition(".")[0])
        padded = isinstance(module, VocabParallelEmbedding) or getattr(module, "valid_out", None) is not None \
            and module.valid_out < module.local_out
        if a.shape != b.shape and not (padded and a.shape[1:] == b.shape[1:] and 0 < a.shape[0] - b.shape[0]
                                       and not a[b.shape[0]:].any()):
            return float("inf")
        worst = max(worst, (a[:b.shape[0]] - b).abs().max().item())
    return worst


def dtensor_side_by_side(model: str = "gpt", sequence_parallel: bool = False) -> dict:
    """minidist's parallelize and PyTorch's DTensor parallelize_module on the same weights, trained DTENSOR_STEPS
    AdamW steps: the largest difference of the losses and first-step gradients, and of the final weights."""
    from torch.distributed.tensor.parallel import loss_parallel
    n = dist.get_world_size()
    mesh = Mesh.build(tp=n)
    torch.manual_seed(0)
    base, plan = build(model, n)
    ours = parallelize(copy.deepcopy(base), mesh.group("tp"), plan, sequence_parallel)
    theirs = dtensor_model(base, plan, sequence_parallel, mesh.device_mesh(axes=("tp",)), n)
    opts = torch.optim.AdamW(ours.parameters(), lr=LR), torch.optim.AdamW(theirs.parameters(), lr=LR)
    diffs = []
    for step, (x, y) in enumerate(BATCHES[:DTENSOR_STEPS]):
        loss = vocab_parallel_cross_entropy(logits_of(ours(x)), y, mesh.group("tp"))
        loss.backward()
        with loss_parallel():
            ref_loss = F.cross_entropy(logits_of(theirs(x)).flatten(0, 1), y.flatten())
            ref_loss.backward()
        diffs.append(abs(loss.item() - ref_loss.full_tensor().item()))
        if step == 0:
            diffs.append(local_diff(ours, theirs, grads=True))
        for o in opts:
            o.step()
            o.zero_grad()
    weights = local_diff(ours, theirs)
    return {"first": max(diffs), "weights": weights}
