"""The planner: every candidate mesh uses every GPU and respects the model's and the cluster's constraints (property
tests), one plan's memory by hand, ZeRO-2/3 never under a pipeline and ZeRO-2 paying a reduce-scatter per
micro-batch, groups straddling nodes on the slow link, the bubble is chapter 07's, the published configurations lie
in its search space, bad input is refused by name."""
import itertools
import json
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from minidist.planner import (PUBLISHED, SHAPES, Cluster, Plan, Shape, candidates, evaluate, inside_node,
                              memory_per_gpu, plan, shape_for, step_time)

KEYS = {"dp", "pp", "tp", "cp", "zero_stage", "microbatches", "checkpointing", "memory_per_gpu_gb", "step_seconds"}


def test_the_cli_prints_plans_best_first_that_fit_and_use_every_gpu(tmp_path):
    path = tmp_path / "plans.json"
    out = subprocess.run([sys.executable, "-m", "minidist", "plan", "--model", "llama3-70b", "--gpus", "64",
                          "--gpu-memory-gb", "80", "--global-batch", "128", "--gpus-per-node", "4",
                          "--json", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    plans = json.loads(path.read_text())["plans"]
    assert len(plans) == 10 and all(KEYS <= set(p) for p in plans)
    assert [p["step_seconds"] for p in plans] == sorted(p["step_seconds"] for p in plans)       # best first
    for p in plans:
        assert p["dp"] * p["pp"] * p["tp"] * p["cp"] == 64
        assert p["dp"] * p["microbatches"] * p["micro_batch_size"] == 128
        assert 4 % p["tp"] == 0 and p["memory_per_gpu_gb"] <= 80                                 # within a node
    assert f"{plans[0]['step_seconds']:.2f}" in out.stdout


def meshes(gpus: int, gpus_per_node: int, shape: Shape, global_batch: int) -> set:
    """Every (dp, pp, cp, tp) the constraints allow, by brute force over all sizes up to the GPU count."""
    sizes = range(1, gpus + 1)
    return {(gpus // (pp * cp * tp), pp, cp, tp) for pp, cp, tp in itertools.product(sizes, sizes, sizes)
            if gpus % (pp * cp * tp) == 0 and gpus_per_node % tp == 0 and shape.heads % tp == 0
            and (shape.kv_heads % tp == 0 or tp % shape.kv_heads == 0) and pp <= shape.layers
            and (cp == 1 or shape.seq % (2 * cp) == 0) and global_batch % (gpus // (pp * cp * tp)) == 0}


@settings(max_examples=24, deadline=None)
@given(gpus=st.sampled_from([6, 12, 24, 48]), gpus_per_node=st.sampled_from([4, 8]),
       model=st.sampled_from(["llama3-8b", "gpt3-175b", "small"]), global_batch=st.sampled_from([12, 48, 96]))
def test_every_candidate_uses_every_gpu_and_respects_the_constraints(gpus, gpus_per_node, model, global_batch):
    shape = SHAPES.get(model) or Shape(6, 768, 12, 4, 3072, 50257, 1536)
    found = list(candidates(shape.params(), shape, Cluster(gpus, 80, gpus_per_node=gpus_per_node), global_batch))
    for c in found:
        assert c.dp * c.pp * c.cp * c.tp == gpus
        assert gpus_per_node % c.tp == 0 and shape.heads % c.tp == 0
        assert c.cp == 1 or shape.seq % (2 * c.cp) == 0
        assert c.dp * c.microbatches * c.micro_batch_size == global_batch
        assert c.pp == 1 or c.zero_stage in (0, 1)                 # no ZeRO-2/3 under a pipeline
        if c.virtual_stages > 1:
            assert c.microbatches % c.pp == 0 and math.ceil(shape.layers / c.pp) % c.virtual_stages == 0
    assert {(c.dp, c.pp, c.cp, c.tp) for c in found} == meshes(gpus, gpus_per_node, shape, global_batch)


def test_one_plans_memory_by_hand():
    # 5 layers of 2h^2 + 2h^2 (attention, 4 heads of 4 key-value heads) + 2 h 4h (MLP) = 49,152 parameters each,
    # h = 64, vocabulary 100: P = 5 x 49,152 + 2 x 100 x 64 = 258,560. pp = 2: the largest stage holds 3 layers and
    # the embedding (or the output layer): 153,856 parameters, 76,928 per tp rank.
    shape = Shape(layers=5, hidden=64, heads=4, kv_heads=4, ffn=256, vocab=100, seq=16)
    assert shape.params() == 258_560
    p = Plan(dp=2, pp=2, tp=2, cp=1, zero_stage=1, microbatches=4, checkpointing=True, micro_batch_size=1)
    states = 2 * 76_928 + 2 * 76_928 + 12 * 76_928 / 2      # 16-bit weights, 16-bit gradients, Adam's 12 B over dp
    checkpoint = 2 * 16 * 1 * 64 / 2                        # a layer's input: 2 s b h bytes over tp
    layer = 2 * 16 * 16 * 1 * 64 / 2                        # a layer's activations: 16 s b h values, 16-bit, over tp
    first = 3 * 2 * checkpoint + layer                      # 1F1B: min(pp, m) = 2 micro-batches in flight
    last = 3 * 1 * checkpoint + layer + 16 * 100 / 2 * (2 + 4)  # 1 micro-batch in flight, and the logits
    assert last > first
    assert memory_per_gpu(p, shape.params(), shape, Cluster(4, 80, reserve_gb=0)) == states + last == 793_536


def test_zero_2_pays_a_reduce_scatter_per_micro_batch_and_is_never_planned_under_a_pipeline():
    shape, slow = SHAPES["llama3-8b"], Cluster(64, 80, inter_node_gbps=5)
    plans = plan(shape.params(), Cluster(64, 80), shape, 256, top=10 ** 6)
    assert {p.zero_stage for p in plans if p.pp > 1} == {0, 1} and 2 in {p.zero_stage for p in plans}
    for m, same in ((1, True), (8, False)):
        z1, z2 = (step_time(Plan(dp=64, pp=1, tp=1, cp=1, zero_stage=z, microbatches=m, checkpointing=True,
                                 micro_batch_size=1), shape.params(), shape, slow)[0] for z in (1, 2))
        assert (z1 == pytest.approx(z2, rel=1e-12)) if same else z2 > 1.5 * z1


def test_a_group_straddling_two_nodes_is_not_inside_one():
    eight = Cluster(48, 80, gpus_per_node=8)
    assert inside_node(eight, 2, 4) and inside_node(eight, 8) and not inside_node(eight, 2, 3)   # 6 ranks: 0-5, 6-11
    assert not inside_node(eight, 2, 8) and inside_node(Cluster(6, 80), 2, 3)                    # 6 GPUs: one node


@pytest.mark.parametrize("v", [1, 2, 4])
def test_with_free_communication_the_only_loss_is_chapter_07s_bubble(v):
    free = Cluster(64, 80, intra_node_gbps=1e12, inter_node_gbps=1e12, alpha_us=0)
    p = evaluate(Plan(dp=2, pp=4, tp=4, cp=2, zero_stage=1, microbatches=8, checkpointing=False,
                      micro_batch_size=8, virtual_stages=v), 70e9, SHAPES["llama3-70b"], free)
    assert p.comm_share < 1e-6
    assert p.bubble_share == pytest.approx((4 - 1) / (v * 8 + 4 - 1), rel=1e-5)     # (p-1)/(vm+p-1)


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
    with pytest.raises(ValueError, match=r"mfu .* in \(0, 1\], got 1.5"):
        plan(1e9, Cluster(8, 80, mfu=1.5), shape_for(1e9))
    from minidist.__main__ import main
    for argv, message in ((["--gpus", "8", "--gpu-memory-gb", "80"], "give --params P, or --model NAME"),
                          (["--params", "1e9", "--gpus", "0", "--gpu-memory-gb", "80"],
                           "--gpus: 0 is not a positive integer"),
                          (["--params", "1e9", "--gpus", "8", "--gpu-memory-gb", "80", "--mfu", "1.5"],
                           "--mfu: 1.5 is not in (0, 1]")):
        with pytest.raises(SystemExit) as exit:
            main(["plan", *argv])
        assert exit.value.code == 2 and message in capsys.readouterr().err


def test_plan_help_shows_the_defaults_the_units_and_the_columns(capsys):
    from minidist.__main__ import main
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("sequences per optimizer step (default: 1024)", "(default: 0.5)", "GB of 1e9 bytes",
                  "replaces the count of its shape", "m = micro-batches per replica", "bubble = share idle"):
        assert words in text
