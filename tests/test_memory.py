"""The memory model against hand-computed numbers, and against the bytes really held and saved."""
import json
import subprocess
import sys

import pytest
import torch

from minidist.grading import implementation
from minidist.memory import GB, SavedActivations, measure_state_bytes, zero_state_bytes
from minidist.models import GPT, GPTConfig, count_params, lm_loss


@pytest.mark.exercise("zero_state_bytes")
def test_the_7_5b_model_on_64_ranks():
    zero_state_bytes = implementation("zero_state_bytes")
    table = {s: zero_state_bytes(7.5e9, 64, s).total / GB for s in range(4)}
    assert table[0] == pytest.approx(120.0)
    assert table[1] == pytest.approx(30 + 90 / 64)      # 31.4: 4Ψ + 12Ψ/N
    assert table[2] == pytest.approx(15 + 105 / 64)     # 16.6: 2Ψ + 14Ψ/N
    assert table[3] == pytest.approx(120 / 64)          # 1.9:  16Ψ/N


@pytest.mark.exercise("zero_state_bytes")
def test_stage_1_shards_optimizer_states_not_gradients():
    zero_state_bytes = implementation("zero_state_bytes")
    s1 = zero_state_bytes(1000, 4, stage=1)
    assert (s1.params, s1.grads, s1.optimizer) == (2000, 2000, 3000)
    s2 = zero_state_bytes(1000, 4, stage=2)
    assert (s2.params, s2.grads, s2.optimizer) == (2000, 500, 3000)


@pytest.mark.exercise("zero_state_bytes")
def test_fp32_adam():
    zero_state_bytes = implementation("zero_state_bytes")
    b = zero_state_bytes(1000, 1, stage=0, precision="fp32")
    assert (b.params, b.grads, b.optimizer, b.total) == (4000, 4000, 8000, 16000)
    assert zero_state_bytes(1000, 8, stage=3, precision="fp32").total == 2000


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_params=-3), "num_params must be a non-negative number"),
    (dict(num_params=float("nan")), "num_params must be a non-negative number"),
    (dict(num_params=10, world_size=0), "world_size must be a positive integer"),
    (dict(num_params=10, world_size=2.5), "world_size must be a positive integer"),
    (dict(num_params=10, stage=4), "ZeRO stage must be 0, 1, 2 or 3"),
    (dict(num_params=10, precision="fp8"), "precision must be one of"),
])
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        zero_state_bytes(**kwargs)


@pytest.mark.exercise("activation_bytes_per_layer")
@pytest.mark.parametrize("s, b, h, a", [(2048, 1, 12288, 96), (512, 8, 1024, 16), (64, 4, 64, 4)])
def test_activation_formula_is_the_papers_in_16_bit_with_dropout(s, b, h, a):
    assert implementation("activation_bytes_per_layer")(s, b, h, a) == s * b * h * (34 + 5 * a * s / h)


@pytest.mark.exercise("activation_bytes_per_layer")
def test_activation_formula_without_dropout_in_fp32():
    s, b, h, a = 64, 4, 64, 4
    assert implementation("activation_bytes_per_layer")(s, b, h, a, bytes_per_value=4, dropout=False) == 4 * (
        16 * s * b * h + a * s * s * b)


@pytest.mark.exercise("activation_bytes_per_layer")
@pytest.mark.parametrize("cfg", [GPTConfig(), GPTConfig(n_embd=96, n_head=6, block_size=32)])
def test_measured_activations_are_the_formula_plus_layernorm_statistics(cfg):
    activation_bytes_per_layer = implementation("activation_bytes_per_layer")
    batch = 3
    block = GPT(cfg).blocks[0]
    x = torch.randn(batch, cfg.block_size, cfg.n_embd, requires_grad=True)
    with SavedActivations(exclude=block) as saved:
        block(x)
    formula = activation_bytes_per_layer(cfg.block_size, batch, cfg.n_embd, cfg.n_head, 4, dropout=False)
    layernorm_stats = 2 * 2 * cfg.block_size * batch * 4  # two LayerNorms keep a mean and a 1/std per token
    assert saved.bytes == formula + layernorm_stats


def test_measured_model_states_are_16_bytes_per_parameter_for_fp32_adam():
    model = GPT()
    opt = torch.optim.Adam(model.parameters())
    x = torch.randint(512, (2, 16))
    lm_loss(model(x), x).backward()
    opt.step()
    measured = measure_state_bytes(model, opt)
    psi = count_params(model)
    assert (measured.params, measured.grads, measured.optimizer) == (4 * psi, 4 * psi, 8 * psi)


def test_a_tied_weight_is_counted_once():
    model = GPT()
    assert model.lm_head.weight is model.wte.weight
    psi = count_params(model)
    assert psi == sum(p.numel() for n, p in model.named_parameters())       # named_parameters dedups
    assert measure_state_bytes(model).params == 4 * psi


def test_before_the_first_step_there_is_no_gradient_or_optimizer_state():
    model = GPT()
    b = measure_state_bytes(model, torch.optim.Adam(model.parameters()))
    assert b.grads == 0 and b.optimizer == 0


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "minidist", "memory", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_table_and_json(tmp_path):
    out = run_cli("--params", "7.5e9", "--world-size", "64", "--json", str(tmp_path / "m.json"))
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line[:1].isdigit()]
    assert [row[-1] for row in rows] == ["120", "31.4", "16.6", "1.88"]
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["params"] == 7.5e9 and data["world_size"] == 64
    assert data["stages"] == {"0": 120e9, "1": 30e9 + 90e9 / 64, "2": 15e9 + 105e9 / 64, "3": 120e9 / 64}


def test_cli_counts_a_model_from_its_config(tmp_path):
    out = run_cli("--model", "llama-7b", "--world-size", "8", "--json", str(tmp_path / "m.json"))
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "m.json").read_text())["params"] == 6_738_415_616


@pytest.mark.parametrize("args, message", [
    (["--params", "-1"], "argument --params: -1.0 is not positive"),
    (["--params", "10", "--world-size", "0"], "argument --world-size: 0 is not a positive integer"),
    (["--model", "gpt-5"], "unknown model 'gpt-5'"),
    ([], "give --params N or --model NAME"),
])
def test_cli_bad_input(args, message):
    out = run_cli(*args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.exercise("activation_bytes_per_layer")
def test_measured_activations_with_dropout_on_cpu():
    activation_bytes_per_layer = implementation("activation_bytes_per_layer")
    # PyTorch's CPU dropout keeps its mask in the input's dtype (4 bytes here), not one byte as on a GPU.
    cfg, batch = GPTConfig(dropout=0.1, block_size=32), 2
    block = GPT(cfg).blocks[0]
    x = torch.randn(batch, cfg.block_size, cfg.n_embd, requires_grad=True)
    with SavedActivations(exclude=block) as saved:
        block(x)
    formula = activation_bytes_per_layer(cfg.block_size, batch, cfg.n_embd, cfg.n_head, 4, mask_bytes=4)
    assert saved.bytes == formula + 2 * 2 * cfg.block_size * batch * 4
