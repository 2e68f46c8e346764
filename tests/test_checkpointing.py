"""Activation checkpointing: gradients bit-identical to no checkpointing (dropout included), against
torch.utils.checkpoint, saved bytes and recomputed FLOPs against their formulas, data parallel, errors."""
import copy

import pytest
import torch
import torch.nn as nn

from minidist import launch
from minidist.grading import implementation
from minidist.memory import activation_bytes_per_layer
from minidist.memory.recompute import capture_state, checkpoint, checkpoint_blocks, uncheckpoint
from minidist.models import GPT, Block, GPTConfig, lm_loss
from minidist.tour.checkpointing import (CFG, against_plain, recompute_flops, saved_per_layer, torch_checkpointed)

X = torch.randint(512, (6, 16), generator=torch.Generator().manual_seed(1))


def gradients(model, seed=7):
    """The gradients of every parameter after one backward, dropout drawn from `seed`."""
    model.zero_grad()
    torch.manual_seed(seed)
    lm_loss(model(X), X).backward()
    return [p.grad.clone() for p in model.parameters()]


def bitwise(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.exercise("recompute_gradients")
def test_recompute_gradients_is_bit_identical_with_dropout():
    recompute = implementation("recompute_gradients")
    torch.manual_seed(0)
    block = Block(CFG)
    x = torch.randn(4, 16, CFG.n_embd, requires_grad=True)
    weights = torch.randn(4, 16, CFG.n_embd)
    torch.manual_seed(3)
    (block(x) * weights).sum().backward()
    expected = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    torch.manual_seed(3)
    state = capture_state([x])
    with torch.no_grad():
        block(x)  # forward draws its masks, saves nothing
    torch.manual_seed(99)  # the random stream moves on before backward, as in training
    grads = recompute(block, [x], state, (weights,))
    assert bitwise([grads[0]] + [p.grad for p in block.parameters()], expected)
    after = torch.rand(3)
    torch.manual_seed(99)
    assert torch.equal(after, torch.rand(3)), "recomputing drew from the training's random stream"


@pytest.mark.exercise("recompute_gradients")
def test_recompute_gradients_with_inputs_that_need_no_gradient_and_an_unused_output():
    recompute = implementation("recompute_gradients")
    lin = nn.Linear(3, 3)
    x, frozen = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3)

    def fn(a, b, scale):
        return lin(a) * scale + b, b.sum()
    out, _ = fn(x, frozen, 2.0)
    out.sum().backward()
    expected = [x.grad.clone(), lin.weight.grad.clone()]
    lin.zero_grad()
    grads = recompute(fn, [x, frozen, 2.0], capture_state([x]), (torch.ones(2, 3), None))
    assert grads[1] is None and grads[2] is None
    assert bitwise([grads[0], lin.weight.grad], expected)


def _block_gradients(block, x, checkpointed: bool, seed: int = 3):
    """x's and every parameter's gradient after one backward through `block` (dropout drawn from `seed`)."""
    import minidist.memory.recompute as recompute
    block.zero_grad()
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)
    out = recompute.checkpoint(block, x) if checkpointed else block(x)
    torch.manual_seed(99)  # the training's random stream moves on before backward
    (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    return [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]


@pytest.mark.exercise("capture_state")
def test_capture_state_replays_dropout_bit_identically(monkeypatch):
    import minidist.memory.recompute as recompute
    monkeypatch.setattr(recompute, "capture_state", implementation("capture_state"))
    torch.manual_seed(0)
    block, x = Block(CFG), torch.randn(2, 8, CFG.n_embd)
    assert bitwise(_block_gradients(block, x, True), _block_gradients(block, x, False))


@pytest.mark.exercise("capture_state")
def test_capture_state_replays_autocast(monkeypatch):
    import minidist.memory.recompute as recompute
    monkeypatch.setattr(recompute, "capture_state", implementation("capture_state"))
    torch.manual_seed(0)
    block, x = Block(CFG), torch.randn(2, 8, CFG.n_embd)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _block_gradients(block, x, False)
        got = _block_gradients(block, x, True)
    assert bitwise(got, expected)   # recomputed in fp32 instead of bf16, the gradients would differ


@pytest.mark.exercise("capture_state")
def test_capture_state_is_a_snapshot_with_the_autocast_setting():
    capture = implementation("capture_state")
    x = torch.randn(3)
    torch.manual_seed(5)
    state = capture([x, 2.0])
    expected = torch.rand(4)
    torch.rand(10)   # later draws
    torch.set_rng_state(state["cpu"])
    assert torch.equal(torch.rand(4), expected) and state["devices"] == {}
    assert state["autocast"][:2] == ("cpu", False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert capture([x])["autocast"] == ("cpu", True, torch.bfloat16)


@pytest.mark.parametrize("policy", ["full", "selective", "torch"])
def test_policies_give_bit_identical_gradients_with_dropout(policy):
    torch.manual_seed(0)
    plain = GPT(CFG)
    model = copy.deepcopy(plain)
    torch_checkpointed(model) if policy == "torch" else checkpoint_blocks(model, policy)
    assert bitwise(gradients(model), gradients(plain))
    assert not bitwise(gradients(plain, seed=8), gradients(plain))  # the masks do matter


def test_checkpointing_works_on_a_hugging_face_llama():
    from minidist.models import build_llama
    torch.manual_seed(0)
    plain = build_llama(attention_dropout=0.1)
    assert plain.config.use_cache
    model = checkpoint_blocks(copy.deepcopy(plain), "full")
    assert not model.config.use_cache  # a cache filled twice (forward, recomputation) would be wrong

    def grads(m, seed=7):
        m.train()
        m.zero_grad()
        torch.manual_seed(seed)
        lm_loss(m(X).logits, X).backward()
        return [p.grad.clone() for p in m.parameters()]
    assert bitwise(grads(plain), grads(model))
    assert not bitwise(grads(plain, seed=8), grads(plain))  # the attention dropout's masks do matter
    uncheckpoint(model)
    assert model.config.use_cache  # restored


def test_autocast_nested_checkpoints_and_keyword_inputs_replay_exactly():
    torch.manual_seed(0)
    plain = GPT(CFG)
    model = checkpoint_blocks(copy.deepcopy(plain), "full")

    def autocast_grads(m):
        m.zero_grad()
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(X)
        lm_loss(out.float(), X).backward()
        return [p.grad.clone() for p in m.parameters()]
    assert bitwise(autocast_grads(model), autocast_grads(plain))  # recomputed under the same autocast
    lin1, lin2, drop = nn.Linear(8, 8), nn.Linear(8, 8), nn.Dropout(0.5)
    x, scale = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)

    def inner(t, *, scale):
        return drop(lin2(t)).relu() * scale

    def outer(d):  # a dict input, a checkpoint inside a checkpoint, a keyword argument
        return checkpoint(inner, drop(lin1(d["x"][0])), scale=d["scale"])

    def grads(fn):
        for t in (x, scale, lin1.weight, lin2.weight):
            t.grad = None
        torch.manual_seed(1)
        fn({"x": [x], "scale": scale}).sum().backward()
        return [t.grad.clone() for t in (x, scale, lin1.weight, lin2.weight)]
    plain_fn = lambda d: drop(lin2(drop(lin1(d["x"][0])))).relu() * d["scale"]  # noqa: E731
    assert bitwise(grads(lambda d: checkpoint(outer, d)), grads(plain_fn))


def test_autograd_grad_and_backward_with_inputs_are_refused():
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="autograd.grad"):  # it would write lin's gradients into .grad unseen
        torch.autograd.grad(checkpoint(lin, x).sum(), x)
    with pytest.raises(RuntimeError, match="inputs"):
        checkpoint(lin, x).sum().backward(inputs=[x])


def test_recomputation_costs_one_more_forward_or_the_core_attention_matmuls():
    for policy in ("full", "selective"):
        f = recompute_flops(policy)
        assert f["checkpointed"] - f["plain"] == f["expected_extra"] > 0, (policy, f)


@pytest.mark.exercise("saved_bytes_per_layer")
def test_saved_bytes_per_layer_formulas():
    formula = implementation("saved_bytes_per_layer")
    s, b, h, a = 2048, 1, 12288, 96  # GPT-3 175B's layer
    assert formula("selective", s, b, h, a) == 34 * s * b * h  # 16-bit, dropout, 1-byte masks (the paper)
    assert formula("full", s, b, h, a) == 2 * s * b * h
    assert formula("none", s, b, h, a) == activation_bytes_per_layer(s, b, h, a) == s * b * h * (34 + 5 * a * s // h)
    assert formula("selective", 16, 12, 32, 4, 4, False) == 4 * 16 * 16 * 12 * 32
    assert formula("selective", 8, 2, 16, 2, 4, True, 4) == 4 * 16 * 8 * 2 * 16 + 4 * 2 * 8 * 2 * 16
    for policy in ("none", "selective", "full"):  # what the tiny GPT really saves (fp32, no dropout)
        m = saved_per_layer(policy)
        assert formula(policy, 16, 12, 32, 4, 4, False) + m["layernorm_stats"] == m["bytes"]
    with pytest.raises(ValueError, match="policy"):
        formula("some", s, b, h, a)


def test_data_parallel_trains_bitwise_with_checkpointing_on_3_ranks():
    variants = [("full", None), ("selective", None)]
    for per_variant in launch(against_plain, 3, variants):
        for run in per_variant.values():
            assert run["diff"] == 0.0 and run["divergence"] == 0.0 and run["counted"]


def test_eval_runs_plainly_and_a_segment_without_grad_inputs_still_trains_its_parameters():
    torch.manual_seed(0)
    model = checkpoint_blocks(GPT(GPTConfig(n_layer=2, n_embd=32, block_size=16)), "full")
    with torch.no_grad():
        assert model(X).shape == (6, 16, 512)
    lin = nn.Linear(4, 4)
    checkpoint(lin, torch.randn(2, 4)).sum().backward()  # the input needs no gradient: the anchor keeps the graph
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_uncheckpoint_restores_the_model_and_bad_requests_are_refused():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_embd=32, block_size=16))
    keys = list(model.state_dict())
    checkpoint_blocks(model, "selective")
    assert list(model.state_dict()) == keys  # applied from outside: no parameter renamed
    with pytest.raises(ValueError, match="already checkpointed"):
        checkpoint_blocks(model, "full")
    uncheckpoint(model)
    assert "forward" not in model.blocks[0].__dict__ and "attend" not in model.blocks[0].attn.__dict__
    own = model.blocks[1].forward = lambda h: h  # an instance's own override survives a checkpoint round trip
    uncheckpoint(checkpoint_blocks(model, "full"))
    assert model.blocks[1].forward is own and "forward" not in model.blocks[0].__dict__
    del model.blocks[1].forward
    checkpoint_blocks(model, "full")
    with pytest.raises(ValueError, match="policy must be one of"):
        checkpoint_blocks(GPT(), "every-other")
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        checkpoint_blocks(nn.Linear(2, 2), "full")
    with pytest.raises(ValueError, match="attend"):
        checkpoint_blocks(nn.Sequential(nn.ModuleList([nn.Linear(2, 2)])), "selective")
    with pytest.raises(ValueError, match="tensor or a tuple of tensors"):
        checkpoint(lambda t: {"out": t * 2}, torch.randn(2, requires_grad=True))
