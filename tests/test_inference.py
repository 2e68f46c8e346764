"""Generation with a KV cache: the cache update, one process against recomputing every step and against Hugging
Face, tensor- and pipeline-parallel generation against one process, bytes and cache sizes by their formulas,
continuous batching against each request alone, and refusals."""
import re

import pytest
import torch

import minidist.serving.inference as inference
from minidist import launch
from minidist.grading import implementation
from minidist.pipeline.generate import pp_generate_bytes
from minidist.serving.batching import Engine, Request
from minidist.serving.inference import KVCache, generate, kv_bytes_per_token
from minidist.tour.inference import (BATCH, CFG, NEW, PROMPT, PROMPTS, SEED, TEMPERATURE, build, kv_formula,
                                     pp_generation, tp_generate_bytes, tp_generation)

import transformers.models.llama.modeling_llama  # noqa: F401,E402  (imported once: the forked ranks inherit it)


# The exercise: writing one layer's cache.

def caches(S=4, H=2, L=6, d=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(S, H, L, d, generator=g), torch.randn(S, H, L, d, generator=g)


@pytest.mark.exercise("update_kv")
def test_update_kv_writes_each_row_at_its_own_position_in_its_slot():
    update = implementation("update_kv")
    ck, cv = caches()
    before_k, before_v = ck.clone(), cv.clone()
    k, v = torch.randn(2, 2, 2, 3), torch.randn(2, 2, 2, 3)             # B = 2 rows, T = 2 new positions
    slots, starts = torch.tensor([3, 1]), torch.tensor([1, 3])           # slot 3 from position 1, slot 1 from 3
    keys, values = update(ck, cv, k, v, slots, starts)
    expected_k, expected_v = before_k.clone(), before_v.clone()
    expected_k[3, :, 1:3], expected_v[3, :, 1:3] = k[0], v[0]
    expected_k[1, :, 3:5], expected_v[1, :, 3:5] = k[1], v[1]
    assert torch.equal(ck, expected_k) and torch.equal(cv, expected_v)  # in place, nothing else touched
    assert keys.shape == values.shape == (2, 2, 5, 3)                   # max(starts) + T = 5 positions
    assert torch.equal(keys[0], expected_k[3, :, :5]) and torch.equal(keys[1], expected_k[1, :, :5])
    assert torch.equal(values[0], expected_v[3, :, :5]) and torch.equal(values[1], expected_v[1, :, :5])


@pytest.mark.exercise("update_kv")
def test_update_kv_refuses_to_write_past_the_cache():
    update = implementation("update_kv")
    ck, cv = caches()
    before = ck.clone()
    with pytest.raises(ValueError, match=r"\b7\b.*\b6\b"):               # positions 5 and 6 of a 6-position cache
        update(ck, cv, torch.ones(2, 2, 2, 3), torch.ones(2, 2, 2, 3), torch.tensor([0, 2]), torch.tensor([0, 5]))
    assert torch.equal(ck, before)                                        # checked before anything was written


@pytest.mark.exercise("update_kv")
@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_generation_on_the_cache_equals_recomputing_every_step(model, monkeypatch):
    """Greedy tokens with the KV cache (the learner's update) equal a full forward of the whole sequence per step,
    through the model's own forward (for the Llama: transformers' attention, rotary embeddings and mask)."""
    monkeypatch.setattr(inference, "update_kv", implementation("update_kv"))
    dense, _ = build(model)
    out = generate(dense, PROMPTS, NEW)
    seq = PROMPTS.clone()
    with torch.no_grad():
        for _ in range(NEW):
            logits = dense(seq)
            logits = getattr(logits, "logits", logits)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq[:, PROMPT:])
    assert len(set(out.flatten().tolist())) > NEW  # a model that only repeats a token would make this check empty


# Tensor-parallel generation (the tour's rank function).

@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_tensor_parallel_generation_equals_one_process(world_size, model):
    n, results = world_size, launch(tp_generation, world_size, model)
    for r in results:
        for how in ("greedy", "sampled"):
            assert torch.equal(r[how]["tokens"], r[how]["ref"]), how       # token for token
            assert r[how]["counted"] and r[how]["axes"] == {"tp"}
            assert r[how]["kv_bytes_per_token"] == kv_formula(model, n) == kv_formula(model, 1) // n
        assert not torch.equal(r["sampled"]["tokens"], r["greedy"]["tokens"])  # the sampling did draw
        assert r["logit_diff"] < 1e-5 < r["gap"]  # reduction order only; no near-tie a rounding could flip
    for how in ("greedy", "sampled"):
        mean = sum(r[how]["bytes"] for r in results) / n                  # counted on minidist's ring
        assert mean == tp_generate_bytes(model, n)
    if model == "llama":
        assert torch.equal(results[0]["greedy"]["tokens"], results[0]["hf"])  # transformers' own generate


# Pipeline-parallel generation.

@pytest.mark.parametrize("world_size, microbatches, temperature", [(2, 2, 0.0), (3, 4, TEMPERATURE)])
def test_pipeline_generation_equals_one_process(world_size, microbatches, temperature):
    results = launch(pp_generation, world_size, microbatches, temperature)
    assert all(r["tokens"] is None for r in results[:-1])                # the tokens live on the last stage
    assert torch.equal(results[-1]["tokens"], results[-1]["ref"])
    assert sum(r["bytes"] for r in results) == pp_generate_bytes(world_size, CFG.n_embd, BATCH, PROMPT, NEW)
    assert [r["sends"] for r in results] == [NEW * microbatches] * (world_size - 1) + [(NEW - 1) * microbatches]


def test_kv_cache_sizes():
    dense, _ = build("llama")
    cache = KVCache(2, 3, 10)
    generate(dense, PROMPTS[:3], 5, cache=cache)
    assert cache.nbytes() == 3 * 10 * kv_bytes_per_token(2, 6, 4)       # 6 key-value heads of 4 (hidden 48 / 12)
    assert kv_bytes_per_token(32, 32, 128, 2) == 512 * 1024               # Llama-2 7B in fp16: 512 KiB per token
    with pytest.raises(ValueError, match="slots"):
        KVCache(2, 0, 10)


# Continuous batching.

@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_continuous_batching_gives_each_request_what_it_gets_alone(model):
    dense, _ = build(model)
    engine = Engine(dense, slots=3, vocab_size=512)
    g = torch.Generator().manual_seed(1)
    lengths = [12, 2, 0, 5, 1, 9, 3]  # a long request first: the short ones join it, and leave before it does
    requests = [Request(i, torch.randint(512, (2 + i,), generator=g).tolist(), n, TEMPERATURE if i % 2 else 0.0,
                        seed=SEED + i) for i, n in enumerate(lengths)]
    finished, step = [], 0
    while len(finished) < len(requests):
        if step < len(requests):
            engine.add(requests[step])                                     # a new request every step
        finished += [r.rid for r in engine.step()]
        step += 1
    for r in requests:
        alone = generate(dense, torch.tensor([r.prompt]), r.max_new_tokens, r.temperature, r.seed)[0].tolist()
        assert r.output == alone, r.rid
    assert finished.index(1) < finished.index(0)                          # joined after request 0, left before it
    assert max(engine.batch_sizes) == 3 and engine.steps < sum(lengths)  # decoded together, in fewer steps
    assert sorted(engine.free) == [0, 1, 2] and engine.idle()


def test_requests_that_cannot_be_served_are_refused_by_name():
    dense, _ = build("gpt")
    engine = Engine(dense, slots=2, vocab_size=512)
    for prompt, n, t, seed, pattern in (
            ([], 3, 0.0, 0, "empty"), ([1, 2], -1, 0.0, 0, "-1"), ([1] * 30, 4, 0.0, 0, r"needs 33 positions.*32"),
            ([1] * 33, 0, 0.0, 0, r"needs 33 positions.*32"), ([1, 2], 3, -0.5, 0, "temperature"),
            ([1, 2], 3, 1e-300, 0, r"temperature.*0\.0001"), ([1, 2], 3, float("nan"), 0, "temperature"),
            ([1, 2], 3, float("inf"), 0, "temperature"), ([1, 2], 3, 0.5, 2 ** 64, r"seed.*2\*\*63"),
            ([1, 2], 3, 0.5, -1, "seed"), ([1, 512], 3, 0.0, 0, r"\[0, 512\)")):
        with pytest.raises(ValueError, match=pattern):
            engine.add(Request(0, prompt, n, t, seed))
    with pytest.raises(ValueError, match=r"5 tokens \+ 40 new tokens needs 44 positions.*32"):
        generate(dense, torch.zeros(1, 5, dtype=torch.long), 40)
    with pytest.raises(ValueError, match="batch, prompt length"):
        generate(dense, torch.zeros(5, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="seed"):                         # row 1 would seed with 2**63
        generate(dense, PROMPTS[:2], 2, 0.5, seed=2 ** 63 - 1)
    assert re.search(r"\b32\b", str(pytest.raises(ValueError, generate, dense, PROMPTS, 30).value))


def test_the_context_holds_prompt_plus_new_tokens_minus_one():
    """The last new token is returned, never fed back: P + N - 1 positions, and every one of them is used."""
    dense, _ = build("gpt")                                                # context 32
    assert generate(dense, torch.zeros(1, 32, dtype=torch.long), 1).shape == (1, 1)
    assert generate(dense, torch.zeros(1, 32, dtype=torch.long), 0).shape == (1, 0)
    assert generate(dense, torch.zeros(1, 5, dtype=torch.long), 28).shape == (1, 28)  # 5 + 28 - 1 = 32


def test_sampling_survives_any_finite_temperature():
    """sample_next divides in float64 after subtracting the best logit: no finite t > 0 yields a NaN (1e-300 in
    float32 is 0, and logits / 0 were NaN probabilities)."""
    logits, g = torch.tensor([[1.0, 3.0, 2.0, 3.0]]), torch.Generator().manual_seed(0)
    for t in (1e-300, 5e-324, 1e-4, 1.0, 1e300):
        token = int(inference.sample_next(logits, [t], [g])[0])
        assert 0 <= token < 4 and (t > 1 or token in (1, 3)), t            # tiny t: one of the two best


def test_a_request_that_fails_in_the_engine_fails_alone(monkeypatch):
    import minidist.serving.batching as batching
    real = batching.sample_next

    def flaky(logits, temperatures, generators):                         # fails for one request only
        if 0.5 in temperatures:
            raise RuntimeError("boom")
        return real(logits, temperatures, generators)
    monkeypatch.setattr(batching, "sample_next", flaky)
    dense, _ = build("gpt")
    engine = Engine(dense, slots=2, vocab_size=512)
    good, bad, later = Request(0, [1, 2, 3], 4), Request(1, [4, 5], 4, 0.5), Request(2, [6], 2)
    engine.add(good)
    engine.add(bad)
    finished = engine.step()
    assert finished == [bad] and bad.error == "RuntimeError: boom" and bad.output == []
    engine.add(later)
    while not engine.idle():
        finished += engine.step()
    assert good.error is None and good.output == generate(dense, torch.tensor([good.prompt]), 4)[0].tolist()
    assert later.output == generate(dense, torch.tensor([later.prompt]), 2)[0].tolist()
    assert sorted(engine.free) == [0, 1]                                  # the failed request's slot came back


def test_slots_and_starts_stay_on_the_host_so_the_cache_update_never_syncs():
    """update_kv reads slots and starts per row and layer (int(...)): on a GPU each read of a device tensor waits
    for the device. forward_cached takes them on the host and copies them to the device once. A model on the meta
    device stands in for a GPU: reading any of its values raises."""
    from minidist.models import GPT, GPTConfig
    from minidist.serving.inference import KVCache, forward_cached
    cfg = GPTConfig()
    model, cache = GPT(cfg).to("meta"), KVCache(cfg.n_layer, 3, 16)
    logits = forward_cached(model, torch.zeros(2, 4, dtype=torch.long, device="meta"), cache,
                            torch.tensor([2, 0]), torch.tensor([0, 3]))
    assert logits.shape == (2, cfg.vocab_size) and logits.device.type == "meta"
    assert cache.k[0].device.type == "meta"
