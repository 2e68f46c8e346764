"""What both sides of chapter 04's tour checks train: the tiny GPT and a small Hugging Face Llama, their batches
and learning rate. minidist's tensor parallelism (tensor_parallel.py) and PyTorch's DTensor (tp_dtensor.py) build on
this module; it imports neither.
"""
import torch

from ..data import random_batches
from ..models import GPT, GPTConfig, build_llama
from ..tensor_parallel.plans import GPT_PLAN, LLAMA_PLAN

CFG = GPTConfig(n_layer=2, n_embd=48, n_head=12, block_size=12)  # heads, widths and sequence divide by 2, 3 and 4
BATCH, STEPS, LR = 4, 5, 1e-3
BATCHES = random_batches(torch.randint(512, (5000,), generator=torch.Generator().manual_seed(0)), BATCH,
                         CFG.block_size, steps=STEPS)
DTENSOR_STEPS = 3


def llama_config(n: int) -> dict:
    """A small Llama with grouped-query attention: 24 query heads (of 2 dimensions) over 2N key-value heads, so
    that every rank holds 2 key-value heads, each read by 12 / N of its query heads."""
    return dict(hidden_size=48, intermediate_size=96, num_attention_heads=24, num_key_value_heads=2 * n,
                max_position_embeddings=CFG.block_size)


def build(model: str, n: int):
    """(a fresh model, its plan): "gpt" (minidist's tiny GPT, tied embeddings) or "llama" (transformers)."""
    if model == "gpt":
        return GPT(CFG), GPT_PLAN
    return build_llama(**llama_config(n)), LLAMA_PLAN


def logits_of(out) -> torch.Tensor:
    return getattr(out, "logits", out)  # Hugging Face models return an output object
