"""The tiny GPT and the Hugging Face builders."""
import math

import pytest
import torch

from minidist.models import GPT, GPTConfig, build_gpt2, build_llama, count_params, lm_loss, on_meta


def test_gpt_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = GPT()
    x, y = torch.randint(512, (2, 4, 64))
    logits = model(x)
    assert logits.shape == (4, 64, 512)
    assert lm_loss(logits, y).item() == pytest.approx(math.log(512), abs=0.1)  # near-uniform at initialization


def test_same_seed_same_weights():
    torch.manual_seed(3)
    a = GPT()
    torch.manual_seed(3)
    b = GPT()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_tied_and_untied_output_layer():
    tied, untied = GPT(GPTConfig(tie_weights=True)), GPT(GPTConfig(tie_weights=False))
    assert tied.lm_head.weight is tied.wte.weight
    assert count_params(untied) - count_params(tied) == 512 * 64


def test_causality():
    model = GPT().eval()
    x = torch.randint(512, (1, 10))
    y = x.clone()
    y[0, 7] = (y[0, 7] + 1) % 512
    assert torch.equal(model(x)[0, :7], model(y)[0, :7])  # changing token 7 changes nothing before it


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="n_embd 100 is not divisible by n_head 3"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="sequence length 65 is longer than block_size 64"):
        GPT()(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("build", [build_llama, build_gpt2])
def test_hugging_face_models_build_offline_and_train(build):
    torch.manual_seed(0)
    model = build()
    x = torch.randint(512, (2, 16))
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_seven_billion_parameters_counted_on_the_meta_device():
    model = on_meta("llama-7b")
    assert count_params(model) == 6_738_415_616
    assert next(model.parameters()).device.type == "meta"


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'gpt-9'"):
        on_meta("gpt-9")
