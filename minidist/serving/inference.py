"""Generating text with a KV cache, in one process or tensor-parallel: `generate(model, input_ids, max_new_tokens)`.

A decoder produces one token per forward pass. Recomputing the whole sequence at every step costs O(T^2) attention
and O(T) matmuls per token; but the keys and values of past positions never change (attention is causal), so they are
kept: the KV cache. Generation then has two phases:

    prefill   the prompt (B, P) in one pass: every layer writes P keys and values per row into the cache
    decode    one token per row (B, 1) per step: each layer writes one key and value, and its query attends to all
              the cached ones; only the last position's logits are needed, so the output layer runs on it alone

Cost of the cache, per token of context and per rank, with L layers, H_kv key-value heads of dimension d, b bytes
per value and tensor-parallel size tp (each rank holds the keys and values of its own heads):

    KV-cache bytes per token = 2 * L * H_kv * d * b / tp        (Llama-2 7B in fp16, tp = 1: 512 KiB per token)

Decoding is memory-bound: each step reads every weight and the whole cache to produce B tokens, so batching more
rows is nearly free until compute catches up (Pope et al. 2022, "Efficiently Scaling Transformer Inference").

Tensor parallelism needs nothing new: `parallelize(model, group, GPT_PLAN or LLAMA_PLAN)` (chapter 04) leaves each
rank the q, k, v rows of whole heads, and the cached forward below reads the number of heads from the shapes, so
each rank's cache holds only its heads: sharded by heads, with no communication for attention at all. Per forward
of B rows x T tokens of width C (fp32), the ranks exchange what the layers already do,

    (2 L + 1) all-reduces of 4 B T C bytes   (after the vocabulary-parallel embedding, attention and MLP outputs)
    + 1 all-gather of the last position's logits, 4 B V' bytes (V' = V padded to a multiple of tp)

so on a ring each rank sends (2 L + 1) * 2 (tp - 1) / tp * 4 B T C + (tp - 1) / tp * 4 B V' bytes per forward,
and every rank then holds identical full logits, so all of them sample the same token (same seeded generators).
The cache divides by tp only when tp divides H_kv (each rank a whole number of key-value heads; the plans refuse
other sizes, and beyond H_kv ranks a model would have to replicate its key-value heads).

Sampling: temperature 0 is greedy (argmax, the first index on ties); otherwise softmax(logits / temperature) sampled
with one torch.Generator per row seeded by the request's seed, so a row's tokens depend on its seed, not on which
other rows share its batch. (Their logits still may differ in the last bits with the batch size: a matmul over 1 row
and over 5 rows rounds differently.) Temperatures between 0 and MIN_TEMPERATURE are refused (they are greedy in all
but name, and 1e-300 overflows a float32 division), seeds must lie in [0, 2**63) (torch.Generator's range).

Context: a request of P prompt tokens and N new tokens feeds P + N - 1 positions through the model (the last token
generated is returned, never fed back), so it fits a context of C positions when P <= C and P + N - 1 <= C.
"""
import math
from fractions import Fraction

import torch

from .. import comm
from ..tensor_parallel import ColumnParallelLinear

MIN_TEMPERATURE = 1e-4   # 0 < temperature < this is refused: use 0 for greedy
MAX_SEED = 2 ** 63 - 1   # torch.Generator.manual_seed overflows past it (and below -2**63)


def update_kv(cache_k: torch.Tensor, cache_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slots: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write B rows' new keys and values into one layer's cache; return each row's keys and values so far.

    cache_k, cache_v: (S, H, Lmax, d), the layer's cache for S slots (sequences); k, v: (B, H, T, d), the new
    positions of B rows; slots: (B,) the slot of each row; starts: (B,) the position of each row's first new token
    (the number of tokens the slot already holds). Row b's T tokens go to positions starts[b] .. starts[b] + T - 1 of
    slot slots[b]; nothing else in the cache changes. Returns (keys, values), each (B, H, max(starts) + T, d): row b
    is slot slots[b]'s cache up to that length (positions past its own length hold whatever the slot held; the
    caller's mask hides them).

    Graded (tests/test_inference.py): the cache written in place, nothing else in it changed; the returned keys and
    values; rows with different starts, in any slot order; when a row would write past Lmax, a ValueError raised
    before anything is written (the cache unchanged), whose message names the end, max(starts) + T, and then Lmax
    (the test matches r"\b7\b.*\b6\b": an end of 7 in a 6-position cache); and greedy generate() with your
    update_kv, on the tiny GPT and on a Hugging Face Llama, token for token equal to recomputing the whole sequence
    at every step.
    """
    # <exercise update_kv points=3>
    # hint: check every row's end against the cache length before writing anything.
    # hint: a loop over the B rows with slicing is fine; so is one advanced-indexing assignment.
    T, Lmax = k.shape[2], cache_k.shape[2]
    end = int(starts.max()) + T
    if end > Lmax:
        raise ValueError(f"a row writes positions up to {end}, but the cache holds {Lmax} positions per sequence")
    for b in range(k.shape[0]):
        s, p = int(slots[b]), int(starts[b])
        cache_k[s, :, p:p + T] = k[b]
        cache_v[s, :, p:p + T] = v[b]
    return cache_k[slots, :, :end], cache_v[slots, :, :end]
    # </exercise>


class KVCache:
    """Keys and values of `slots` sequences of up to `max_len` tokens, for `n_layers` layers.

    A layer's tensors are allocated at its first update, with the shape of the keys the layer produced: under tensor
    parallelism that is this rank's heads only, so `bytes_per_token()` measures the sharding, it does not assume it.
    """

    def __init__(self, n_layers: int, slots: int, max_len: int):
        for name, value in (("n_layers", n_layers), ("slots", slots), ("max_len", max_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCache {name} must be a positive integer, got {value!r}")
        self.n_layers, self.slots, self.max_len = n_layers, slots, max_len
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def update(self, layer: int, k, v, slots, starts):
        if self.k[layer] is None:                                      # (S, H_local, Lmax, d)
            shape = (self.slots, k.shape[1], self.max_len, k.shape[3])
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros(shape)
        return update_kv(self.k[layer], self.v[layer], k, v, slots, starts)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    def bytes_per_token(self) -> Fraction:
        """Bytes this rank's cache holds per token of context (all layers, keys and values)."""
        return Fraction(self.nbytes(), self.slots * self.max_len)


def kv_bytes_per_token(n_layers: int, kv_heads: int, head_dim: int, bytes_per_value: int = 4, tp: int = 1) -> int:
    """The formula: 2 * L * H_kv * d * b / tp."""
    return 2 * n_layers * kv_heads * head_dim * bytes_per_value // tp


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
           scale: float) -> torch.Tensor:
    """Causal attention of new queries over cached keys: q (B, Hq, T, d); keys, values (B, Hkv, Lk, d).

    Query t of row b sits at position starts[b] + t and sees the keys at positions <= its own (the cache beyond a
    row's length is masked too). Hq / Hkv query heads share each key-value head (grouped-query attention).
    """
    B, Hq, T, _ = q.shape
    group = Hq // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)  # (B, Hq, Lk, d)
    position = starts.view(B, 1, 1) + torch.arange(T, device=q.device).view(1, T, 1)           # (B, T, 1)
    hidden = torch.arange(keys.shape[2], device=q.device).view(1, 1, -1) > position             # (B, T, Lk)
    scores = (q @ keys.transpose(-2, -1)) * scale                                                # (B, Hq, T, Lk)
    scores = scores.masked_fill(hidden.unsqueeze(1), float("-inf"))
    return scores.softmax(dim=-1) @ values                                                      # (B, Hq, T, d)


# The cached forward of each model family, written over the model's own modules: a module that parallelize()
# replaced runs unchanged (the attention and MLP input hooks are the identity in forward, without sequence parallel).

def _gpt_block(block, x, cache, i, slots, starts, placed):
    a, (B, T, _) = block.attn, x.shape
    q, k, v = (t.view(B, T, -1, a.head_dim).transpose(1, 2) for t in a.qkv(block.ln1(x)).chunk(3, dim=2))
    y = attend(q, *cache.update(i, k, v, slots, starts), placed, 1.0 / math.sqrt(a.head_dim))  # (B, h, T, hs)
    x = x + a.proj(y.transpose(1, 2).reshape(B, T, -1))
    return x + block.mlp(block.ln2(x))


def _llama_block(layer, x, cache, i, slots, starts, placed, rope):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    a, (B, T, _) = layer.self_attn, x.shape
    h = layer.input_layernorm(x)
    q, k, v = (p(h).view(B, T, -1, a.head_dim).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
    q, k = apply_rotary_pos_emb(q, k, *rope)                          # rotary positions, as the model does
    y = attend(q, *cache.update(i, k, v, slots, starts), placed, a.scaling)
    x = x + a.o_proj(y.transpose(1, 2).reshape(B, T, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def n_layers(model) -> int:
    return len(model.blocks) if hasattr(model, "blocks") else len(model.model.layers)


def context_length(model) -> int:
    """The longest sequence (prompt + generated tokens) the model has positions for."""
    if hasattr(model, "cfg"):
        return model.cfg.block_size
    return model.config.max_position_embeddings


def forward_cached(model, ids: torch.Tensor, cache: KVCache, slots: torch.Tensor, starts: torch.Tensor,
                   stage_input: torch.Tensor | None = None) -> torch.Tensor:
    """Run ids (B, T) at positions starts[b] + t through `model` (a GPT, a pipeline Stage of one, or a Hugging Face
    Llama), writing the cache; returns the last position's full logits (B, V), or a middle stage's output (B, T, C).
    A stage after the first takes `stage_input` (B, T, C) instead of ids (None). Keep slots and starts on the host:
    update_kv reads them per row and layer (on a GPU, a device sync each); they go to the device once, for the masks."""
    data = ids if stage_input is None else stage_input
    B, T = data.shape[:2]
    slots, starts = slots.cpu(), starts.cpu()                           # no-ops for host tensors
    placed = starts.to(data.device)
    positions = placed.view(B, 1) + torch.arange(T, device=data.device)  # (B, T)
    if hasattr(model, "blocks"):                                        # minidist's GPT, or a Stage of it
        x = model.wte(ids) + model.wpe(positions) if stage_input is None else stage_input  # (B, T, C)
        for i, block in enumerate(model.blocks):
            x = _gpt_block(block, x, cache, i, slots, starts, placed)
        if not hasattr(model, "lm_head"):                              # a stage before the last
            return x
        return full_logits(model.lm_head, model.lm_head(model.ln_f(x[:, -1:])))[:, 0]
    inner = model.model                                                 # a Hugging Face LlamaForCausalLM
    x = inner.embed_tokens(ids)
    rope = inner.rotary_emb(x, positions)
    for i, layer in enumerate(inner.layers):
        x = _llama_block(layer, x, cache, i, slots, starts, placed, rope)
    return full_logits(model.lm_head, model.lm_head(inner.norm(x[:, -1:])))[:, 0]


def full_logits(head, logits: torch.Tensor) -> torch.Tensor:
    """All the vocabulary's logits: gathered from the ranks when `head` is vocabulary-parallel (chapter 04 leaves
    each rank its slice, padded with -inf to a multiple of tp), else `logits` as they are."""
    if isinstance(head, ColumnParallelLinear) and not head.gather_output:
        logits = comm.all_gather_cat(logits.contiguous(), head.group, dim=-1)[..., :head.out_features]
    return logits


def sample_next(logits: torch.Tensor, temperatures, generators) -> torch.Tensor:
    """One token per row of logits (B, V): argmax where the temperature is 0, else a draw from
    softmax(logits / temperature) with that row's generator. Returns (B,) token ids (int64, on the CPU)."""
    logits = logits.detach().double().cpu()                             # float64: no finite t > 0 makes a NaN
    out = logits.argmax(dim=-1)                                         # (B,) greedy everywhere first
    for b, (t, g) in enumerate(zip(temperatures, generators)):
        if t != 0:
            scaled = (logits[b] - logits[b].max()) / t                  # <= 0, the best token at exactly 0
            out[b] = torch.multinomial(scaled.softmax(-1), 1, generator=g)[0]
    return out


def check_request(prompt_len: int, max_new_tokens: int, temperature: float, context: int, seed: int = 0) -> None:
    """ValueError naming the problem when a request cannot be served (see the module docstring on the context)."""
    if prompt_len < 1:
        raise ValueError("the prompt is empty: give at least one token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < math.inf):
        raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, "
                         f"got {temperature!r}")
    if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    positions = prompt_len + max(max_new_tokens, 1) - 1                  # the last new token is never fed back
    if positions > context:
        raise ValueError(f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens needs {positions} positions "
                         f"(the last new token is not fed back), more than the model's context of {context} tokens")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
             cache: KVCache | None = None) -> torch.Tensor:
    """The max_new_tokens tokens generated after each row of input_ids (B, P): returns (B, max_new_tokens).

    Greedy at temperature 0; otherwise row b samples with a generator seeded with seed + b. `model` may be
    parallelized (chapter 04): call generate on every rank of its group; every rank returns the same tokens.
    """
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, prompt length), got shape {tuple(input_ids.shape)}")
    B, P = input_ids.shape
    for row_seed in (seed, seed + B - 1):                               # row b samples with seed + b
        check_request(P, max_new_tokens, temperature, context_length(model), row_seed)
    model.eval()
    device = next(model.parameters()).device
    cache = cache or KVCache(n_layers(model), B, P + max_new_tokens)
    slots, starts = torch.arange(B), torch.zeros(B, dtype=torch.long)  # on the host (forward_cached)
    generators = [torch.Generator().manual_seed(seed + b) for b in range(B)]
    out, ids = [], input_ids.to(device)
    for _ in range(max_new_tokens):
        logits = forward_cached(model, ids, cache, slots, starts)      # (B, V)
        starts = starts + ids.shape[1]
        token = sample_next(logits, [temperature] * B, generators)      # (B,)
        out.append(token)
        ids = token.view(B, 1).to(device)
    return torch.stack(out, dim=1) if out else input_ids.new_zeros(B, 0)
