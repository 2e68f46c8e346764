"""parallelize(model, group, plan): tensor and sequence parallelism applied to a model from outside.

The model holds no parallel code. A plan maps module-name patterns (fnmatch, "blocks.*.attn.qkv") to a style, the
way torchtitan's and Hugging Face's tensor-parallel plans do; parallelize swaps or hooks the matching modules:

    colwise           nn.Linear -> ColumnParallelLinear (output features split)
    colwise_qkv       the same for a fused q|k|v projection of three equal thirds (not grouped-query attention's
                      q|k|v, whose k and v are smaller): each third split on its own, so a rank owns whole heads
    rowwise           nn.Linear -> RowParallelLinear (input features split; g after it)
    vocab_embedding   nn.Embedding -> VocabParallelEmbedding (vocabulary rows split, padded to a multiple of N)
    vocab_head        the output layer: column-parallel over the padded vocabulary, logits left split (for
                      vocab_parallel_cross_entropy); a weight tied to the embedding stays tied (the same rows)
    block_input       a block (MLP) whose input enters the parallel region once, for all the colwise layers in it:
                      f, or with sequence parallelism the all-gather along the sequence
    attention         block_input, after checking that N divides the heads (and key-value heads: grouped-query
                      attention keeps each rank's query heads with the key-value heads they read)
    sequence_norm     a norm between blocks. With sequence parallelism it runs on a sequence shard, so its
                      parameters' gradients are partial: they are summed over the group in backward
    sequence_scatter  the module whose input is split along the sequence (the first layer), with sequence parallelism

Without sequence parallelism the last two do nothing: norms see the whole, replicated sequence. With it, every
replicated parameter from the sequence_scatter module on must be in a sequence_norm entry (or be a row-parallel
bias): any other one would get a partial gradient silently, so parallelize refuses the plan.

Dropout is not managed: Megatron keeps two random streams (the same masks on every rank where values are
replicated, different ones where each rank holds its own heads or positions); here every rank draws from the same
stream, so the masks of different shards are copies of each other. minidist's checks run with dropout 0.

Parameter names stay those of the original model; a parallel parameter is this rank's shard of the original tensor
(full_parameters gathers them back; local_shard says, without communicating, which part of a dense tensor a rank
holds). Every size is checked before any module changes: a dimension N does not divide raises a ValueError naming
the module, the size and N.

Communication per training step, per transformer layer, with S = s*b*h activation bytes and a ring of N ranks:
    without sequence parallelism   4 all-reduces of S (2 forward, 2 backward)       4 * 2(N-1)/N * S
    with it                        4 all-gathers + 4 reduce-scatters of S,          10 * (N-1)/N * S
                                   + 2 all-gathers re-gathering saved shards
                                   + all-reduces of the norms' (and row biases') gradients
plus the embedding, the output layer and the loss (tp_bytes_per_step in tour/tensor_parallel.py writes it all out).
"""
from fnmatch import fnmatchcase

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import comm
from .layers import ColumnParallelLinear, RowParallelLinear, prepare_input, shard_output_features
from .vocab import VocabParallelEmbedding

GPT_PLAN = {  # minidist.models.GPT
    "wte": "vocab_embedding",
    "blocks.0": "sequence_scatter",
    "blocks.*.ln[12]": "sequence_norm",
    "blocks.*.attn": "attention",
    "blocks.*.attn.qkv": "colwise_qkv",
    "blocks.*.attn.proj": "rowwise",
    "blocks.*.mlp": "block_input",
    "blocks.*.mlp.fc": "colwise",
    "blocks.*.mlp.proj": "rowwise",
    "ln_f": "sequence_norm",
    "lm_head": "vocab_head",
}

LLAMA_PLAN = {  # transformers' LlamaForCausalLM
    "model.embed_tokens": "vocab_embedding",
    "model.layers.0": "sequence_scatter",
    "model.layers.*.input_layernorm": "sequence_norm",
    "model.layers.*.post_attention_layernorm": "sequence_norm",
    "model.layers.*.self_attn": "attention",
    "model.layers.*.self_attn.[qkv]_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp": "block_input",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
    "model.norm": "sequence_norm",
    "lm_head": "vocab_head",
}

STYLES = ("colwise", "colwise_qkv", "rowwise", "vocab_embedding", "vocab_head", "block_input", "attention",
          "sequence_norm", "sequence_scatter")


def match_plan(model: nn.Module, plan: dict[str, str]) -> dict[str, str]:
    """Module name -> style, in the model's module order; every pattern must match, no module twice."""
    unknown = sorted({s for s in plan.values() if s not in STYLES})
    if unknown:
        raise ValueError(f"unknown tensor-parallel style(s) {unknown}; the styles are {list(STYLES)}")
    styles, used = {}, set()
    for name, _ in model.named_modules():
        hits = [p for p in plan if fnmatchcase(name, p)]
        if len(hits) > 1:
            raise ValueError(f"{name} matches several plan entries: {hits}")
        if hits:
            styles[name] = plan[hits[0]]
            used.add(hits[0])
    if set(plan) - used:
        raise ValueError(f"plan entries match no module of {type(model).__name__}: {sorted(set(plan) - used)}")
    return styles


def _heads(module: nn.Module) -> list[tuple[int, str]]:
    """(count, what) for the head counts of an attention module: minidist's GPT or a Hugging Face config."""
    cfg = getattr(module, "config", None)
    found = [(getattr(module, "n_head", None) or getattr(cfg, "num_attention_heads", None), "heads"),
             (getattr(cfg, "num_key_value_heads", None), "key-value heads")]
    return [(count, what) for count, what in found if count]


def check_sizes(name: str, module: nn.Module, style: str, n: int) -> None:
    """Raise ValueError if `module` cannot take `style` on n ranks."""
    wanted = {"colwise": nn.Linear, "colwise_qkv": nn.Linear, "rowwise": nn.Linear, "vocab_head": nn.Linear,
              "vocab_embedding": nn.Embedding}.get(style)
    if wanted and not isinstance(module, wanted):
        raise ValueError(f"{name}: style {style!r} needs an nn.{wanted.__name__}, got {type(module).__name__}")
    problems = []
    if style == "attention":
        heads = _heads(module)
        if not heads:
            raise ValueError(f"{name}: style 'attention' found no head count (n_head or config.num_attention_heads)")
        problems = [f"{count} {what}" for count, what in heads if count % n]
    elif style in ("colwise", "colwise_qkv") and module.out_features % ((3 if style == "colwise_qkv" else 1) * n):
        problems = [f"{module.out_features} output features" + (" (3 x q, k, v)" if style == "colwise_qkv" else "")]
    elif style == "rowwise" and module.in_features % n:
        problems = [f"{module.in_features} input features"]
    if problems:
        raise ValueError(f"{name}: {' and '.join(problems)} are not divisible by tensor-parallel size {n}")


def _first_input(args, kwargs, transform):
    """Apply `transform` to a module's hidden-states input, positional or `hidden_states=`."""
    if args:
        return (transform(args[0]), *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": transform(kwargs["hidden_states"])}
    raise ValueError("a tensor-parallel block needs its hidden states as first argument or as hidden_states=")


def _scatter_sequence(x: torch.Tensor, group) -> torch.Tensor:
    n = comm.group_size(group)
    if x.shape[1] % n:
        raise ValueError(f"sequence length {x.shape[1]} is not divisible by tensor-parallel size {n}")
    return comm.split(x, group, dim=1)  # (B, T/N, C); backward: all-gather


def _hook_input(module, transform):
    module.register_forward_pre_hook(lambda m, args, kwargs: _first_input(args, kwargs, transform), with_kwargs=True)
    return module


def _apply(style: str, module: nn.Module, group, sp: bool, ready: bool, memo: dict) -> nn.Module:
    """The module that replaces `module` (or `module` itself, hooked) under `style`."""
    if style in ("colwise", "colwise_qkv", "vocab_head"):
        return ColumnParallelLinear.from_linear(module, group, chunks=3 if style == "colwise_qkv" else 1,
                                                pad=style == "vocab_head", memo=memo, sequence_parallel=sp,
                                                input_ready=ready)
    if style == "rowwise":
        return RowParallelLinear.from_linear(module, group, memo=memo, sequence_parallel=sp)
    if style == "vocab_embedding":
        return VocabParallelEmbedding.from_embedding(module, group, memo=memo)
    if style in ("block_input", "attention"):
        return _hook_input(module, lambda x: prepare_input(x, group, sp))
    if style == "sequence_norm" and sp:
        for p in module.parameters(recurse=False):  # partial gradients (from T/N positions) summed, each backward
            p.register_hook(lambda grad: comm.all_reduce_sum(grad, group))
    if style == "sequence_scatter" and sp:
        _hook_input(module, lambda x: _scatter_sequence(x, group))
    return module


def parallelize(model: nn.Module, group=None, plan: dict[str, str] | None = None,
                sequence_parallel: bool = False) -> nn.Module:
    """Apply `plan` (module-name pattern -> style) to `model` on the ranks of `group`, in place; returns the model.

    Every rank of the group must call it, on the same weights (each keeps its shard). The model's logits come out
    split by vocabulary: train it with vocab_parallel_cross_entropy(logits, targets, group).
    """
    if plan is None:
        raise ValueError("parallelize needs a plan (GPT_PLAN, LLAMA_PLAN, or your own {pattern: style})")
    n = comm.group_size(group)
    styles = match_plan(model, plan)
    if sequence_parallel and "sequence_scatter" not in styles.values():
        raise ValueError("sequence parallelism needs a 'sequence_scatter' entry in the plan: the module (the first "
                         "layer) whose input is split along the sequence")
    for name, style in styles.items():  # all checks before the first change: a failure leaves the model intact
        check_sizes(name, model.get_submodule(name), style, n)
        heads = _heads(model.get_submodule(name.rpartition(".")[0])) if style == "colwise_qkv" else []
        if len({count for count, _ in heads}) > 1:  # grouped-query attention: k and v are not a third each
            raise ValueError(f"{name}: 'colwise_qkv' cuts three equal thirds, but its attention has "
                             f"{' and '.join(f'{c} {w}' for c, w in heads)}: use separate q, k, v projections")
    if sequence_parallel:
        _check_sequence_region(model, styles)
    blocks = [name for name, style in styles.items() if style in ("block_input", "attention")]
    memo = {}  # original parameter -> its shard, so tied weights stay tied
    for name, style in styles.items():
        ready = any(name.startswith(b + ".") for b in blocks)  # input already made whole by the enclosing block
        new = _apply(style, model.get_submodule(name), group, sequence_parallel, ready, memo)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def _check_sequence_region(model: nn.Module, styles: dict[str, str]) -> None:
    """Under sequence parallelism, refuse replicated parameters that would run on sequence shards without their
    gradients being summed: those of modules from the sequence_scatter one on, in no sharding or sequence_norm entry."""
    names = [name for name, _ in model.named_modules()]
    first = names.index(next(name for name, style in styles.items() if style == "sequence_scatter"))
    handled = ("colwise", "colwise_qkv", "rowwise", "vocab_head", "vocab_embedding", "sequence_norm")
    partial = [f"{name}.{p}" if name else p for name in names[first:] if styles.get(name) not in handled
               for p, _ in model.get_submodule(name).named_parameters(recurse=False)]
    if partial:
        raise ValueError(f"sequence parallelism: {', '.join(partial[:4])} would run on sequence shards and get partial "
                         "gradients: add them to the plan as 'sequence_norm' (their gradients are then summed)")


def sharded_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters that are this rank's shard (the others are replicated on every rank)."""
    names = set()
    for prefix, m in model.named_modules():
        own = {"weight", "bias"} if isinstance(m, (ColumnParallelLinear, VocabParallelEmbedding)) else \
            {"weight"} if isinstance(m, RowParallelLinear) else set()
        names |= {f"{prefix}.{p}" if prefix else p for p, _ in m.named_parameters(recurse=False) if p in own}
    return names & {name for name, _ in model.named_parameters()}


def _unshard(m: nn.Module, t: torch.Tensor, group) -> torch.Tensor:
    """The full tensor of which t (a weight or bias of module m) is this rank's shard."""
    n = comm.group_size(group)
    if isinstance(m, RowParallelLinear):
        return comm.all_gather_cat(t, group, dim=1)
    full = comm.all_gather_cat(t, group)                                 # rank-ordered rows, padding included
    chunks = getattr(m, "chunks", 1)                                    # a fused q|k|v: rank blocks of q, k, v
    full = full.view(n, chunks, -1, *t.shape[1:]).transpose(0, 1).reshape(-1, *t.shape[1:])
    rows = m.num_embeddings if isinstance(m, VocabParallelEmbedding) else m.out_features
    return full[:rows]


def full_parameters(model: nn.Module, group=None, grads: bool = False) -> dict[str, torch.Tensor]:
    """Name -> the full (unsharded) parameter, or its gradient, as the dense model would hold it (collective)."""
    sharded, out = sharded_parameters(model), {}
    for name, p in model.named_parameters():
        t = (p.grad if grads else p).detach()
        prefix = name.rpartition(".")[0]
        out[name] = _unshard(model.get_submodule(prefix), t, group) if name in sharded else t.clone()
    return out


def local_shard(model: nn.Module, name: str, dense: torch.Tensor, group=None) -> torch.Tensor:
    """The part of `dense` (the dense model's parameter `name`, or its gradient) that this rank's parameter `name`
    holds: its shard, the vocabulary padded with zeros, or all of it for a replicated parameter. No communication."""
    prefix, _, leaf = name.rpartition(".")
    m, n, rank = model.get_submodule(prefix), comm.group_size(group), dist.get_rank(group)
    if isinstance(m, RowParallelLinear):
        return dense if leaf == "bias" else dense.chunk(n, dim=1)[rank]
    if isinstance(m, (ColumnParallelLinear, VocabParallelEmbedding)):
        rows = m.weight.shape[0] * n                                    # the padded vocabulary, or all rows
        padded = torch.cat([dense, dense.new_zeros(rows - dense.shape[0], *dense.shape[1:])])
        return shard_output_features(padded, rank, n, getattr(m, "chunks", 1))
    return dense
