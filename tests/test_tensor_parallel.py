"""Tensor and sequence parallelism: equal to one process and to DTensor; bytes and memory by the formulas; errors."""
import json
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from minidist import launch
from minidist.grading import implementation
from minidist.memory import activation_bytes_per_layer
from minidist.models import GPT, GPTConfig, build_llama
from minidist.tensor_parallel import (GPT_PLAN, LLAMA_PLAN, ColumnParallelLinear, RowParallelLinear,
                                      VocabParallelEmbedding, padded_size, parallelize, vocab_parallel_cross_entropy)
from minidist.tensor_parallel.plans import full_parameters, sharded_parameters
from minidist.tour.tensor_parallel import (ADAM_TOL, BATCH, BF16_TOL, CFG, DTENSOR_TOL, GRAD_TOL,
                                           activations_per_layer, against_one_process, layernorm_stat_bytes, preload,
                                           sp_grad_numel, tp_bytes_per_step, tp_param_bytes, under_autocast)
from minidist.tour.tp_dtensor import dtensor_side_by_side

preload()  # transformers and DTensor imported once here: the forked ranks inherit them
TOKENS = BATCH * CFG.block_size


# Exercises: the region boundaries, on small integers (sums are exact, so results must be bit-identical).

def region(which: str):
    fn = implementation(which)
    n, r = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(0)
    full = torch.randint(-5, 5, (2, 6, 4), generator=g).float()      # the same on every rank
    weights = torch.randint(-5, 5, (n, 2, 6, 4), generator=g).float()  # rank s's loss: (result * weights[s]).sum()
    out = {}
    for sp in (False, True):
        if which == "enter_parallel_region":
            x = (full.chunk(n, 1)[r] if sp else full).clone().requires_grad_()
        else:
            x = (full * (r + 1)).requires_grad_()                       # partial sums: the total is full * n(n+1)/2
        y = fn(x, None, sp)
        w = weights[r].chunk(n, 1)[r] if sp and which == "leave_parallel_region" else weights[r]
        (y * w).sum().backward()
        out[sp] = (y.detach(), x.grad)
    return full, weights, out


def region_error():
    try:
        implementation("leave_parallel_region")(torch.zeros(2, 2 * dist.get_world_size() + 1, 4), None, True)
    except ValueError as e:
        return str(e)


@pytest.mark.exercise("enter_parallel_region")
@pytest.mark.parametrize("world_size", [2, 3])
def test_enter_parallel_region_is_f_or_the_sequence_all_gather(world_size):
    n = world_size
    for r, (full, weights, out) in enumerate(launch(region, n, "enter_parallel_region")):
        (y, grad), (y_sp, grad_sp) = out[False], out[True]
        assert torch.equal(y, full) and torch.equal(y_sp, full)
        assert torch.equal(grad, weights.sum(0))                     # backward: all-reduce of the partial gradients
        assert torch.equal(grad_sp, weights.sum(0).chunk(n, 1)[r])   # backward: reduce-scatter


@pytest.mark.exercise("leave_parallel_region")
@pytest.mark.parametrize("world_size", [2, 3])
def test_leave_parallel_region_is_g_or_the_sequence_reduce_scatter(world_size):
    n = world_size
    for r, (full, weights, out) in enumerate(launch(region, n, "leave_parallel_region")):
        (y, grad), (y_sp, grad_sp) = out[False], out[True]
        total = full * n * (n + 1) // 2
        assert torch.equal(y, total) and torch.equal(y_sp, total.chunk(n, 1)[r])
        assert torch.equal(grad, weights[r])                          # backward: identity
        assert torch.equal(grad_sp, torch.cat([weights[s].chunk(n, 1)[s] for s in range(n)], dim=1))  # all-gather


@pytest.mark.exercise("leave_parallel_region")
def test_leave_parallel_region_refuses_a_sequence_it_cannot_split():
    n = 3
    for error in launch(region_error, n):   # every rank raises, none waits in a collective
        assert error is not None and re.search(rf"\b{2 * n + 1}\b.*\b{n}\b", error), error


def sp_regather_run():
    """On each rank: the learner's regathered_input called directly by three users (twice: two backwards), then
    inside three SP column-parallel layers sharing one input, against one process."""
    import minidist.tensor_parallel.layers as layers
    from minidist import comm
    regather = implementation("sp_regather")
    layers.regathered_input = regather     # what _Regather.full calls, in this rank's process only
    n, r = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(0)
    fulls = [torch.randn(2, 2 * n, 4, generator=g) for _ in range(2)]
    source = layers._Regather(fulls[0][:, 2 * r:2 * r + 2].clone(), None)
    direct = []
    for full in fulls:                                  # two backwards, the shard updated in between
        source.shard.copy_(full[:, 2 * r:2 * r + 2])
        source.users = 3
        with comm.ring_backend(), comm.ByteLedger() as ledger:
            outs = [regather(source) for _ in range(3)]
        direct.append((all(torch.equal(o, full) for o in outs), any(o.requires_grad for o in outs),
                       ledger.count("all_gather"), ledger.total_bytes(), ledger.counted, source._full is None,
                       source.users))
    linears = [nn.Linear(4, 3 * n) for _ in range(3)]   # q, k, v of one process
    x = fulls[0].clone().requires_grad_()
    weights = torch.randn(3, 2, 2 * n, 3 * n, generator=g)
    sum((lin(x) * w).sum() for lin, w in zip(linears, weights)).backward()
    cols = [ColumnParallelLinear.from_linear(lin, None, input_ready=True, sequence_parallel=True) for lin in linears]
    shard = x.detach()[:, 2 * r:2 * r + 2].clone().requires_grad_()
    with comm.ring_backend(), comm.ByteLedger() as ledger:
        inp = layers.prepare_input(shard, None, sequence_parallel=True)
        mine = slice(3 * r, 3 * r + 3)
        sum((c(inp) * w[..., mine]).sum() for c, w in zip(cols, weights)).backward()
    diff = max([(c.weight.grad - lin.weight.grad[mine]).abs().max().item() for c, lin in zip(cols, linears)] +
               [(shard.grad - x.grad[:, 2 * r:2 * r + 2]).abs().max().item()])
    return direct, diff, ledger.count("all_gather"), ledger.count("reduce_scatter")


@pytest.mark.exercise("sp_regather")
def test_sp_regather_gathers_once_per_backward_and_lets_go():
    n = 3
    for direct, diff, gathers, scatters in launch(sp_regather_run, n):
        full_bytes = 2 * 2 * n * 4 * 4                               # (2, T=2n, 4) fp32
        for values, has_history, count, sent, counted, released, users in direct:
            assert values and not has_history
            assert count == 1 and counted and sent == full_bytes * (n - 1) // n   # one ring all-gather, 3 users
            assert released and users == 0
        assert diff < 1e-5
        assert gathers == 2 and scatters == 1     # forward's all-gather, backward's one re-gather; the input's
        #                                           gradient reduce-scattered once for q, k and v together


@pytest.mark.exercise("shard_output_features")
def test_shard_output_features_by_hand():
    shard = implementation("shard_output_features")
    w = torch.arange(12.).view(6, 2)
    assert torch.equal(shard(w, 1, 3), w[2:4])
    qkv = torch.arange(12.)  # q = 0..3, k = 4..7, v = 8..11
    assert torch.equal(shard(qkv, 0, 2, 3), torch.tensor([0., 1, 4, 5, 8, 9]))
    assert torch.equal(shard(qkv, 1, 2, 3), torch.tensor([2., 3, 6, 7, 10, 11]))
    with pytest.raises(ValueError, match=r"\b5\b.*\b2\b"):  # 15 = 3 blocks of 5: not divisible by 2
        shard(torch.zeros(15, 2), 0, 2, 3)


@pytest.mark.exercise("shard_output_features")
@pytest.mark.parametrize("n, chunks", [(3, 1), (4, 3), (2, 3)])
def test_shards_tile_the_weight_and_compute_the_dense_slices(n, chunks):
    shard = implementation("shard_output_features")
    torch.manual_seed(0)
    dense = nn.Linear(8, 12 * chunks)
    x = torch.randn(5, 8)
    y = dense(x).detach()
    for r in range(n):
        w, b = shard(dense.weight.detach(), r, n, chunks), shard(dense.bias.detach(), r, n, chunks)
        assert w.shape == (12 * chunks // n, 8) and w.data_ptr() != dense.weight.data_ptr()
        expected = torch.cat([block.chunk(n, dim=-1)[r] for block in y.chunk(chunks, dim=-1)], dim=-1)
        assert torch.allclose(F.linear(x, w, b), expected, atol=1e-6)


def vocab_loss(vocab: int, scale: float):
    fn = implementation("vocab_parallel_loss")
    n, r = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, vocab, generator=g) * scale
    targets = torch.randint(vocab, (12,), generator=g)
    local_v = padded_size(vocab, n) // n
    targets[:n] = torch.arange(n) * local_v  # a target on every rank's slice
    padded = torch.cat([logits, torch.full((12, padded_size(vocab, n) - vocab), float("-inf"))], dim=1)
    loss, softmax = fn(padded.chunk(n, dim=1)[r], targets, None)
    return loss, softmax, F.cross_entropy(logits, targets, reduction="none"), padded.softmax(-1).chunk(n, dim=1)[r]


@pytest.mark.exercise("vocab_parallel_loss")
@pytest.mark.parametrize("world_size, vocab, scale", [(3, 8, 100.0), (2, 10, 1.0)])
def test_vocab_parallel_loss_equals_the_full_vocabulary(world_size, vocab, scale):
    for loss, softmax, ref_loss, ref_softmax in launch(vocab_loss, world_size, vocab, scale):
        assert torch.isfinite(loss).all()                                  # exp(100 x randn) overflows fp32
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
        assert torch.allclose(softmax, ref_softmax, atol=1e-6)


def vocab_loss_bytes(vocab: int):
    """Bytes this rank sends computing the loss of 12 tokens, under the ring backend (every byte counted)."""
    from minidist import comm
    from minidist.testing import bytes_sent
    n, r = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(1)
    logits, targets = torch.randn(12, vocab, generator=g), torch.randint(vocab, (12,), generator=g)
    with comm.ring_backend(), bytes_sent() as sent:
        loss, _ = implementation("vocab_parallel_loss")(logits.chunk(n, dim=1)[r].contiguous(), targets, None)
    return sent["bytes"], loss, F.cross_entropy(logits, targets, reduction="none")


@pytest.mark.exercise("vocab_parallel_loss")
def test_vocab_parallel_loss_sends_a_few_floats_per_token_not_the_logits():
    # A vocabulary of 256 on 2 ranks: gathering the logits sends 128 floats a token; the loss needs a handful (a
    # maximum, a sum of exponentials and a target logit per token: the package sends 3 x 4 bytes).
    for sent, loss, ref in launch(vocab_loss_bytes, 2, 256):
        assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-5)
        assert 0 < sent <= 12 * 4 * 4, f"{sent} bytes sent for 12 tokens: more than 4 floats a token"


# The layers and the loss on their own.

def layers_alone():
    n, r = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    fc, proj, emb = nn.Linear(6, 12), nn.Linear(12, 6), nn.Embedding(8, 6)  # vocabulary 8: padded to 9 at N = 3
    x = torch.randn(2, 3, 6, requires_grad=True)
    ref = proj(F.gelu(fc(x)))
    ref.sum().backward()
    col, row = ColumnParallelLinear.from_linear(fc, None), RowParallelLinear.from_linear(proj, None)
    gathered = ColumnParallelLinear.from_linear(fc, None, gather_output=True)
    split_in = RowParallelLinear.from_linear(proj, None, input_is_parallel=False)
    x2 = x.detach().clone().requires_grad_()
    out = row(F.gelu(col(x2)))
    out.sum().backward()
    head = ColumnParallelLinear.from_linear(nn.Linear(6, 8, bias=False), None, pad=True)
    ids = torch.randint(8, (2, 3))
    ours = VocabParallelEmbedding.from_embedding(emb, None)
    lookup = ours(ids)
    (lookup * torch.arange(6.0)).sum().backward()
    (emb(ids) * torch.arange(6.0)).sum().backward()
    rows = padded_size(8, n) // n
    return {"out": (out - ref).abs().max().item(), "x_grad": (x2.grad - x.grad).abs().max().item(),
            "bias_grad": (row.bias.grad - proj.bias.grad).abs().max().item(),
            "col_grads": max((col.weight.grad - fc.weight.grad.chunk(n)[r]).abs().max().item(),
                             (col.bias.grad - fc.bias.grad.chunk(n)[r]).abs().max().item()),
            "row_grad": (row.weight.grad - proj.weight.grad.chunk(n, dim=1)[r]).abs().max().item(),
            "gathered": (gathered(x) - fc(x)).abs().max().item(),
            "split_in": (split_in(fc(x)) - proj(fc(x))).abs().max().item(),
            "head": head(x).detach(), "padding": head.valid_out < head.local_out,
            "emb": (lookup - emb(ids)).abs().max().item(),
            "emb_grad": (ours.weight.grad - torch.cat([emb.weight.grad, torch.zeros(1, 6)])[r * rows:(r + 1) * rows])
            .abs().max().item()}


def test_column_then_row_equals_the_dense_mlp():
    results = launch(layers_alone, 3)
    for res in results:
        for key in ("out", "x_grad", "bias_grad", "col_grads", "row_grad", "gathered", "split_in", "emb", "emb_grad"):
            assert res[key] < 1e-6, key
    assert [res["padding"] for res in results] == [False, False, True]  # 9 = 3 x 3 rows, one of them padding
    assert torch.isinf(results[2]["head"][..., -1]).all() and torch.isfinite(results[2]["head"][..., :-1]).all()


def loss_with_ignored_targets():
    n, r = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    targets = torch.randint(8, (2, 5), generator=g)
    targets[0, :2] = -100
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    ref.backward()
    padded = torch.cat([logits.detach(), torch.full((2, 5, 1), float("-inf"))], dim=-1)  # 9 columns at N = 3
    local = padded.chunk(n, dim=-1)[r].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, targets)
    loss.backward()
    expected = torch.cat([logits.grad, torch.zeros(2, 5, 1)], dim=-1).chunk(n, dim=-1)[r]
    return abs(loss.item() - ref.item()), (local.grad - expected).abs().max().item()


def test_vocab_parallel_cross_entropy_gradient_and_ignored_targets():
    for loss_diff, grad_diff in launch(loss_with_ignored_targets, 3):
        assert loss_diff < 1e-6 and grad_diff < 1e-7


# Whole models against one process: logits, loss, every gradient, 5 AdamW steps, bytes and memory by the formulas.

def both_modes(model):
    return [against_one_process(model, sp) for sp in (False, True)]


@pytest.mark.parametrize("model, world_size", [("gpt", 3), ("gpt", 4), ("llama", 2), ("llama", 3)])
def test_parallelized_model_equals_one_process(model, world_size):
    n, layers = world_size, 2
    per_rank = launch(both_modes, n, model)
    for sp in (False, True):
        results = [modes[sp] for modes in per_rank]
        for r in results:
            assert r["first"] < GRAD_TOL and r["grads"] < GRAD_TOL and r["weights"] < ADAM_TOL
            assert r["divergence"] == 0.0  # replicated parameters: bitwise equal on every rank
            assert r["counted"] and r["axes"] == {"tp"}
            assert r["param_bytes"] == tp_param_bytes(model, n)
            assert r["tied"]
        # Counted bytes, summed over ranks, equal the formula exactly (per-rank bytes differ when N divides nothing).
        formula = tp_bytes_per_step(n, layers, CFG.n_embd, TOKENS, sp, sp_grad_numel(model, n))
        assert sum(r["bytes"] for r in results) == n * formula
        ops = {op: count for op, (count, _) in results[0]["collectives"].items()}
        if sp:
            extra = 6 * layers + 2 if model == "gpt" else 2 * layers + 1  # gradient all-reduces of sharded norms
            assert ops == {"all_reduce": 2 + extra, "all_gather": 6 * layers + 4, "reduce_scatter": 4 * layers + 1}
        else:  # 4 per layer, the embedding, the output layer's input, the loss; the loss's max is an all-gather
            assert ops == {"all_reduce": 4 * layers + 3, "all_gather": 1}


def test_tensor_parallel_bytes_formula_by_hand():
    # N = 2, 1 layer, 1 token, hidden 1: S = 4 bytes; an all-reduce sends 4 bytes per rank, an all-gather 2.
    assert tp_bytes_per_step(2, 1, 1, 1, False) == 6 * 4 + 4 + 8   # 6 all-reduces + loss (gather 4, reduce 8)
    assert tp_bytes_per_step(2, 1, 1, 1, True, 3) == 4 + 14 * 2 + 12 + 12


@pytest.mark.parametrize("world_size", [2, 3])
def test_sequence_parallel_divides_every_activation(world_size):
    n = world_size
    tp, sp = launch(activations_per_layer, n, False), launch(activations_per_layer, n, True)
    for r in tp + sp:
        assert r["bytes"] == r["formula"] + r["layernorm_stats"]  # exact; the paper leaves out LayerNorm's stats
    one_process = activation_bytes_per_layer(CFG.block_size, BATCH, CFG.n_embd, CFG.n_head, 4, dropout=False)
    assert sp[0]["bytes"] * n == one_process + layernorm_stat_bytes(TOKENS)  # all of it divided by N
    assert sp[0]["bytes"] < tp[0]["bytes"] < one_process


def test_sequence_parallel_trains_under_bf16_autocast():
    # The re-gathered shard is fp32, the gradient bf16: the backward computes in bf16, as autocast's matmul would.
    for sp, world_size in ((True, 2), (False, 3)):
        for r in launch(under_autocast, world_size, "gpt", sp):
            assert r["weights"] < BF16_TOL and r["divergence"] == 0.0


# Side by side with PyTorch's DTensor tensor parallelism.

def dtensor_both(model):
    return [dtensor_side_by_side(model, sp) for sp in (False, True)]


@pytest.mark.parametrize("model, world_size", [("gpt", 2), ("llama", 2), ("gpt", 3)])
def test_equals_dtensor_tensor_parallel(model, world_size):
    for modes in launch(dtensor_both, world_size, model):
        for r in modes:
            assert r["first"] < GRAD_TOL and r["weights"] < DTENSOR_TOL


# Structure: names, shards, ties; and clear errors.

def names_and_shards():
    torch.manual_seed(0)
    dense = GPT(CFG)
    torch.manual_seed(0)
    tp = parallelize(GPT(CFG), None, GPT_PLAN)
    full = full_parameters(tp)
    return ([name for name, _ in tp.named_parameters()] == [name for name, _ in dense.named_parameters()],
            max((full[k] - p).abs().max().item() for k, p in dense.named_parameters()),
            tp.lm_head.weight is tp.wte.weight, tuple(tp.wte.weight.shape), sorted(sharded_parameters(tp)))


def test_names_stay_and_shards_reassemble_the_dense_weights():
    results = launch(names_and_shards, 3)
    for same_names, diff, tied, wte_shape, sharded in results:
        assert same_names and diff == 0.0 and tied
        assert wte_shape == (171, CFG.n_embd)  # 512 padded to 513 = 3 x 171
        assert "blocks.0.attn.proj.weight" in sharded and "blocks.0.attn.proj.bias" not in sharded
        assert "blocks.0.ln1.weight" not in sharded and "wpe.weight" not in sharded


def mistakes():
    seen = []

    def expect(fn, *args):
        try:
            fn(*args)
            seen.append(None)
        except ValueError as e:
            seen.append(str(e))
    six_heads = GPT(GPTConfig(n_layer=1, n_embd=48, n_head=6, block_size=12))
    expect(parallelize, six_heads, None, GPT_PLAN)
    untouched = type(six_heads.blocks[0].attn.qkv) is nn.Linear
    expect(parallelize, build_llama(hidden_size=48, num_attention_heads=12, num_key_value_heads=2,
                                    intermediate_size=96), None, LLAMA_PLAN)
    expect(parallelize, nn.Sequential(nn.Linear(4, 6)), None, {"0": "colwise"})
    expect(parallelize, nn.Sequential(nn.LayerNorm(4)), None, {"0": "rowwise"})
    expect(parallelize, nn.Sequential(nn.Linear(4, 4)), None, {"0": "diagonal"})
    expect(parallelize, nn.Sequential(nn.Linear(4, 4)), None, {"1": "colwise"})
    expect(parallelize, nn.Sequential(nn.Linear(4, 4)), None, {"0": "colwise", "[0]": "rowwise"})
    expect(parallelize, nn.Sequential(nn.Linear(4, 4)), None)
    expect(parallelize, nn.Sequential(nn.Linear(4, 4)), None, {"0": "colwise"}, True)
    sp = parallelize(GPT(CFG), None, GPT_PLAN, sequence_parallel=True)
    expect(sp, torch.zeros(2, 10, dtype=torch.long))
    no_norms = {k: v for k, v in GPT_PLAN.items() if k != "blocks.*.ln[12]"}   # the LayerNorms left replicated
    expect(parallelize, GPT(CFG), None, no_norms, True)
    expect(parallelize, FusedGroupedQuery(), None, {"attn": "attention", "attn.qkv": "colwise_qkv"})
    embedding = VocabParallelEmbedding.from_embedding(nn.Embedding(6, 4), None)   # 6 rows padded to 8 at N = 4
    for ids in ([[6]], [[-3]]):
        expect(embedding, torch.tensor(ids))
    logits = torch.cat([torch.randn(3, 6), torch.full((3, 2), float("-inf"))], 1).chunk(4, 1)[dist.get_rank()]
    for targets in ([0, 9, 1], [-1, 0, 0], [7, 0, -100]):
        expect(vocab_parallel_cross_entropy, logits, torch.tensor(targets))
    return seen, untouched


class FusedGroupedQuery(nn.Module):
    """A fused q|k|v of 8 query heads over 4 key-value heads of 3 dimensions: q is 24 wide, k and v 12 each, so
    three equal thirds of 16 would cut through q and k."""

    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.config = type("Config", (), {"num_attention_heads": 8, "num_key_value_heads": 4})()
        self.attn.qkv = nn.Linear(8, 8 * 3 + 2 * 4 * 3)


def test_clear_errors_before_any_change():
    seen, untouched = launch(mistakes, 4)[0]
    assert seen[0] == "blocks.0.attn: 6 heads are not divisible by tensor-parallel size 4"
    assert untouched  # the checks run before the first module is swapped
    assert seen[1] == "model.layers.0.self_attn: 2 key-value heads are not divisible by tensor-parallel size 4"
    assert seen[2] == "0: 6 output features are not divisible by tensor-parallel size 4"
    assert seen[3] == "0: style 'rowwise' needs an nn.Linear, got LayerNorm"
    assert "unknown tensor-parallel style(s) ['diagonal']" in seen[4]
    assert "match no module" in seen[5] and "['1']" in seen[5]
    assert "matches several plan entries" in seen[6]
    assert "needs a plan" in seen[7]
    assert "needs a 'sequence_scatter' entry" in seen[8]
    assert seen[9] == "sequence length 10 is not divisible by tensor-parallel size 4"
    assert seen[10].startswith("sequence parallelism: blocks.0.ln1.weight, blocks.0.ln1.bias, blocks.0.ln2.weight")
    assert seen[11] == ("attn.qkv: 'colwise_qkv' cuts three equal thirds, but its attention has 8 heads and 4 "
                        "key-value heads: use separate q, k, v projections")
    assert seen[12:14] == ["token id 6 is outside the vocabulary [0, 6)",
                           "token id -3 is outside the vocabulary [0, 6)"]
    assert seen[14:] == ["target 9 is outside the vocabulary [0, 8)", "target -1 is outside the vocabulary [0, 8)",
                         "target 7 has logit -inf: a padding column of the vocabulary (padded to 8)"]


# The benchmark and the example script, run in this process (its ranks fork from it, with everything imported).

def test_bench_tp_reports_the_ratio(tmp_path, capsys):
    from minidist.__main__ import main
    assert main(["bench", "tp", "--world-size", "2", "--steps", "2", "--warmup", "0", "--json",
                 str(tmp_path / "b.json")]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["minidist_s"] > 0 and result["reference_s"] > 0 and result["world_size"] == 2
    out = capsys.readouterr().out
    assert "ratio" in out and "DTensor" in out


def test_example_trains_a_tensor_parallel_llama(capsys):
    from minidist.examples.train import main
    assert main(["--strategy", "tp", "--model", "tiny-llama", "--sequence-parallel", "--world-size", "2",
                 "--steps", "15", "--block-size", "32", "--quiet"]) == 0
    first, last, val, divergence = (float(v) for v in re.search(
        r"loss ([\d.]+) -> ([\d.]+), validation ([\d.]+), replicas differ by (\S+)", capsys.readouterr().out).groups())
    assert last < first - 0.5 and divergence == 0.0


def test_id_checks_on_a_device_tensor_never_sync_with_the_host():
    """On an accelerator the checks assert asynchronously (bad.any() in an `if` would wait for the device on every
    embedding and loss forward). The meta device stands in: any host read of its values raises."""
    from minidist.tensor_parallel.vocab import check_ids
    check_ids(torch.tensor([3, 99, -1], device="meta"), 10)          # no values to read: passes without a sync
    with pytest.raises(ValueError, match="token id 99 is outside the vocabulary"):
        check_ids(torch.tensor([3, 99, -1]), 10)                      # on the host: refused, by name
