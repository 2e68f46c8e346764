"""Pipeline parallelism executed on ranks: every schedule equals one process and torch.distributed.pipelining, the
ledger's bytes equal 2 m (v p - 1) messages, measured bubbles and activation memory equal what the papers say."""

import json
import re

import pytest
import torch
import torch.distributed as dist

from minidist import launch
from minidist.__main__ import main
from minidist.data import token_ids
from minidist.examples.train import main as train_main
from minidist.grading import implementation
from minidist.models import GPT, GPTConfig, lm_loss
from minidist.pipeline.backward import backward_input
from minidist.pipeline.runtime import ActivationMemory, LiveActivations, PipelineRuntime
from minidist.pipeline.schedule import build, gpipe, one_f_one_b, simulate
from minidist.pipeline.stages import partition, rank_stages, split_gpt
from minidist.testing import adam, value_errors
from minidist.tour.pipeline import (CFG, GRAD_TOL, MICRO, REPEATS, SECONDS, SGD_TOL, bubble_checks,
                                    calibrated_timelines, closed_form_bubble, expected_in_flight, median_bubble,
                                    pipeline_vs_one_process, pipeline_vs_torch, timing_configs)

ADAM_LR = 1e-3
ADAM_TOL = 0.01 * ADAM_LR * 5   # README: 1% of the most Adam can move a weight in 5 steps


def configs(p: int) -> list[tuple[str, int, int]]:
    """Every schedule at m in {1, p - 1, p, 2p + 1} where it allows it (interleaving needs p | m)."""
    ms = sorted({1, p - 1, p, 2 * p + 1} - {0})
    return [(name, m, 1) for name in ("gpipe", "1f1b", "zb") for m in ms] + [("interleaved", p, 2)]


@pytest.mark.parametrize("p", [2, 3, 4])
def test_every_schedule_equals_one_process_with_the_formula_bytes_and_memory(p):
    T, C, V = CFG.block_size, CFG.n_embd, CFG.vocab_size
    results = launch(pipeline_vs_one_process, p, configs(p))
    for k, (name, m, v) in enumerate(configs(p)):
        rs = [r[k] for r in results]
        where = f"{name} p={p} m={m}"
        for r in rs:
            assert r["loss_diff"] < GRAD_TOL and r["grad_diff"] < GRAD_TOL, where
            assert r["weight_diff"] < SGD_TOL, where
            assert r["counted"], where
        assert torch.equal(rs[0]["tied"], rs[-1]["tied"]), where  # both copies of the tied embedding agree bitwise
        # Every micro-batch crosses each boundary between consecutive stages forward and backward, summed over ranks:
        assert sum(r["messages"] for r in rs) == 2 * m * (v * p - 1), where
        assert sum(r["bytes"] for r in rs) == 2 * m * (v * p - 1) * MICRO * T * C * 4, where
        # ... and the tied embedding's gradient goes once each way between the first and the last rank.
        assert [r["tied_messages"] for r in rs] == [1] + [0] * (p - 2) + [1], where
        assert sum(r["tied_bytes"] for r in rs) == 2 * V * C * 4, where
        # Sent tensors are freed on the way, when the message plan's clock says they arrived: at most one message
        # per rank at a time (three with interleaving), whatever m; held until the end of the step, it was 2m.
        for r in rs:
            assert r["peak_messages"] <= (3 if v > 1 else 1) * MICRO * T * C * 4, where
        # Activations held at once, measured from the tensors autograd saved until it freed them.
        assert [r["peak_in_flight"] for r in rs] == expected_in_flight(name, p, m, v), where
        for r in rs:
            per_chunk = {c: {b for (_, chunk), b in r["saved_bytes"].items() if chunk == c} for c in range(v)}
            assert all(len(sizes) == 1 for sizes in per_chunk.values()), where  # every micro-batch saves the same
            if v == 1:
                assert r["peak_bytes"] == r["peak_in_flight"] * per_chunk[0].pop(), where
    gpipe_first = next(r[k] for k, c in enumerate(configs(p)) if c == ("gpipe", 2 * p + 1, 1) for r in results[:1])
    ofob_first = next(r[k] for k, c in enumerate(configs(p)) if c == ("1f1b", 2 * p + 1, 1) for r in results[:1])
    assert gpipe_first["peak_in_flight"] == 2 * p + 1 and ofob_first["peak_in_flight"] == p   # m vs p on rank 0


def test_adam_and_a_single_rank_with_two_chunks():
    for r in launch(pipeline_vs_one_process, 3, [("1f1b", 4, 1), ("zb", 3, 1)], 5, adam(ADAM_LR)):
        assert all(c["weight_diff"] < ADAM_TOL for c in r)
    # p = 1 with two chunks: the activation passes between chunks without a message
    for c in launch(pipeline_vs_one_process, 1, [("interleaved", 3, 2), ("gpipe", 2, 1)])[0]:
        assert c["grad_diff"] < GRAD_TOL and c["weight_diff"] < SGD_TOL and c["messages"] == 0


@pytest.mark.parametrize("p", [2, 3])
def test_equals_torch_pipelining(p):
    torch_configs = [("gpipe", 2 * p, 1), ("1f1b", 2 * p, 1), ("interleaved", 2 * p, 2), ("zb", 2 * p, 1)]
    for per_rank in launch(pipeline_vs_torch, p, torch_configs):
        for r in per_rank:
            assert r["grad_diff"] < GRAD_TOL and r["loss_diff"] < GRAD_TOL, r


@pytest.mark.parametrize("p", [3])   # the tour checks 2, 3 and 4 (tests/test_tour.py)
def test_calibrated_bubbles_of_all_four_schedules(p):
    timing = timing_configs(p)
    per_rank = launch(calibrated_timelines, p, timing, SECONDS, REPEATS)
    measured = {c: median_bubble([r[k] for r in per_rank]) for k, c in enumerate(timing)}
    for name, m, v in timing:   # the papers' closed forms are what the schedules, played, give
        played = simulate(build(name, p, m, v), *SECONDS).bubble
        assert closed_form_bubble(name, p, m, v) == pytest.approx(float(played))
    # GPipe within 5% of (p-1)/(m+p-1); 1F1B, in its own order, within 5% of GPipe measured at the same m;
    # interleaving and ZB-H1 nearer their closed form than 1F1B's
    for run, reference, diff, tolerance in bubble_checks(p, measured):
        assert diff <= tolerance, (run, measured[run], reference)


@pytest.mark.exercise("partition")
def test_partition_by_hand():
    partition = implementation("partition")
    assert partition(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert partition(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert partition(5, 1) == [(0, 5)]
    assert partition(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]


@pytest.mark.exercise("partition")
def test_partition_refuses_fewer_blocks_than_stages():
    with pytest.raises(ValueError, match=r"\b2\b.*\b4\b"):   # the numbers of blocks and of stages, in that order
        implementation("partition")(2, 4)


@pytest.mark.parametrize("args, message", [((0, 1), "n_layers must be a positive integer, got 0"),
                                           ((3, 0), "n_stages must be a positive integer, got 0")])
def test_partition_refuses_non_positive_sizes(args, message):
    with pytest.raises(ValueError, match=message):
        partition(*args)


def test_stages_compose_to_the_model_and_refuse_too_few_blocks():
    torch.manual_seed(0)
    model = GPT(CFG)
    x = torch.randint(CFG.vocab_size, (2, CFG.block_size))
    for n in (1, 3, 8):
        h = x
        for stage in split_gpt(model, n):
            h = stage(h)
        assert torch.equal(h, model(x))
    with pytest.raises(ValueError, match="cannot cut 2 blocks into 4 pipeline stages"):
        rank_stages(GPT(GPTConfig(n_layer=2, n_embd=32, block_size=16)), 4, 0)


def test_backward_split_into_b_and_w_is_the_full_backward_bitwise():
    torch.manual_seed(0)
    stage = split_gpt(GPT(CFG), 4)[1]
    x = torch.randn(2, CFG.block_size, CFG.n_embd, requires_grad=True)
    grad = torch.randn(2, CFG.block_size, CFG.n_embd)
    stage(x).backward(grad)
    expected = [p.grad.clone() for p in stage.parameters()]
    stage.zero_grad(set_to_none=True)
    x2 = x.detach().requires_grad_()
    dx, weight_gradients = backward_input(stage(x2), grad, x2, list(stage.parameters()))
    assert torch.equal(dx, x.grad) and all(p.grad is None for p in stage.parameters())  # B: the input only
    weight_gradients()
    assert all(torch.equal(p.grad, g) for p, g in zip(stage.parameters(), expected))


def test_saved_activations_live_until_the_backward_that_frees_them():
    torch.manual_seed(0)
    stage, memory = split_gpt(GPT(CFG), 2)[1], ActivationMemory()
    for split in (False, True):
        x = torch.randn(2, CFG.block_size, CFG.n_embd, requires_grad=True)
        with LiveActivations(stage, memory, owner=0) as saved:
            loss = lm_loss(stage(x), torch.zeros(2, CFG.block_size, dtype=torch.long))
        assert memory.live == saved.bytes > 0
        if split:
            _, weight_gradients = backward_input(loss, None, x, list(stage.parameters()))
            assert memory.live == saved.bytes   # B keeps the graph: W still needs it
            weight_gradients()
            del loss, weight_gradients
        else:
            loss.backward()
        assert memory.live == 0 and memory.peak == saved.bytes and memory.peak_in_flight == 1


def runtime_errors():
    stages = rank_stages(GPT(CFG), 2, dist.get_rank())
    return value_errors(lambda: PipelineRuntime(stages, one_f_one_b(3, 2), CFG.n_embd),
                        lambda: PipelineRuntime(stages + stages, gpipe(2, 2), CFG.n_embd),
                        lambda: PipelineRuntime(stages, gpipe(2, 3), CFG.n_embd).step(
                            torch.zeros(4, 16, dtype=torch.long), torch.zeros(4, 16, dtype=torch.long)))


def test_runtime_refuses_a_schedule_that_does_not_fit():
    assert launch(runtime_errors, 2)[0] == [
        "the schedule is for 3 pipeline ranks, but the group has 2",
        "the schedule runs 1 chunk(s) per rank, but this rank was given 2",
        "a global batch of 4 does not cut into 3 equal micro-batches"]


def test_bench_pp_and_the_example_script(tmp_path, capsys):
    token_ids()  # the tokenizer is trained once, here: the forked ranks inherit it
    assert main(["bench", "pp", "--world-size", "2", "--steps", "2", "--warmup", "1", "--json",
                 str(tmp_path / "pp.json")]) == 0
    result = json.loads((tmp_path / "pp.json").read_text())
    assert result["minidist_s"] > 0 and result["reference_s"] > 0 and result["microbatches"] == 4
    assert main(["bench", "pp", "--world-size", "2", "--schedule", "dualpipev", "--steps", "1", "--warmup", "0",
                 "--json", str(tmp_path / "v.json")]) == 0     # against torch's ScheduleDualPipeV
    result = json.loads((tmp_path / "v.json").read_text())
    assert result["schedule"] == "dualpipev" and result["minidist_s"] > 0 and result["reference_s"] > 0
    assert train_main(["--strategy", "pp", "--schedule", "zb", "--microbatches", "4", "--steps", "30",
                       "--world-size", "2", "--quiet"]) == 0
    first, last, val, divergence = map(float, re.search(
        r"loss ([\d.]+) -> ([\d.]+), validation ([\d.]+), replicas differ by (\S+)", capsys.readouterr().out).groups())
    assert last < first - 0.5 and val < first - 0.5 and divergence == 0.0   # tied embedding copies agree


def syncs_per_step():
    """Device syncs a training step of a 2-rank 1F1B pipeline makes: plain, recording its timeline, and padded."""
    import minidist.pipeline.runtime as runtime
    calls, original = [], runtime.synchronize
    runtime.synchronize = lambda: calls.append(1)   # a no-op on the CPU: counted instead (on CUDA, a full sync)
    try:
        x = torch.zeros(4, CFG.block_size, dtype=torch.long)
        counts = []
        for kwargs in ({}, {"timeline": True}, {"action_seconds": (0.0, 0.0, 0.0)}):
            pipe = PipelineRuntime(rank_stages(GPT(CFG), 2, dist.get_rank()), one_f_one_b(2, 4), CFG.n_embd,
                                   **kwargs)
            calls.clear()
            pipe.step(x, x)
            counts.append((len(calls), len(pipe.timeline)))
        return counts
    finally:
        runtime.synchronize = original


def test_the_runtime_synchronizes_the_device_only_when_it_measures():
    """A sync after every action would stop compute from overlapping the point-to-point messages on a GPU."""
    for plain, timed, padded in launch(syncs_per_step, 2):
        assert plain == (0, 0)
        assert timed == (8, 8) and padded[1] == 8 and padded[0] >= 8   # 4 F + 4 B actions per rank
