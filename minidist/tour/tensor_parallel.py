"""Tour checks for chapter 04 (tensor and sequence parallelism), and the formulas they check against.

The rank functions train the tiny GPT and a small Hugging Face Llama parallelized by minidist next to one process
holding the same weights, and next to PyTorch's DTensor tensor parallelism; the tests call the same functions.
"""
import copy
import time
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .. import comm
from ..launch import launch
from ..memory import SavedActivations, measure_state_bytes
from ..mesh import Mesh
from ..models import GPT, lm_loss
from ..tensor_parallel import padded_size, vocab_parallel_cross_entropy
from ..tensor_parallel.plans import GPT_PLAN, local_shard, parallelize, sharded_parameters
from ..testing import replica_divergence
from .rows import covers, make_row
from .tp_dtensor import dtensor_side_by_side
from .tp_setup import BATCH, BATCHES, CFG, DTENSOR_STEPS, LR, STEPS, build, llama_config, logits_of  # noqa: F401

GRAD_TOL = 1e-5               # reduction order: a matmul summed in N slices, then across ranks, rounds differently
ADAM_TOL = 0.01 * LR * STEPS  # README: 1% of the most Adam can move a weight in STEPS steps
BF16_TOL = 1e-3               # README: bf16 weights after 4 SGD steps (lr 0.1) against one process under autocast
DTENSOR_TOL = 0.01 * LR * DTENSOR_STEPS


# The formulas.

def tp_bytes_per_step(n: int, layers: int, hidden: int, tokens: int, sequence_parallel: bool,
                      sp_grad_numel: int = 0) -> Fraction:
    """Bytes one rank sends in one training step of a parallelized transformer (fp32), on a ring of n ranks.

    S = 4 * tokens * hidden bytes of activations. Without sequence parallelism: 4 all-reduces of S per layer, one
    after the embedding (forward) and one before the output layer (backward). With it: per layer 4 all-gathers and
    4 reduce-scatters of S plus 2 all-gathers that re-gather saved shards; the embedding's all-reduce (minidist
    all-reduces the embedding output, then splits it by sequence, where Megatron reduce-scatters it), the backward
    all-gather of that split, the output layer's all-gather, reduce-scatter and re-gather; all-reduces of the
    sp_grad_numel parameters computed on sequence shards (norms, row-parallel biases). Either way the loss adds an
    all-gather of n x tokens maxima and an all-reduce of 2 x tokens sums. In all: ar + (10L + 4) ag + the gradients'
    all-reduce + loss with sequence parallelism, (4L + 2) ar + loss without.
    """
    act = 4 * tokens * hidden
    ar, ag = comm.ring_bytes("all_reduce", act, n), comm.ring_bytes("all_gather", act, n)
    loss = comm.ring_bytes("all_gather", 4 * n * tokens, n) + comm.ring_bytes("all_reduce", 4 * 2 * tokens, n)
    if not sequence_parallel:
        return (4 * layers + 2) * ar + loss
    return ar + (10 * layers + 4) * ag + comm.ring_bytes("all_reduce", 4 * sp_grad_numel, n) + loss


def sp_grad_numel(model: str, n: int) -> int:
    """Elements of the parameters whose gradients sequence parallelism sums over ranks."""
    if model == "gpt":
        return CFG.n_embd * (6 * CFG.n_layer + 2)  # per layer: 2 LayerNorms (weight, bias) + 2 row biases; ln_f
    return llama_config(n)["hidden_size"] * (2 * 2 + 1)  # 2 RMSNorms per layer (2 layers) + the final norm


def tp_param_bytes(model: str, n: int) -> int:
    """fp32 parameter bytes per rank: norms, row-parallel biases and positions replicated, 1/N of everything else
    (the vocabulary padded to a multiple of N)."""
    if model == "gpt":
        h, L, vp = CFG.n_embd, CFG.n_layer, padded_size(CFG.vocab_size, n)
        sharded = L * (12 * h * h + 7 * h) + vp * h        # qkv (3h^2 + 3h), proj (h^2), fc (4h^2 + 4h), proj (4h^2)
        replicated = L * 6 * h + 2 * h + CFG.block_size * h  # LayerNorms, 2 row biases per layer, ln_f, positions
    else:
        c = {**llama_config(n), "vocab_size": 512, "num_hidden_layers": 2}
        h, hd = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"]
        kv, inter, L = c["num_key_value_heads"] * hd, c["intermediate_size"], c["num_hidden_layers"]
        sharded = L * (2 * h * h + 2 * h * kv + 3 * h * inter) + padded_size(c["vocab_size"], n) * h
        replicated = L * 2 * h + h
    return 4 * (sharded // n + replicated)


def tp_activation_bytes_per_layer(seq: int, batch: int, hidden: int, heads: int, tp: int,
                                  sequence_parallel: bool, bytes_per_value: int = 4) -> int:
    """Activation bytes one GPT layer saves for backward on one of tp ranks (no dropout; Korthikanti et al. 2022).

    One process saves 16sbh + as^2b values (memory.activation_bytes_per_layer). Tensor parallelism splits what lies
    between f and g: q, k, v, scores, the projections' inputs, the MLP's 4h activations (12sbh + as^2b), and keeps
    4sbh replicated: the two LayerNorm inputs and the inputs of qkv and fc. Sequence parallelism splits those too.
    """
    sbh, as2b = seq * batch * hidden, heads * seq * seq * batch
    if sequence_parallel:
        return bytes_per_value * (16 * sbh + as2b) // tp
    return bytes_per_value * (4 * sbh + (12 * sbh + as2b) // tp)


def layernorm_stat_bytes(tokens: int) -> int:
    """What the formula leaves out: each of a layer's 2 LayerNorms keeps a mean and a 1/std per token (fp32)."""
    return 2 * 2 * 4 * tokens


# Rank functions.

def shard_diff(tp: nn.Module, dense: nn.Module, group=None, grads: bool = False) -> float:
    """Largest difference between this rank's parameters (or gradients) and its shards of the dense model's."""
    worst = 0.0
    for name, p in tp.named_parameters():
        mine, theirs = (p.grad, dense.get_parameter(name).grad) if grads else (p, dense.get_parameter(name))
        worst = max(worst, (mine - local_shard(tp, name, theirs.detach(), group)).abs().max().item())
    return worst


def logits_diff(tp: nn.Module, logits: torch.Tensor, dense_logits: torch.Tensor, group=None) -> float:
    """Largest difference between this rank's vocabulary slice of the logits and the same columns of the dense
    model's (padding columns, -inf, left out)."""
    head, rank = tp.lm_head, dist.get_rank(group)
    start = rank * head.local_out
    return (logits[..., :head.valid_out] - dense_logits[..., start:start + head.valid_out]).abs().max().item()


def replicated_divergence(tp: nn.Module, group=None) -> float:
    """replica_divergence over the replicated parameters only (flattened into one tensor: two collectives)."""
    sharded = sharded_parameters(tp)
    flat = torch.cat([p.detach().flatten() for name, p in tp.named_parameters() if name not in sharded])
    return replica_divergence(nn.ParameterList([nn.Parameter(flat)]), group)


def against_one_process(model: str = "gpt", sequence_parallel: bool = False) -> dict:
    """The parallelized model and one process with the same weights: logits, loss and every gradient of the first
    step (its bytes counted on minidist's ring), every gradient of the STEPS - 1 next ones ("grads": a gradient
    scaled by a constant would barely move AdamW's weights, but shows here), then the weights after STEPS AdamW
    steps; memory held per rank."""
    n = dist.get_world_size()
    group = Mesh.build(tp=n).group("tp")
    torch.manual_seed(0)
    ref, plan = build(model, n)
    tp = parallelize(copy.deepcopy(ref), group, plan, sequence_parallel)
    x, y = BATCHES[0]
    ref_logits = logits_of(ref(x))
    ref_loss = lm_loss(ref_logits, y)
    ref_loss.backward()
    with comm.ring_backend(), comm.ByteLedger() as ledger:
        logits = logits_of(tp(x))                                         # (B, T, V/N): this rank's vocabulary
        loss = vocab_parallel_cross_entropy(logits, y, group)
        loss.backward()
    first = max(logits_diff(tp, logits.detach(), ref_logits.detach(), group), abs(loss.item() - ref_loss.item()),
                shard_diff(tp, ref, group, grads=True))
    ref_opt, opt = torch.optim.AdamW(ref.parameters(), lr=LR), torch.optim.AdamW(tp.parameters(), lr=LR)
    grads = 0.0
    for x, y in BATCHES[1:]:
        for o in (ref_opt, opt):
            o.step()
            o.zero_grad()
        lm_loss(logits_of(ref(x)), y).backward()
        vocab_parallel_cross_entropy(logits_of(tp(x)), y, group).backward()
        grads = max(grads, shard_diff(tp, ref, group, grads=True))
    for o in (ref_opt, opt):
        o.step()
    embedding = tp.wte if model == "gpt" else tp.model.embed_tokens
    return {"first": first, "grads": grads, "weights": shard_diff(tp, ref, group), "bytes": ledger.total_bytes(),
            "counted": ledger.counted, "collectives": ledger.by_op(), "axes": {r.axis for r in ledger.records},
            "divergence": replicated_divergence(tp, group),
            "param_bytes": measure_state_bytes(tp).params, "tied": tp.lm_head.weight is embedding.weight}


def under_autocast(model: str = "gpt", sequence_parallel: bool = True, steps: int = 4) -> dict:
    """Both models under bf16 autocast, `steps` SGD steps (lr 0.1): the largest weight difference, and the
    replicated parameters' divergence across ranks (sequence parallelism's backward recomputes in bf16 too)."""
    group = Mesh.build(tp=dist.get_world_size()).group("tp")
    torch.manual_seed(0)
    ref, plan = build(model, dist.get_world_size())
    tp = parallelize(copy.deepcopy(ref), group, plan, sequence_parallel)
    opts = torch.optim.SGD(ref.parameters(), lr=0.1), torch.optim.SGD(tp.parameters(), lr=0.1)
    for x, y in BATCHES[:steps]:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            losses = lm_loss(logits_of(ref(x)), y), vocab_parallel_cross_entropy(logits_of(tp(x)), y, group)
        for loss, o in zip(losses, opts):
            loss.backward()
            o.step()
            o.zero_grad()
    return {"weights": shard_diff(tp, ref, group), "divergence": replicated_divergence(tp, group)}


def activations_per_layer(sequence_parallel: bool) -> dict:
    """Bytes one GPT layer (the second: the first splits the sequence) saves for backward on this rank."""
    n, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = parallelize(GPT(CFG), None, GPT_PLAN, sequence_parallel)
    h = torch.randn(BATCH, CFG.block_size, CFG.n_embd)
    h = (h.chunk(n, dim=1)[rank].clone() if sequence_parallel else h).requires_grad_()  # what this rank holds
    with SavedActivations(exclude=model) as saved:
        model.blocks[1](h).sum().backward()
    return {"bytes": saved.bytes, "layernorm_stats": layernorm_stat_bytes(h.shape[0] * h.shape[1]),
            "formula": tp_activation_bytes_per_layer(CFG.block_size, BATCH, CFG.n_embd, CFG.n_head, n,
                                                     sequence_parallel)}


def vocab_loss_demo(tokens: int = 48, vocab: int = 512) -> dict:
    """vocab_parallel_cross_entropy on random logits split over the ranks (the vocabulary padded to a multiple of N)
    against F.cross_entropy on all of them; the bytes it sends and those an all-gather of the logits would (counted)."""
    n, r = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(tokens, vocab, generator=g), torch.randint(vocab, (tokens,), generator=g)
    padding = torch.full((tokens, padded_size(vocab, n) - vocab), float("-inf"))
    local = torch.cat([logits, padding], dim=1).chunk(n, dim=1)[r].clone().requires_grad_()  # (M, V/N)
    with comm.ring_backend(), comm.ByteLedger() as ledger:
        loss = vocab_parallel_cross_entropy(local, targets)
        loss.backward()
    with comm.ring_backend(), comm.ByteLedger() as gather:
        comm.all_gather_cat(local.detach(), dim=1)
    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full, targets)
    ref.backward()
    expected = torch.cat([full.grad, torch.zeros_like(padding)], dim=1).chunk(n, dim=1)[r]  # padding: gradient 0
    return {"diff": abs(loss.item() - ref.item()), "grad_diff": (local.grad - expected).abs().max().item(),
            "columns": local.shape[1], "bytes": ledger.total_bytes(), "gather_bytes": gather.total_bytes(),
            "counted": ledger.counted}


# The tour's rows.

LABELS = {"gpt": "tiny GPT", "llama": "HF Llama (GQA)"}


def preload() -> None:
    """Import transformers' Llama and DTensor once in the parent: forked ranks inherit them (each rank would
    otherwise spend 3-4 s importing them)."""
    import torch.distributed.tensor.parallel  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401


def _timed(fn, *args):
    start = time.perf_counter()
    return launch(fn, *args), time.perf_counter() - start


@covers("TP + SP tiny GPT HF Llama (GQA) activations per layer")
def check_tensor_parallel(world_size: int) -> list[dict]:
    n, rows, tokens = world_size, [], BATCH * CFG.block_size
    preload()
    for model in ("gpt", "llama"):  # both: 2 layers, hidden 48
        for sp in (False, True):
            per_rank, seconds = _timed(against_one_process, n, model, sp)
            name = f"TP{' + SP' if sp else ''}, {LABELS[model]}"
            counted = sum(r["bytes"] for r in per_rank) / n if all(r["counted"] for r in per_rank) else None
            formula = tp_bytes_per_step(n, CFG.n_layer, CFG.n_embd, tokens, sp, sp_grad_numel(model, n))
            rows.append(make_row(f"{name}: logits, loss, {STEPS} steps' grads", "one process, same weights",
                                 max_abs_diff=max(max(r["first"], r["grads"]) for r in per_rank), tolerance=GRAD_TOL,
                                 comm_bytes=counted, comm_bytes_theory=formula, seconds=seconds))
            rows.append(make_row(f"{name}: {STEPS} AdamW steps, param bytes", "one process (AdamW)",
                                 max_abs_diff=max(r["weights"] for r in per_rank), tolerance=ADAM_TOL,
                                 replica_divergence=max(r["divergence"] for r in per_rank),
                                 state_bytes_per_rank=max(r["param_bytes"] for r in per_rank),
                                 state_bytes_per_rank_theory=tp_param_bytes(model, n), seconds=seconds))
        for sp in (False, True):
            per_rank, seconds = _timed(dtensor_side_by_side, n, model, sp)
            name = f"TP{' + SP' if sp else ''}, {LABELS[model]}"
            rows.append(make_row(f"{name}: {DTENSOR_STEPS} AdamW steps", "DTensor parallelize_module",
                                 tolerance=DTENSOR_TOL, seconds=seconds,
                                 max_abs_diff=max(max(r["first"], r["weights"]) for r in per_rank)))
    per_rank, seconds = _timed(under_autocast, n, "gpt", True)
    rows.append(make_row("TP + SP, tiny GPT: 4 SGD steps under bf16 autocast", "one process under autocast",
                         max_abs_diff=max(r["weights"] for r in per_rank), tolerance=BF16_TOL, seconds=seconds,
                         replica_divergence=max(r["divergence"] for r in per_rank)))
    for sp in (False, True):
        per_rank, seconds = _timed(activations_per_layer, n, sp)
        r = per_rank[0]
        rows.append(make_row(f"TP{' + SP' if sp else ''}: activations per layer (fp32)",
                             "Korthikanti et al. + LN statistics", seconds=seconds, tolerance=0,
                             max_abs_diff=max(abs(r["bytes"] - r["formula"] - r["layernorm_stats"]) for r in per_rank))
                    | {"activation_bytes": r["bytes"], "activation_bytes_theory": r["formula"]})
    return rows


CHECKS = [check_tensor_parallel]
