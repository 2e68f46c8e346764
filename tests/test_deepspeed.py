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
    assert main(["bench", "moe", "--steps", "1", "--warmup", "0", "--tokens", "64", "--json",
                 str(tmp_path / "b.json")]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert set(result["seconds"]) == {"minidist EP", "DeepSpeed MoE", "no EP (DP)"}
    assert all(0 < s < 60 for s in result["seconds"].values())
    assert result["ratio"] == result["seconds"]["minidist EP"] / result["seconds"]["DeepSpeed MoE"]
    assert f"minidist EP / DeepSpeed MoE: {result['ratio']:.3f}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="2 or more ranks dividing the 8 experts, got 3"):
        bench_moe(world_size=3)
    assert main(["bench", "moe", "--steps", "1", "--warmup", "0", "--tokens", "16", "--n-embd", "32", "--json",
                 str(tmp_path / "b.json")]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert (result["d_model"], result["d_ff"]) == (32, 64)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "moe", "--n-layer", "2"])
    assert exit_.value.code == 2
    assert "bench moe does not train one (it takes --n-embd)" in capsys.readouterr().err
