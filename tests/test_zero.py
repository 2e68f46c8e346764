"""ZeRO stages 1 and 2 (and 3 as one FSDP unit): the same weights as DDP, the memory and bytes of the formulas,
unused parameters, parameter groups, state dicts, accumulation, mixed precision, and ZeroRedundancyOptimizer."""
import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from minidist import launch
from minidist.data import token_ids
from minidist.data_parallel import DataParallel
from minidist.grading import implementation
from minidist.memory import zero_state_bytes
from minidist.mixed_precision import LossScaler, MixedPrecisionOptimizer
from minidist.models import GPT, count_params, lm_loss
from minidist.tour.data_parallel import BATCHES, BF16_TOL, CFG
from minidist.tour.zero import (ADAM_LR, ADAM_TOL5, REPLICATED, STRATEGIES, against_zero_redundancy, cross_stage,
                                states_and_bytes)
from minidist.zero import ZeroOptimizer


@pytest.mark.exercise("zero_shard_pieces")
def test_shard_pieces_by_hand():
    shard_pieces = implementation("zero_shard_pieces")
    # tensors of 5, 0, 4 elements: 9 in all, padded to 12 on 4 ranks, chunks of 3: [t0 t0 t0][t0 t0 t2][t2 t2 t2][pad]
    assert shard_pieces([5, 0, 4], 0, 4) == (3, [(0, 0, 3, 0)])
    assert shard_pieces([5, 0, 4], 1, 4) == (3, [(0, 3, 5, 0), (2, 0, 1, 2)])
    assert shard_pieces([5, 0, 4], 2, 4) == (3, [(2, 1, 4, 0)])
    assert shard_pieces([5, 0, 4], 3, 4) == (3, [])  # only padding
    assert shard_pieces([6], 0, 1) == (6, [(0, 0, 6, 0)])
    assert shard_pieces([], 0, 3) == (0, [])


@pytest.mark.exercise("zero_shard_pieces")
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shard_pieces_cover_every_element_once(n):
    sizes = [5, 0, 13, 1, 7, 2]
    seen = [[0] * s for s in sizes]
    for rank in range(n):
        chunk, pieces = implementation("zero_shard_pieces")(sizes, rank, n)
        assert chunk == math.ceil(sum(sizes) / n)
        used = [0] * chunk
        for index, start, stop, offset in pieces:
            assert 0 <= start < stop <= sizes[index] and offset + stop - start <= chunk
            for k in range(stop - start):
                seen[index][start + k] += 1
                used[offset + k] += 1
            # the element's place in the flat buffer is its place in the rank's chunk
            assert rank * chunk + offset == sum(sizes[:index]) + start
        assert max(used, default=0) <= 1
    assert all(count == 1 for s in seen for count in s)


def reduce_scatter_by_hand():
    n, rank = dist.get_world_size(), dist.get_rank()
    flats = [torch.arange(2.0 * n) * (rank + 1), torch.full((n,), float(rank), dtype=torch.bfloat16)]
    before = [f.clone() for f in flats]
    out = implementation("zero_reduce_scatter")(flats, None)
    unchanged = all(torch.equal(a, b) for a, b in zip(flats, before))
    return [o.dtype for o in out], out, unchanged


@pytest.mark.exercise("zero_reduce_scatter")
def test_reduce_scatter_gradients_average_each_bucket():
    n = 3
    mean_factor = sum(range(1, n + 1)) / n  # the average of (rank + 1) over the ranks
    for rank, (dtypes, (first, second), unchanged) in enumerate(launch(reduce_scatter_by_hand, n)):
        assert dtypes == [torch.float32, torch.bfloat16] and unchanged
        torch.testing.assert_close(first, torch.arange(2.0 * rank, 2.0 * rank + 2) * mean_factor)
        assert second.shape == (1,) and second.item() == pytest.approx((n - 1) / 2, abs=1e-2)


def all_gather_by_hand():
    rank = dist.get_rank()
    shards = [torch.tensor([rank, 10.0 + rank]), torch.tensor([rank], dtype=torch.bfloat16)]
    return implementation("zero_all_gather")(shards, None)


@pytest.mark.exercise("zero_all_gather")
def test_all_gather_parameters_concatenates_in_rank_order():
    for first, second in launch(all_gather_by_hand, 3):
        assert torch.equal(first, torch.tensor([0.0, 10.0, 1.0, 11.0, 2.0, 12.0]))
        assert torch.equal(second, torch.tensor([0, 1, 2], dtype=torch.bfloat16))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_stage_trains_the_weights_ddp_trains(world_size):
    results = launch(cross_stage, world_size)
    for r in results:
        for strategy in STRATEGIES:
            diff, divergence = r[strategy]
            assert diff < ADAM_TOL5, (strategy, diff)
            assert divergence == (0.0 if strategy in REPLICATED else None)


def padded(psi: int, n: int) -> int:
    return n * math.ceil(psi / n)


def test_memory_and_bytes_with_padding_mixed_precision():
    """CFG's sizes divide by nothing: memory within 1% of the formula (padding); bytes equal the padded formula."""
    n, model = 3, GPT(CFG)
    psi, tensors = count_params(model), len(list(model.parameters()))
    results = launch(states_and_bytes, n, ("ddp", "zero1", "zero2", "zero3"), CFG)
    for stage, s in enumerate(("ddp", "zero1", "zero2", "zero3")):
        formula = zero_state_bytes(psi, n, stage).total
        for r in results:
            assert r[s]["counted"]
            assert abs(r[s]["states"].total - formula) <= 0.01 * formula, (s, r[s]["states"], formula)
    assert stage == 3 and all(r["ddp"]["states"].total == 16 * psi for r in results)
    # Each element's fp32 master and moments (12 bytes) live on exactly one rank, in stages 1 to 3.
    for s in ("zero1", "zero2"):
        moments = sum(r[s]["states"].optimizer for r in results) - 4 * padded(psi, n)  # minus the masters
        assert moments == 8 * psi
    total = {s: sum(r[s]["bytes"].get(op, 0) for r in results for op in ("reduce_scatter", "all_gather"))
             for s in ("zero1", "zero2", "zero3")}
    assert sum(r["ddp"]["bytes"]["all_reduce"] for r in results) == 2 * (n - 1) * 2 * psi
    assert total["zero1"] == total["zero2"] == 2 * (n - 1) * 2 * padded(psi, n)  # what DDP sends, padded
    assert total["zero3"] == 3 * (n - 1) * 2 * padded(psi, n)                   # 1.5x
    flags = sum(r["zero1"]["bytes"]["all_reduce"] for r in results)
    assert flags == 2 * (n - 1) * 4 * tensors  # one int32 flag per tensor: who had a gradient


def test_against_zero_redundancy_optimizer():
    assert max(launch(against_zero_redundancy, 3)) < ADAM_TOL5


class Branchy(nn.Module):
    """`rare` is used on rank 0 only, `never` is never used."""

    def __init__(self):
        super().__init__()
        self.emb, self.rare, self.never, self.out = (nn.Embedding(16, 8), nn.Linear(8, 8), nn.Linear(8, 8),
                                                     nn.Linear(8, 16))

    def forward(self, x):
        h = self.emb(x)
        return self.out(self.rare(h) if dist.get_rank() == 0 else h)


def unused_parameters(stage):
    torch.manual_seed(0)
    start = Branchy()
    ddp_model, zero_model = copy.deepcopy(start), copy.deepcopy(start)
    ddp = DataParallel(ddp_model, find_unused_parameters=True)
    opts = (torch.optim.AdamW(ddp.parameters(), lr=0.01, weight_decay=0.1),
            ZeroOptimizer(zero_model.parameters(), torch.optim.AdamW, stage=stage, lr=0.01, weight_decay=0.1,
                          bucket_cap_mb=0.0005))
    for step in range(3):
        x = torch.randint(16, (4, 5), generator=torch.Generator().manual_seed(10 * step + dist.get_rank()))
        for model, opt in zip((ddp, zero_model), opts):
            lm_loss(model(x), x).backward()
            opt.step()
            opt.zero_grad()
    diff = max((a - b).abs().max().item() for a, b in zip(ddp_model.parameters(), zero_model.parameters()))
    untouched = all(torch.equal(a, b) for a, b in zip(start.never.parameters(), zero_model.never.parameters()))
    return diff, untouched, not torch.equal(start.rare.weight, zero_model.rare.weight)


@pytest.mark.parametrize("stage", [1, 2])
def test_parameters_without_gradient_are_left_alone_and_rare_ones_averaged(stage):
    for diff, never_untouched, rare_trained in launch(unused_parameters, 2, stage):
        assert diff < 1e-6 and never_untouched and rare_trained  # no weight decay on `never` either


def groups_and_state_dict():
    torch.manual_seed(0)
    model = GPT(CFG)
    reference = copy.deepcopy(model)
    n, rank = dist.get_world_size(), dist.get_rank()

    def groups(m):  # no weight decay on biases and LayerNorms, half the learning rate for them
        decay = [p for name, p in m.named_parameters() if p.dim() >= 2]
        return [{"params": decay, "weight_decay": 0.1}, {"params": [p for p in m.parameters() if p.dim() < 2],
                                                         "weight_decay": 0.0, "lr": ADAM_LR / 2}]
    opt = ZeroOptimizer(groups(model), torch.optim.AdamW, stage=1, lr=ADAM_LR)
    ref_opt = torch.optim.AdamW(groups(reference), lr=ADAM_LR)
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, ref_opt)]
    for x, y in BATCHES[:2]:
        for m, o, (xb, yb) in ((model, opt, (x.chunk(n)[rank], y.chunk(n)[rank])), (reference, ref_opt, (x, y))):
            lm_loss(m(xb), yb).backward()
            o.step()
            o.zero_grad()
        for s in schedules:
            s.step()
    ours, theirs = opt.state_dict(), ref_opt.state_dict()
    same_groups = ours["param_groups"] == theirs["param_groups"]
    state_diff = max((ours["state"][i][k] - theirs["state"][i][k]).abs().max().item()
                     for i in theirs["state"] for k in theirs["state"][i])
    # Resume: a fresh model and a stage-2 optimizer loading stage 1's state go on exactly as the original.
    resumed = copy.deepcopy(model)
    resumed_opt = ZeroOptimizer(groups(resumed), torch.optim.AdamW, stage=2, lr=1.0)
    resumed_opt.load_state_dict(ours)
    plain = torch.optim.AdamW(groups(copy.deepcopy(reference)), lr=1.0)
    plain.load_state_dict(ours)  # the format of the wrapped optimizer itself
    for x, y in BATCHES[2:]:
        for m, o in ((model, opt), (resumed, resumed_opt)):
            lm_loss(m(x.chunk(n)[rank]), y.chunk(n)[rank]).backward()
            o.step()
            o.zero_grad()
    resume_diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), resumed.parameters()))
    return same_groups, state_diff, resume_diff, plain.param_groups[1]["lr"] == ours["param_groups"][1]["lr"]


def test_param_groups_schedulers_and_state_dicts():
    for same_groups, state_diff, resume_diff, loaded_by_torch in launch(groups_and_state_dict, 3):
        assert same_groups and loaded_by_torch
        assert state_diff < 1e-6   # moments of reduced gradients: summation order only
        assert resume_diff < 1e-7  # the same arithmetic on the same numbers, up to the stage's reduction order


def accumulation(stage, micro_steps=2):
    torch.manual_seed(0)
    model = GPT(CFG)
    reference = copy.deepcopy(model)
    n, rank = dist.get_world_size(), dist.get_rank()
    opt = ZeroOptimizer(model.parameters(), torch.optim.SGD, stage=stage, lr=0.1, bucket_cap_mb=0.02)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    x, y = BATCHES[0]
    lm_loss(reference(x), y).backward()
    ref_opt.step()
    for xm, ym in zip(x.chunk(n)[rank].chunk(micro_steps), y.chunk(n)[rank].chunk(micro_steps)):
        (lm_loss(model(xm), ym) / micro_steps).backward()
    opt.step()
    return max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize("stage", [1, 2])
def test_gradient_accumulation_over_micro_steps(stage):
    assert max(launch(accumulation, 2, stage)) < 1e-7


def mixed_precision(stage, steps=4):
    """bf16 model + fp32 master shards against one process with a bf16 model and fp32 masters (SGD)."""
    torch.manual_seed(0)
    model = GPT(CFG).bfloat16()
    reference = copy.deepcopy(model)
    n, rank = dist.get_world_size(), dist.get_rank()
    opt = ZeroOptimizer(model.parameters(), torch.optim.SGD, stage=stage, lr=0.1)
    ref_opt = MixedPrecisionOptimizer(reference, torch.optim.SGD, LossScaler(init_scale=1.0), lr=0.1)
    for x, y in BATCHES[:steps]:
        for m, o, (xb, yb) in ((model, opt, (x.chunk(n)[rank], y.chunk(n)[rank])), (reference, ref_opt, (x, y))):
            lm_loss(m(xb).float(), yb).backward()
            o.step()
            o.zero_grad()
    master = opt.state_dict()  # full fp32 masters under "master"
    index = {id(p): i for i, p in enumerate(model.parameters())}
    diffs = [(master["state"][index[id(p)]]["master"] - q).abs().max().item()
             for p, q in zip(model.parameters(), ref_opt.master)]
    dtypes = {p.dtype for p in model.parameters()} | {opt.master.dtype}
    return max(diffs), dtypes


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_model_with_fp32_master_shards(stage):
    for diff, dtypes in launch(mixed_precision, 3, stage):
        assert dtypes == {torch.bfloat16, torch.float32}
        assert diff < BF16_TOL


def bad_inputs():
    model = nn.Linear(2, 2)
    errors = []
    for kwargs in (dict(stage=3), dict(stage=1, bucket_cap_mb=0)):
        try:
            ZeroOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, **kwargs)
        except ValueError as e:
            errors.append(str(e))
    try:
        ZeroOptimizer(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    except ValueError as e:
        errors.append(str(e))
    opt = ZeroOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    try:
        opt.load_state_dict({"state": {}, "param_groups": [{"params": [0], "lr": 0.1}]})
    except ValueError as e:
        errors.append(str(e))
    return errors


def test_bad_input_is_a_clear_error():
    errors = launch(bad_inputs, 1)[0]
    assert len(errors) == 4
    assert "stages 1 and 2" in errors[0] and "fully_shard" in errors[0]
    assert "bucket_cap_mb must be positive" in errors[1]
    assert "must be a torch.optim.Optimizer class" in errors[2]
    assert "parameter groups of [1] tensors, this optimizer [2]" in errors[3]


def test_bench_zero_prints_its_ratio(tmp_path, capsys):
    import json
    from minidist.__main__ import main
    token_ids()  # tokenized once here: the forked ranks inherit it
    assert main(["bench", "zero", "--steps", "1", "--warmup", "0", "--json", str(tmp_path / "b.json")]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["ratio"] == result["minidist_s"] / result["reference_s"] and result["stage2_s"] > 0
    assert "ZeroRedundancyOptimizer" in capsys.readouterr().out


@pytest.mark.parametrize("strategy", ["zero2", "fsdp"])
def test_example_script_trains(strategy):
    from minidist.examples.train import parse, train
    token_ids()  # tokenized once here: the forked ranks inherit it
    for r in launch(train, 2, parse(["--strategy", strategy, "--steps", "20", "--quiet"])):
        assert r["last_loss"] < r["first_loss"] - 0.5
        assert r["replica_divergence"] == (0.0 if strategy == "zero2" else None)  # fsdp: no replicas, shards


def stage2_reduces_during_backward():
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage=2, lr=ADAM_LR, bucket_cap_mb=0.01)
    x, y = BATCHES[0]
    early = []
    for _ in range(3):  # the first backward learns how often each hook fires; later ones launch buckets early
        lm_loss(model(x), y).backward()
        compute_end = opt.reducer.events[0][2]
        early.append([launched < compute_end for _, launched, _ in opt.reducer.events[1:]])
        opt.step()
        opt.zero_grad()
    return early, len(opt.buckets), all(p.grad is None for p in model.parameters())


def test_stage2_reduce_scatters_buckets_while_backward_runs():
    early, buckets, no_full_gradients = launch(stage2_reduces_during_backward, 2)[0]
    assert buckets > 4 and no_full_gradients
    assert not any(early[0])                       # first backward: everything at the end
    assert all(sum(step) >= buckets // 2 for step in early[1:])  # then most buckets leave before backward ends
