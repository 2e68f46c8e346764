"""Tour checks for chapter 12 (generation with a KV cache, tensor- and pipeline-parallel), and their formulas.

The rank functions generate with a model parallelized by minidist next to one process holding the same weights, and
next to `transformers`' own `generate` for the Llama; the tests and the notebook call the same functions.
"""
import copy
import time
from fractions import Fraction

import torch
import torch.distributed as dist

from .. import comm
from ..launch import launch
from ..mesh import Mesh
from ..models import GPT, GPTConfig, build_llama
from ..pipeline.generate import pipeline_generate, pp_generate_bytes
from ..serving.inference import KVCache, forward_cached, full_logits, generate, kv_bytes_per_token, n_layers
from ..tensor_parallel import padded_size
from ..tensor_parallel.plans import GPT_PLAN, LLAMA_PLAN, parallelize
from .rows import make_row

# Untied output layers: a randomly initialized model whose output layer is its embedding mostly repeats its input
# token, which would make "the same tokens" a weak check. Heads divide by 1, 2, 3 and 4; 4 layers for 4 stages.
CFG = GPTConfig(n_layer=4, n_embd=48, n_head=12, block_size=32, tie_weights=False)
BATCH, PROMPT, NEW, SEED, TEMPERATURE = 4, 5, 8, 7, 0.8
PROMPTS = torch.randint(512, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))


def llama_config(tp: int) -> dict:
    """A small Llama with grouped-query attention: 12 query heads over 6 key-value heads; at tp = 4, which does not
    divide 6, over 4 key-value heads (a different model: its cache per token is 2/3 of the 6-head one's)."""
    return dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=12,
                num_key_value_heads=6 if 6 % tp == 0 else 4, max_position_embeddings=32, tie_word_embeddings=False)


def build(model: str, tp: int = 1):
    """(a fresh model with seed-0 weights, its tensor-parallel plan): "gpt" or "llama"."""
    torch.manual_seed(0)
    if model == "gpt":
        return GPT(CFG).eval(), GPT_PLAN
    return build_llama(**llama_config(tp)).eval(), LLAMA_PLAN


def kv_formula(model: str, tp: int) -> int:
    if model == "gpt":
        return kv_bytes_per_token(CFG.n_layer, CFG.n_head, CFG.n_embd // CFG.n_head, 4, tp)
    c = llama_config(tp)
    return kv_bytes_per_token(c["num_hidden_layers"], c["num_key_value_heads"],
                              c["hidden_size"] // c["num_attention_heads"], 4, tp)


def tp_generate_bytes(model: str, tp: int, batch: int = BATCH, prompt: int = PROMPT, new: int = NEW) -> Fraction:
    """Bytes one rank sends (mean over ranks) generating `new` tokens: per forward of B rows x T tokens,
    (2L + 1) all-reduces of 4 B T C bytes and one all-gather of the last position's 4 B V_padded bytes of logits.
    The forwards carry B (P + n - 1) tokens in all: the prompt, then one token per step but the last."""
    layers, hidden = (CFG.n_layer, CFG.n_embd) if model == "gpt" else (2, 48)
    tokens = batch * (prompt + new - 1)
    return (2 * layers + 1) * comm.ring_bytes("all_reduce", 4 * tokens * hidden, tp) + \
        new * comm.ring_bytes("all_gather", 4 * batch * padded_size(512, tp), tp)


def _hf_generate(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """transformers' own greedy generate (its DynamicCache, its attention), new tokens only; end-of-sequence off."""
    from transformers.utils import logging
    logging.set_verbosity_error()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:]


def _margins(dense, tp, ids: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """(largest |logit difference| tensor-parallel vs one process, smallest gap between the best and the second
    best logit of one process), over every position that chose a generated token, recomputed in one pass."""
    seq = torch.cat([ids, out], dim=1)[:, :-1]                          # (B, P + n - 1)
    B, T = seq.shape
    dense_logits, tp_logits = [], []
    for model, acc in ((dense, dense_logits), (tp, tp_logits)):
        cache = KVCache(n_layers(model), B, T)
        for t in range(T):  # one position at a time: each row's logits at every position
            acc.append(forward_cached(model, seq[:, t:t + 1], cache, torch.arange(B), torch.full((B,), t)))
    chosen = slice(ids.shape[1] - 1, T)
    d, p = torch.stack(dense_logits, 1)[:, chosen], torch.stack(tp_logits, 1)[:, chosen]  # (B, n, V)
    top2 = d.topk(2, dim=-1).values
    return (d - p).abs().max().item(), (top2[..., 0] - top2[..., 1]).min().item()


@torch.no_grad()
def tp_generation(model: str = "gpt") -> dict:
    """Generate greedily and sampled (T = TEMPERATURE) with the model parallelized over all ranks (bytes counted on
    minidist's ring) and in one process; for the Llama, greedy, also with transformers' generate (rank 0)."""
    n = dist.get_world_size()
    group = Mesh.build(tp=n).group("tp")
    dense, plan = build(model, n)
    tp = parallelize(copy.deepcopy(dense), group, plan)
    out = {"hf": _hf_generate(dense, PROMPTS, NEW) if model == "llama" and dist.get_rank() == 0 else None,
           "kv_formula": kv_formula(model, n)}
    for how, temperature in (("greedy", 0.0), ("sampled", TEMPERATURE)):
        ref = generate(dense, PROMPTS, NEW, temperature, SEED)
        cache = KVCache(n_layers(tp), BATCH, PROMPT + NEW)
        start = time.perf_counter()
        with comm.ring_backend(), comm.ByteLedger() as ledger:
            tokens = generate(tp, PROMPTS, NEW, temperature, SEED, cache=cache)
        out[how] = {"tokens": tokens, "ref": ref, "bytes": ledger.total_bytes(), "counted": ledger.counted,
                    "axes": {r.axis for r in ledger.records}, "kv_bytes_per_token": cache.bytes_per_token(),
                    "seconds": time.perf_counter() - start}
    out["logit_diff"], out["gap"] = _margins(dense, tp, PROMPTS, out["greedy"]["ref"])
    return out


@torch.no_grad()
def pp_generation(microbatches: int = 4, temperature: float = 0.0) -> dict:
    """Generate with the GPT cut into one stage per rank, and in one process (every rank: the same weights)."""
    dense, _ = build("gpt")
    ref = generate(dense, PROMPTS, NEW, temperature, SEED)
    with comm.ByteLedger() as ledger:
        out = pipeline_generate(dense, PROMPTS, NEW, microbatches, None, temperature, SEED)
    return {"tokens": out, "ref": ref, "bytes": ledger.total_bytes(), "counted": ledger.counted,
            "sends": ledger.count("send")}


def mismatches(a: torch.Tensor, b: torch.Tensor) -> int:
    """Tokens that differ (all of them when the shapes differ)."""
    return int((a != b).sum()) if a.shape == b.shape else max(a.numel(), b.numel())


# The tour's rows.

def _timed(fn, *args):
    start = time.perf_counter()
    return launch(fn, *args), time.perf_counter() - start


def check_generation(world_size: int) -> list[dict]:
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported once: the forked ranks inherit it)
    n, rows = world_size, []
    for model, label in (("gpt", "tiny GPT"), ("llama", "HF Llama (GQA)")):
        results, seconds = _timed(tp_generation, n, model)
        for how in ("greedy", "sampled"):
            per_rank = [r[how] for r in results]
            counted = sum(r["bytes"] for r in per_rank) / n if all(r["counted"] for r in per_rank) else None
            rows.append(make_row(f"TP generation, {label}, {how if how == 'greedy' else f'T={TEMPERATURE}'} "
                                 f"({BATCH}x{NEW} tokens)", "one process, KV cache (tokens)", tolerance=0,
                                 max_abs_diff=max(mismatches(r["tokens"], r["ref"]) for r in per_rank),
                                 comm_bytes=counted, comm_bytes_theory=tp_generate_bytes(model, n), seconds=seconds))
        kv_heads = CFG.n_head if model == "gpt" else llama_config(n)["num_key_value_heads"]
        rows.append(make_row(f"  KV cache, {label}, H_kv={kv_heads}: bytes per token", "2 L H_kv d b / tp",
                             seconds=0.0, state_bytes_per_rank=max(r["greedy"]["kv_bytes_per_token"] for r in results),
                             state_bytes_per_rank_theory=results[0]["kv_formula"]))
        if results[0]["hf"] is not None:
            rows.append(make_row(f"TP generation, {label}, greedy", "transformers generate (tokens)", tolerance=0,
                                 max_abs_diff=mismatches(results[0]["greedy"]["tokens"], results[0]["hf"]),
                                 seconds=seconds))
    per_rank, seconds = _timed(pp_generation, n, 4)
    last = per_rank[-1]
    rows.append(make_row(f"PP generation, tiny GPT, m=4, greedy ({BATCH}x{NEW} tokens)",
                         "one process, KV cache (tokens)", tolerance=0, seconds=seconds,
                         max_abs_diff=mismatches(last["tokens"], last["ref"]),
                         comm_bytes=sum(r["bytes"] for r in per_rank) / n,
                         comm_bytes_theory=Fraction(pp_generate_bytes(n, CFG.n_embd, BATCH, PROMPT, NEW), n)))
    return rows


CHECKS = [check_generation]
