"""The models every chapter trains: a small GPT with no parallel code in it, and Hugging Face models from a config.

Techniques are *applied* to these models from outside (wrapping, hooks, module swaps); nothing in this file knows about
ranks. The GPT follows GPT-2 (Radford et al. 2019) as nanoGPT writes it: pre-LayerNorm blocks of causal self-attention
and a 4x MLP, learned positions, and an output layer that shares (ties) its weight with the token embedding, so the
test models always carry one shared parameter. Attention is written out (not fused) so every saved activation is
visible to the memory chapter.

Hugging Face models come from a config with random weights: nothing is downloaded. Building on the meta device
(`on_meta`) gives the true parameter count of a 7B model without allocating 28 GB.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 512     # matches the default tokenizer in minidist.data
    block_size: int = 64      # longest sequence
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True  # lm_head.weight is wte.weight

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.resid_drop = nn.Dropout(cfg.dropout)
        future = torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool).triu(diagonal=1)
        self.register_buffer("future", future, persistent=False)  # True where position j > i: masked out

    def forward(self, x):
        # The number of heads is read from the shapes (as Hugging Face models do), so a rank that holds only some of
        # the heads' projections (tensor parallelism, chapter 04) runs this code unchanged.
        B, T, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=2)                           # 3 x (B, T, C)
        nh = q.shape[-1] // self.head_dim                               # (not -1: a batch may be empty)
        q, k, v = (t.view(B, T, nh, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = self.attend(q, k, v)                                        # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, nh * self.head_dim)         # re-assemble the heads: (B, T, C)
        return self.resid_drop(self.proj(y))

    def attend(self, q, k, v):
        """The core attention, softmax(q k^T / sqrt(hs)) v under the causal mask: the part whose saved activations
        grow with s^2 (a method of its own so selective checkpointing, chapter 09, can recompute just this)."""
        T = q.shape[-2]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, T, T)
        att = att.masked_fill(self.future[:T, :T], float("-inf")).softmax(dim=-1)
        return self.attn_drop(att) @ v                                  # (B, nh, T, hs)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.act = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or GPTConfig()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by 1/sqrt(2 * layers)
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx):                                              # idx: (B, T) token ids
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} is longer than block_size {self.cfg.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))                                # (B, T, vocab)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position of the batch."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def count_params(model: nn.Module) -> int:
    """Parameters counted once each (a tied weight is one parameter)."""
    return sum(p.numel() for p in model.parameters())


# Hugging Face models from a config (random weights, nothing downloaded).

TINY_LLAMA = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, tie_word_embeddings=False)
TINY_GPT2 = dict(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4)
GPT2_124M = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)


def build_llama(**overrides) -> nn.Module:
    """A `transformers` LlamaForCausalLM from TINY_LLAMA updated with `overrides` (e.g. build_llama(**LLAMA_7B))."""
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))


TINY_MIXTRAL = dict(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                    router_jitter_noise=0.0)


def build_mixtral(**overrides) -> nn.Module:
    """A `transformers` MixtralForCausalLM (Mixtral-style sparse MoE blocks) from TINY_MIXTRAL updated with `overrides`."""
    from transformers import MixtralConfig, MixtralForCausalLM
    return MixtralForCausalLM(MixtralConfig(**{**TINY_MIXTRAL, **overrides}))


def build_gpt2(**overrides) -> nn.Module:
    """A `transformers` GPT2LMHeadModel from TINY_GPT2 updated with `overrides`."""
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(**{**TINY_GPT2, **overrides}))


MODELS = {  # names the CLI accepts
    "tiny-gpt": lambda: GPT(),
    "tiny-llama": build_llama,
    "tiny-gpt2": build_gpt2,
    "gpt2-124m": lambda: build_gpt2(**GPT2_124M),
    "llama-7b": lambda: build_llama(**LLAMA_7B),
}


def on_meta(name: str) -> nn.Module:
    """Model `name` from MODELS built on the meta device: real shapes, no storage."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    with torch.device("meta"):
        return MODELS[name]()
