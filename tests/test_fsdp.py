"""FSDP (fully_shard): the lifecycle by hand, FSDP2 side by side, bytes and memory of a step, one unit gathered at a
time, prefetching, full state dicts, accumulation, and the errors."""
import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from minidist import launch
from minidist.data import token_ids
from minidist.fsdp import full_state_dict, fully_shard, reshard_, unshard_
from minidist.grading import implementation
from minidist.memory import zero_state_bytes
from minidist.models import GPT, count_params, lm_loss
from minidist.tour.data_parallel import BATCHES, BF16_TOL, CFG, SGD_TOL
from minidist.tour.fsdp import PEAK_CFG, against_fsdp2, late_prefetches, per_block, timeline
from minidist.tour.zero import states_and_bytes


def unshard_by_hand():
    n, rank = dist.get_world_size(), dist.get_rank()
    full = torch.empty(2 * n)
    view = full[2:4]  # a "parameter": a view of the gathered buffer
    reshard_(full)
    work = implementation("fsdp_unshard")(full, torch.tensor([10.0 * rank, 10.0 * rank + 1]), None)
    work.wait()
    return full.clone(), view.clone()


@pytest.mark.exercise("fsdp_unshard")
def test_unshard_gathers_into_the_freed_tensor():
    for gathered, view in launch(unshard_by_hand, 3):
        assert torch.equal(gathered, torch.tensor([0.0, 1, 10, 11, 20, 21]))
        assert torch.equal(view, torch.tensor([10.0, 11]))  # every view sees the gathered memory


def reshard_by_hand():
    full = torch.empty(2 * dist.get_world_size())
    view = full[2:4]
    unshard_(full, torch.ones(2)).wait()
    before = full.untyped_storage().nbytes()
    implementation("fsdp_reshard")(full)
    after, shape = full.untyped_storage().nbytes(), tuple(view.shape)
    unshard_(full, torch.full((2,), 3.0)).wait()  # the same tensors can be gathered into again
    return before, after, shape, view.clone()


@pytest.mark.exercise("fsdp_reshard")
def test_reshard_frees_the_memory_and_keeps_the_tensors():
    for before, after, shape, view in launch(reshard_by_hand, 2):
        assert before == 16 and after == 0 and shape == (2,)
        assert torch.equal(view, torch.full((2,), 3.0))


def reduce_scatter_by_hand():
    rank = dist.get_rank()
    grads = [torch.full((2, 2), float(rank + 1)), None, torch.arange(3.0) * (rank + 1)]
    work = implementation("fsdp_post_backward")(grads, [4, 3, 3], 4, torch.float32, None)
    return work.wait()


@pytest.mark.exercise("fsdp_post_backward")
def test_post_backward_reduce_scatter_by_hand():
    # 4 + 3 + 3 = 10 elements padded to 12 on 3 ranks: [g0 g0 g0 g0 | 0 0 0 g2 | g2 g2 pad pad], averaged over ranks
    expected = torch.tensor([2.0, 2, 2, 2, 0, 0, 0, 0, 2, 4, 0, 0]).chunk(3)
    for rank, shard in enumerate(launch(reduce_scatter_by_hand, 3)):
        assert shard.dtype == torch.float32 and torch.equal(shard, expected[rank])


@pytest.mark.exercise("fsdp_prefetch")
def test_prefetch_target():
    prefetch_target = implementation("fsdp_prefetch")
    order = ["root", "b0", "b1", "b2"]
    assert [prefetch_target(order, u) for u in order] == ["b0", "b1", "b2", None]
    assert prefetch_target(order[::-1], "b1") == "b0"
    assert prefetch_target(order, "unseen") is None and prefetch_target([], "root") is None


def test_against_fsdp2_fp32_and_bf16():
    for r in launch(against_fsdp2, 2):
        assert r[None] < SGD_TOL and r[torch.bfloat16] < BF16_TOL


def test_bytes_and_memory_of_a_step_with_padding():
    """Stage 3 as one unit, per-block units, and without resharding after forward; CFG's sizes divide nothing."""
    n, model = 3, GPT(CFG)
    psi = count_params(model)
    units = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    units.append(psi - sum(units))  # the root: embeddings (with the tied output layer), final LayerNorm
    padded = {"zero3": n * math.ceil(psi / n), "fsdp": sum(n * math.ceil(u / n) for u in units)}
    padded["fsdp-keep"] = padded["fsdp"]
    results = launch(states_and_bytes, n, tuple(padded), CFG)
    for s, size in padded.items():
        gathers = 3 if s != "fsdp-keep" else 2  # forward, backward (unless kept), and the reduce-scatter
        assert sum(r[s]["total"] for r in results) == gathers * (n - 1) * 2 * size, s  # bf16: 2 bytes
        assert all(r[s]["counted"] for r in results)
        formula = zero_state_bytes(psi, n, 3).total
        for r in results:
            assert abs(r[s]["states"].total - formula) <= 0.01 * formula, (s, r[s]["states"], formula)


def test_one_unit_gathered_at_a_time_plus_the_prefetched_one():
    prefetching, first_step = launch(timeline, 2)[0], launch(timeline, 2, PEAK_CFG, None, 1)[0]
    block, root = prefetching["units"]["blocks.0"], prefetching["units"]["root"]
    assert len(prefetching["units"]) == PEAK_CFG.n_layer + 1
    assert prefetching["peak"] == root + 2 * block
    assert late_prefetches(prefetching["events"]) == 0
    # The first forward learns the order of the units: nothing is prefetched in it, every block's gather is late.
    assert late_prefetches(first_step["events"]) == PEAK_CFG.n_layer


def state_dict_and_accumulation():
    torch.manual_seed(0)
    model = GPT(CFG)
    reference = copy.deepcopy(model)
    sharded = per_block(model, reshard_after_forward=False)
    names_and_values = full_state_dict(sharded)
    same_start = list(names_and_values) == list(reference.state_dict()) and all(
        torch.equal(names_and_values[k], v) for k, v in reference.state_dict().items())
    n, rank = dist.get_world_size(), dist.get_rank()
    opt, ref_opt = torch.optim.SGD(sharded.parameters(), lr=0.1), torch.optim.SGD(reference.parameters(), lr=0.1)
    x, y = BATCHES[0]
    lm_loss(reference(x), y).backward()
    ref_opt.step()
    for xm, ym in zip(x.chunk(n)[rank].chunk(2), y.chunk(n)[rank].chunk(2)):  # two micro-steps, one step
        (lm_loss(sharded(xm), ym) / 2).backward()
    opt.step()
    trained = full_state_dict(sharded)
    diff = max((trained[k] - v).abs().max().item() for k, v in reference.state_dict().items())
    return same_start, diff, [p.dim() for p in sharded.parameters()], sum(p.numel() for p in sharded.parameters())


def test_full_state_dict_and_gradient_accumulation():
    results = launch(state_dict_and_accumulation, 3)
    for same_start, diff, dims, _ in results:
        assert same_start and diff < SGD_TOL
        assert set(dims) == {1}  # at rest the module holds this rank's 1-D pieces
    assert sum(r[3] for r in results) == count_params(GPT(CFG))  # each element on exactly one rank


class TwoDtypes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2).double()


def bad_inputs():
    errors = []
    model = GPT(CFG)
    fully_shard(model.blocks[0])
    for mistake in (lambda: fully_shard(model.blocks[0]), lambda: fully_shard(TwoDtypes()),
                    lambda: fully_shard(nn.Linear(2, 2), param_dtype=torch.int8)):
        try:
            mistake()
        except ValueError as e:
            errors.append(str(e))
    tied = GPT(CFG)
    tied.blocks[0].mlp.fc.weight = tied.blocks[1].mlp.fc.weight  # one parameter in two blocks
    fully_shard(tied.blocks[1])
    try:
        fully_shard(tied.blocks[0])
    except ValueError as e:
        errors.append(str(e))
    return errors


def test_bad_input_is_a_clear_error():
    errors = launch(bad_inputs, 1)[0]
    assert len(errors) == 4
    assert "already sharded" in errors[0]
    assert "must share a dtype" in errors[1] and "torch.float64" in errors[1]
    assert "must be floating-point" in errors[2]
    assert "mlp.fc.weight is already sharded by another fully_shard unit" in errors[3]


def test_bench_fsdp_prints_its_ratio(tmp_path, capsys):
    import json
    from minidist.__main__ import main
    token_ids()  # tokenized once here: the forked ranks inherit it
    assert main(["bench", "fsdp", "--steps", "1", "--warmup", "0", "--json", str(tmp_path / "b.json")]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["ratio"] == result["minidist_s"] / result["reference_s"] and result["one_unit_s"] > 0
    assert "FSDP2" in capsys.readouterr().out

