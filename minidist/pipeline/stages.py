"""Cutting the tiny GPT (or a Hugging Face Llama) into pipeline stages: embeddings on the first, transformer blocks
spread evenly, the final norm, LM head (and, in the runtime, the loss) on the last.

Stage s of S holds blocks[start:stop] from `partition(n_layer, S)`: consecutive blocks, stage sizes differing by at
most one, the larger stages first (the last stage also carries the LM head, whose vocab-sized matmul is the
heaviest single layer). A stage without a block would only shuffle data, so fewer blocks than stages is an error.

Tied embeddings across stages. The tiny GPT ties its LM head to the token embedding (one parameter, used by the
first and the last stage). In a pipeline those stages live on different ranks, each with its own copy: each copy
receives only its own stage's part of the gradient, so before the optimizer step the two ranks add their parts
(Megatron-LM's "embedding group" all-reduce); both copies then take the same step and stay equal. `Stage.tied`
names the parameters this applies to; the runtime exchanges their gradients.

A Llama's decoder layers take their rotary position embeddings (cos, sin) from the model's `rotary_emb`, which has no
parameters: every stage holds it and computes them for its own layers, as LlamaModel.forward does once for all.
Causal masking is SDPA's default when no mask is given (as in the model's own forward, without padding).

Here every rank builds the whole (tiny) model and keeps its own stages, so that all ranks start from the same
weights and can be compared with one process; a model too large for one device would be built on the meta device
and only the rank's own stages materialized.
"""
import torch
import torch.nn as nn

from .actions import VSchedule, is_v, stage_of
from .schedule import shape, validate


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


def is_llama(model) -> bool:
    """A Hugging Face *ForCausalLM (model.model.layers), not a minidist GPT (model.blocks)."""
    return hasattr(model, "model") and hasattr(model.model, "layers")


def blocks_of(model) -> nn.ModuleList:
    return model.model.layers if is_llama(model) else model.blocks


def input_embedding(model) -> nn.Parameter:
    return model.get_input_embeddings().weight if is_llama(model) else model.wte.weight


def hidden_size(model) -> int:
    return model.config.hidden_size if is_llama(model) else model.cfg.n_embd


class Stage(nn.Module):
    """Stage `index` of `n_stages` of a GPT: [embeddings] + blocks[start:stop] + [final LayerNorm, LM head] (of a
    Llama: [embed_tokens] + layers[start:stop] + [norm, lm_head], with the rotary embedding on every stage).

    It holds the model's own submodules (no copy): on a rank, a stage trains the very parameters of that rank's
    model, so they can be compared by name with a reference model.
    """

    def __init__(self, model, index: int, n_stages: int, start: int, stop: int):
        super().__init__()
        self.index, self.first, self.last, self.llama = index, index == 0, index == n_stages - 1, is_llama(model)
        if self.llama and model.config._attn_implementation != "sdpa":
            raise ValueError(f"pipeline stages of a Llama rely on SDPA's causal mask; this model's attention is "
                             f"{model.config._attn_implementation!r}")
        if self.first:
            if self.llama:
                self.embed_tokens = model.model.embed_tokens
            else:
                self.wte, self.wpe, self.drop = model.wte, model.wpe, model.drop
        self.blocks = nn.ModuleList(blocks_of(model)[start:stop])
        if self.last:
            if self.llama:
                self.norm, self.lm_head = model.model.norm, model.lm_head
            else:
                self.ln_f, self.lm_head = model.ln_f, model.lm_head
        if self.llama:
            self.rotary_emb = model.model.rotary_emb   # buffers only, not saved (persistent=False)
        embedding = input_embedding(model)
        tied = n_stages > 1 and model.lm_head.weight is embedding
        self.tied = [embedding] if tied and (self.first or self.last) else []
        # state_dict key here -> the key of the same tensor in the whole model ("blocks.0" of stage 1 may be the
        # model's "blocks.2"): a checkpoint names tensors as the whole model does, so any partition can load it.
        whole = {}
        for name, t in model.state_dict(keep_vars=True).items():
            whole.setdefault(id(t), []).append(name)
        self.global_names = {name: name if name in whole[id(t)] else whole[id(t)][0]
                             for name, t in self.state_dict(keep_vars=True).items()}

    def forward(self, x):               # first stage: (b, T) token ids; the others: (b, T, C) activations
        positions = torch.arange(x.shape[1], device=x.device)
        if self.first and self.llama:
            x = self.embed_tokens(x)                                                       # (b, T, C)
        elif self.first:
            x = self.drop(self.wte(x) + self.wpe(positions))                               # (b, T, C)
        rope = self.rotary_emb(x, positions[None]) if self.llama else None                # (1, T, head dim) x 2
        for block in self.blocks:
            x = block(x, position_embeddings=rope, position_ids=positions[None]) if self.llama else block(x)
        if not self.last:
            return x
        return self.lm_head(self.norm(x) if self.llama else self.ln_f(x))                  # last: (b, T, vocab)


def split_gpt(model, n_stages: int) -> list[Stage]:
    """The S = n_stages stages of `model` (a minidist GPT or a Hugging Face Llama), in order."""
    return [Stage(model, s, n_stages, start, stop)
            for s, (start, stop) in enumerate(partition(len(blocks_of(model)), n_stages))]


def rank_stages(model, p: int, rank: int, v: int = 1, v_shape: bool = False) -> list[Stage]:
    """The v chunks of pipeline rank `rank` of p: chunk c is virtual stage c * p + rank (Megatron's layout), or
    with v_shape (v = 2, ZB-V and DualPipeV) stages rank and 2p - 1 - rank."""
    if v_shape and v != 2:
        raise ValueError(f"the V placement puts exactly 2 chunks on each rank, got v={v}")
    stages = split_gpt(model, p * v)
    return [stages[2 * p - 1 - rank if v_shape and c else c * p + rank] for c in range(v)]


def checked_schedule(schedule, v_shape: bool | None = None):
    """The schedule as the runtime runs it, validated: on the V placement if v_shape (None: if it is a VSchedule).
    A deadlock that the V placement would not have is refused with that hint (a list() copy of a VSchedule)."""
    if v_shape is not None and v_shape != is_v(schedule):
        schedule = VSchedule(schedule) if v_shape else list(schedule)
    try:
        validate(schedule)
    except ValueError as e:
        if is_v(schedule) or shape(schedule)[2] != 2:
            raise
        try:
            validate(VSchedule(schedule))
        except ValueError:
            raise e from None
        raise ValueError(f"{e}; the schedule runs on the V placement: a copy of a VSchedule that lost its type? "
                         f"Pass PipelineRuntime(..., v_shape=True)") from None
    return schedule


def check_placement(stages, rank: int, p: int, v_shape: bool) -> None:
    """Refuse chunks that do not hold the stage a schedule's placement gives them (the runtime's check): their
    messages would go to ranks that do not expect them (gloo aborts, NCCL hangs)."""
    for c, stage in enumerate(stages):
        want = stage_of(rank, c, p, v_shape)
        if getattr(stage, "index", want) != want:
            raise ValueError(
                f"rank {rank}'s chunk {c} holds stage {stage.index}, but the schedule's "
                f"{'V' if v_shape else 'looped'} placement puts stage {want} there: build the stages with "
                f"rank_stages(model, p, rank, v, v_shape={v_shape}) (for a copy of a V schedule that lost its "
                f"VSchedule type, pass PipelineRuntime(..., v_shape=True))")


def parameter_names(model) -> dict[int, str]:
    """id(parameter) -> its name in `model` (a tied parameter under its first name), to compare stages with it."""
    return {id(p): name for name, p in model.named_parameters()}
