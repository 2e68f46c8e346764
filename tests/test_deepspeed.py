"""DeepSpeed ZeRO stages 1, 2 and 3 as references, in one launch (DeepSpeed's start-up is the slow part)."""
from minidist.tour.zero import ADAM_TOL5, side_by_side_with_deepspeed


def test_each_stage_equals_deepspeed_zero():
    for diffs in side_by_side_with_deepspeed(2):
        assert set(diffs) == {1, 2, 3}
        assert all(d < ADAM_TOL5 for d in diffs.values()), diffs


def test_expert_parallel_equals_deepspeeds_moe_layer():
    """DeepSpeed's MoE layer (ep over gloo, top-2, dropless) and minidist's expert_parallel, trained side by side."""
    from minidist.launch import launch
    from minidist.tour.moe import ADAM_TOL, FWD_TOL
    from minidist.tour.moe_refs import deepspeed_against_minidist
    from minidist.tour.zero import import_deepspeed
    import_deepspeed()
    for r in launch(deepspeed_against_minidist, 2, 8):
        assert r["outputs"] <= FWD_TOL and r["grads"] <= FWD_TOL and r["weights"] <= ADAM_TOL, r


def test_bench_moe_prints_its_ratios(tmp_path, capsys):
    import json

    import pytest

    from minidist.__main__ import main
    from minidist.bench import bench_moe
    from minidist.bench.moe import moe_gpt
    from minidist.bench.suite import gpt_config
    from minidist.models import count_params
    assert main(["bench", "moe", "--steps", "1", "--warmup", "0", "--n-layer", "1", "--n-embd", "32", "--seq", "16",
                 "--batch-size", "2", "--json", str(tmp_path / "b.json")]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert all(0 < result[k] < 60 for k in ("minidist_s", "reference_s", "no_ep_s"))  # each variant ran a step
    assert result["ratio"] == result["minidist_s"] / result["reference_s"]
    assert result["no_ep_ratio"] == result["no_ep_s"] / result["reference_s"]   # variant / reference, as elsewhere
    for when, tolerance in (("first", 1e-5), ("last", 1e-4)):  # the same model, routing and training in all three
        losses = result["losses"][when]
        assert max(losses.values()) - min(losses.values()) <= tolerance * losses["reference"], (when, losses)
    assert result["params"] == count_params(moe_gpt(gpt_config(1, 32, 16)))  # the MoE GPT's, 8 experts per block
    assert (result["n_layer"], result["n_embd"], result["seq"]) == (1, 32, 16)
    assert f"ratio {result['ratio']:.3f}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="2 or more ranks dividing the 8 experts, got 3"):
        bench_moe(world_size=3)
    with pytest.raises(ValueError, match="n_embd 66 is not divisible by n_head 4"):
        bench_moe(n_embd=66)
