"""Cutting the tiny GPT into pipeline stages: embeddings on the first, transformer blocks spread evenly, the final
LayerNorm, LM head (and, in the runtime, the loss) on the last.

Stage s of S holds blocks[start:stop] from `partition(n_layer, S)`: consecutive blocks, stage sizes differing by at
most one, the larger stages first (the last stage also carries the LM head, whose vocab-sized matmul is the
heaviest single layer). A stage without a block would only shuffle data, so fewer blocks than stages is an error.

Tied embeddings across stages. The tiny GPT ties its LM head to the token embedding (one parameter, used by the
first and the last stage). In a pipeline those stages live on different ranks, each with its own copy: each copy
receives only its own stage's part of the gradient, so before the optimizer step the two ranks add their parts
(Megatron-LM's "embedding group" all-reduce); both copies then take the same step and stay equal. `Stage.tied`
names the parameters this applies to; the runtime exchanges their gradients.

Here every rank builds the whole (tiny) model and keeps its own stages, so that all ranks start from the same
weights and can be compared with one process; a model too large for one device would be built on the meta device
and only the rank's own stages materialized.
"""
import torch
import torch.nn as nn


def partition(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """(start, stop) of the blocks of each stage: consecutive, covering range(n_layers) in order, sizes differing
    by at most one, the first n_layers % n_stages stages one block larger.

    Graded: the exact list for any n_layers >= n_stages >= 1; when n_stages > n_layers (a stage would get no block),
    a ValueError whose message names both numbers, the blocks first ("cannot cut 2 blocks into 4 pipeline stages").
    Non-positive sizes are refused before your part (given).
    """
    for name, value in (("n_layers", n_layers), ("n_stages", n_stages)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    # <exercise partition points=2>
    # hint: every stage gets n_layers // n_stages blocks; the remainder goes one each to the first stages.
    # hint: check the sizes before cutting: a pipeline of 4 stages needs at least 4 blocks.
    if n_stages > n_layers:
        raise ValueError(f"cannot cut {n_layers} blocks into {n_stages} pipeline stages: every stage needs at least "
                         f"one block (use fewer stages, or a model with at least {n_stages} layers)")
    base, extra = divmod(n_layers, n_stages)
    bounds, start = [], 0
    for s in range(n_stages):
        stop = start + base + (1 if s < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds
    # </exercise>


class Stage(nn.Module):
    """Stage `index` of `n_stages` of a GPT: [embeddings] + blocks[start:stop] + [final LayerNorm, LM head].

    It holds the model's own submodules (no copy): on a rank, a stage trains the very parameters of that rank's
    model, so they can be compared by name with a reference model.
    """

    def __init__(self, model, index: int, n_stages: int, start: int, stop: int):
        super().__init__()
        self.index, self.first, self.last = index, index == 0, index == n_stages - 1
        if self.first:
            self.wte, self.wpe, self.drop = model.wte, model.wpe, model.drop
        self.blocks = nn.ModuleList(model.blocks[start:stop])
        if self.last:
            self.ln_f, self.lm_head = model.ln_f, model.lm_head
        tied = n_stages > 1 and model.lm_head.weight is model.wte.weight
        self.tied = [model.wte.weight] if tied and (self.first or self.last) else []
        # state_dict key here -> the key of the same tensor in the whole model ("blocks.0" of stage 1 may be the
        # model's "blocks.2"): a checkpoint names tensors as the whole model does, so any partition can load it.
        whole = {}
        for name, t in model.state_dict(keep_vars=True).items():
            whole.setdefault(id(t), []).append(name)
        self.global_names = {name: name if name in whole[id(t)] else whole[id(t)][0]
                             for name, t in self.state_dict(keep_vars=True).items()}

    def forward(self, x):               # first stage: (b, T) token ids; the others: (b, T, C) activations
        if self.first:
            x = self.drop(self.wte(x) + self.wpe(torch.arange(x.shape[1], device=x.device)))  # (b, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x)) if self.last else x                              # last: (b, T, vocab)


def split_gpt(model, n_stages: int) -> list[Stage]:
    """The S = n_stages stages of `model` (a minidist GPT), in order."""
    return [Stage(model, s, n_stages, start, stop)
            for s, (start, stop) in enumerate(partition(len(model.blocks), n_stages))]


def rank_stages(model, p: int, rank: int, v: int = 1) -> list[Stage]:
    """The v chunks of pipeline rank `rank` of p: chunk c is virtual stage c * p + rank (Megatron's layout)."""
    stages = split_gpt(model, p * v)
    return [stages[c * p + rank] for c in range(v)]


def parameter_names(model) -> dict[int, str]:
    """id(parameter) -> its name in `model` (a tied parameter under its first name), to compare stages with it."""
    return {id(p): name for name, p in model.named_parameters()}
