"""The planner: what it prints fits its own memory model, tp stays inside a node, plans come best first, the bubble
is chapter 07's, the published configurations lie in its search space, bad input is refused by name."""
import json
import subprocess
import sys

import pytest

from minidist.memory import GB, zero_state_bytes
from minidist.planner import (PUBLISHED, SHAPES, Cluster, Plan, candidates, evaluate, memory_per_gpu, plan,
                              shape_for)

KEYS = {"dp", "pp", "tp", "cp", "zero_stage", "microbatches", "checkpointing", "memory_per_gpu_gb", "step_seconds"}


def test_the_cli_writes_plans_that_fit_their_own_memory_model(tmp_path):
    path = tmp_path / "plans.json"
    out = subprocess.run([sys.executable, "-m", "minidist", "plan", "--params", "70e9", "--model", "llama3-70b",
                          "--gpus", "64", "--gpu-memory-gb", "80", "--global-batch", "128", "--gpus-per-node", "4",
                          "--json", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    plans = json.loads(path.read_text())["plans"]
    assert len(plans) == 10 and all(KEYS <= set(p) for p in plans)
    assert [p["step_seconds"] for p in plans] == sorted(p["step_seconds"] for p in plans)       # best first
    shape, cluster = SHAPES["llama3-70b"], Cluster(64, 80, gpus_per_node=4)
    for p in plans:
        assert p["dp"] * p["pp"] * p["tp"] * p["cp"] == 64
        assert p["dp"] * p["microbatches"] * p["micro_batch_size"] == 128
        assert p["tp"] <= 4 and 4 % p["tp"] == 0                                                  # within a node
        recomputed = memory_per_gpu(Plan(**p), 70e9, shape, cluster) / GB
        assert recomputed == pytest.approx(p["memory_per_gpu_gb"], rel=1e-12) and recomputed <= 80
    assert f"{plans[0]['step_seconds']:.2f}" in out.stdout


@pytest.mark.parametrize("gpus_per_node", [2, 4, 8])
def test_tensor_parallelism_never_crosses_a_node(gpus_per_node):
    shape = SHAPES["llama3-8b"]
    tps = {c.tp for c in candidates(8e9, shape, Cluster(64, 80, gpus_per_node=gpus_per_node), 256)}
    assert tps == {t for t in (1, 2, 4, 8) if t <= gpus_per_node}


def test_less_memory_never_makes_the_best_plan_faster():
    shape, best = SHAPES["llama3-70b"], {}
    for memory in (200, 80, 40):
        best[memory] = plan(70e9, Cluster(64, memory), shape, 128, top=1)[0]
    assert best[200].step_seconds <= best[80].step_seconds <= best[40].step_seconds
    assert all(p.memory_per_gpu_gb <= m for m, p in best.items())


@pytest.mark.parametrize("v", [1, 2, 4])
def test_with_free_communication_the_only_loss_is_chapter_07s_bubble(v):
    free = Cluster(64, 80, intra_node_gbps=1e12, inter_node_gbps=1e12, alpha_us=0)
    p = evaluate(Plan(dp=2, pp=4, tp=4, cp=2, zero_stage=1, microbatches=8, checkpointing=False,
                      micro_batch_size=8, virtual_stages=v), 70e9, SHAPES["llama3-70b"], free)
    assert p.comm_share < 1e-6
    assert p.bubble_share == pytest.approx((4 - 1) / (v * 8 + 4 - 1), rel=1e-5)     # (p-1)/(vm+p-1)


def test_model_states_are_chapter_00s_formula_over_the_model_parallel_shard():
    # 7.5B parameters, no model parallelism, 64 data-parallel ranks, ZeRO-3: the ZeRO paper's 1.875 GB of states.
    cluster, shape = Cluster(64, 80, reserve_gb=0), shape_for(7.5e9)
    p = Plan(dp=64, pp=1, tp=1, cp=1, zero_stage=3, microbatches=1, checkpointing=True, micro_batch_size=1)
    states = zero_state_bytes(7.5e9, 64, 3).total
    assert states == 1.875e9
    assert memory_per_gpu(p, 7.5e9, shape, cluster) > states                  # plus activations and logits


@pytest.mark.parametrize("model, gpus, batch, published, source", PUBLISHED)
def test_the_published_configurations_are_in_the_search_space(model, gpus, batch, published, source):
    shape = SHAPES[model]
    found = [c for c in candidates(shape.params(), shape, Cluster(gpus, 80), batch)
             if all(getattr(c, k) == v for k, v in published.items())]
    assert found, f"{model}: {published} ({source}) is not a candidate"


def test_bad_input_is_refused_by_name(capsys):
    with pytest.raises(ValueError, match="no plan fits a 7e\\+12-parameter model on 8 GPUs of 80 GB"):
        plan(7e12, Cluster(8, 80))
    with pytest.raises(ValueError, match="no plan fits .*'tp': 16"):
        plan(1e9, Cluster(64, 80), where={"tp": 16})
    with pytest.raises(ValueError, match="12 GPUs are not whole nodes of 8"):
        plan(1e9, Cluster(12, 80))
    from minidist.__main__ import main
    for argv, message in ((["--gpus", "8", "--gpu-memory-gb", "80"], "give --params P, or --model NAME"),
                          (["--params", "1e9", "--gpus", "0", "--gpu-memory-gb", "80"],
                           "--gpus: 0 is not a positive integer")):
        with pytest.raises(SystemExit) as exit:
            main(["plan", *argv])
        assert exit.value.code == 2 and message in capsys.readouterr().err
