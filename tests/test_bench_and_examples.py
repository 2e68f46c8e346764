"""The DDP benchmark's JSON, and the example training script under torchrun and under launch."""
import json
import os
import re
import subprocess
import sys

import pytest

from minidist.bench import bench_ddp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_ddp_reports_every_variant(tmp_path):
    out = subprocess.run([sys.executable, "-m", "minidist", "bench", "ddp", "--world-size", "2", "--steps", "3",
                          "--warmup", "1", "--json", str(tmp_path / "b.json")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "b.json").read_text())
    for key in ("minidist_s", "reference_s", "bucketed_s", "naive_s"):
        assert result[key] > 0
    assert result["ratio"] == result["minidist_s"] / result["reference_s"]
    assert "ratio" in out.stdout and "torch DDP" in out.stdout


def test_bench_rejects_nonsense():
    with pytest.raises(ValueError, match="need steps >= 1"):
        bench_ddp(steps=0)


def test_bench_flight_counts_one_recorded_operation_per_bucket_at_least():
    from minidist.bench import bench_flight
    from minidist.data_parallel.buckets import MiB, layout
    from minidist.models import GPT
    result = bench_flight(2, steps=2, warmup=0, bucket_cap_mb=0.02)
    buckets, _ = layout([p for p in GPT().parameters() if p.requires_grad], int(0.02 * MiB))
    assert result["entries_per_step"] >= len(buckets) > 3, (result, len(buckets))
    assert 0 < result["entry_s"] < 1e-3 and 0 < result["fraction_of_step"] < 0.05, result


def run_example(*args, torchrun=False):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun
           else [sys.executable]) + ["-m", "minidist.examples.train", *args]
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def final_line(out):
    match = re.search(r"loss ([\d.]+) -> ([\d.]+), validation ([\d.]+), replicas differ by (\S+)", out.stdout)
    assert match, out.stdout + out.stderr[-2000:]
    return [float(v) for v in match.groups()]


def test_example_trains_under_torchrun():
    out = run_example("--strategy", "ddp", "--steps", "40", "--log-every", "10", torchrun=True)
    assert out.returncode == 0, out.stderr[-3000:]
    first, last, val, divergence = final_line(out)
    assert last < first - 0.5 and divergence == 0.0
    assert "step    10  loss" in out.stdout  # the loss log of rank 0


def test_example_without_gradient_averaging_lets_replicas_drift():
    out = run_example("--strategy", "none", "--steps", "10", "--world-size", "2", "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    assert final_line(out)[3] > 0


def test_example_rejects_a_batch_that_does_not_split():
    out = run_example("--strategy", "ddp", "--steps", "2", "--world-size", "3", "--batch-size", "32", "--quiet")
    assert out.returncode != 0
    assert "--batch-size 32 is not divisible by the world size 3" in out.stderr  # refused before any rank starts


def test_bench_buckets_refuses_nonsense():
    from minidist.bench import bench_buckets
    with pytest.raises(ValueError, match="positive bucket sizes"):
        bench_buckets(caps_mb=(0.1, 0.0))
    with pytest.raises(ValueError, match="bandwidth must be positive"):
        bench_buckets(bandwidth=-1.0)


@pytest.mark.parametrize("argv, message", [
    (["tp", "--world-size", "3"], "blocks.0.attn: 4 heads are not divisible by tensor-parallel size 3"),
    (["all", "--world-size", "3"], "blocks.0.attn: 4 heads are not divisible by tensor-parallel size 3"),
    (["pp", "--n-layer", "1"], "cannot cut 1 blocks into 2 pipeline stages"),
    (["all", "--n-layer", "1"], "cannot cut 1 blocks into 2 pipeline stages"),
    (["zero", "--n-embd", "66"], "n_embd 66 is not divisible by n_head 4"),
    (["pp", "--batch-size", "6"], "4 micro-batches do not divide the batch of 6"),
    (["pp", "--microbatches", "1"], "needs micro-batches >= ranks: got 1 micro-batches, 2 ranks"),
    (["serve", "--seq", "32"], "--seq sets the GPT of the benchmarks all, ddp"),
])
def test_bench_refuses_a_shape_by_name_before_any_rank_starts(argv, message, capsys, monkeypatch):
    from minidist.__main__ import main
    for module in ("ddp", "tp", "pp", "sharded"):
        monkeypatch.setattr(f"minidist.bench.{module}.launch", lambda *a, **k: pytest.fail("a rank was started"))
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *argv, "--steps", "1"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_bench_all_writes_one_row_per_registered_benchmark_with_memory_for_zero_and_fsdp(tmp_path, capsys):
    from minidist.__main__ import main
    from minidist.bench.suite import BENCHES
    path = tmp_path / "all.json"
    assert main(["bench", "all", "--n-layer", "2", "--n-embd", "32", "--seq", "16", "--batch-size", "4",
                 "--steps", "1", "--warmup", "0", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [r["bench"] for r in rows] == list(BENCHES)
    for r in rows:
        assert r["technique"] == BENCHES[r["bench"]].technique and r["world_size"] == 2
        assert r["ratio"] == pytest.approx(r["minidist_ms"] / r["reference_ms"]) and r["ratio"] > 0
        assert r["model"].startswith("GPT 2 x 32, sequence 16" if r["bench"] != "moe" else "MoE GPT 2 x 32, sequence 16")
        assert ("minidist_held_bytes" in r) == (r["bench"] in ("zero", "fsdp"))
    assert rows[0]["params"] == 512 * 32 + 16 * 32 + 2 * (12 * 32 * 32 + 13 * 32) + 2 * 32  # tied head counted once
    zero, fsdp = rows[3], rows[4]
    psi = rows[0]["params"]  # fp32 AdamW: 4 bytes of parameter, 4 of gradient, 8 of moments per parameter
    # ZeRO-1 keeps whole parameters and gradients and half the moments (torch's partition, by whole tensors, is a
    # little uneven); FSDP shards all three, 16 psi / 2 (the dim-0 rows here split evenly: no padding)
    assert 12 * psi <= zero["reference_held_bytes"] < 13 * psi
    for held in (fsdp["minidist_held_bytes"], fsdp["reference_held_bytes"]):
        assert 8 * psi <= held < 8.1 * psi
    assert "ZeroOptimizer stage 1" in capsys.readouterr().out


def test_bench_tp_json_at_a_chosen_size(tmp_path):
    from minidist.__main__ import main
    path = tmp_path / "tp.json"
    assert main(["bench", "tp", "--world-size", "2", "--n-layer", "1", "--n-embd", "16", "--seq", "8",
                 "--batch-size", "2", "--steps", "1", "--warmup", "0", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert (result["n_layer"], result["n_embd"], result["seq"]) == (1, 16, 8) and result["ratio"] > 0


@pytest.mark.parametrize("shape", [{}, {"n_layer": 8, "n_embd": 512, "seq": 128}, {"n_layer": 3, "n_embd": 40}])
def test_bench_ddps_default_bucket_cuts_two_buckets_or_torchs_25_mib(shape):
    """Half the gradients, rounded up: two buckets (not a third of a few KiB left by rounding down), at most 25 MiB."""
    import torch

    from minidist.bench.ddp import default_bucket_mb
    from minidist.bench.suite import gpt_config
    from minidist.data_parallel.buckets import MiB, layout
    from minidist.models import GPT
    with torch.device("meta"):
        params = [p for p in GPT(gpt_config(**shape)).parameters() if p.requires_grad]
    n = sum(p.numel() for p in {id(p): p for p in params}.values())
    cap = default_bucket_mb(n)
    buckets, _ = layout(params, int(cap * MiB))
    expected = 2 if n * 4 / MiB <= 50 else -(-n * 4 // (25 * MiB))
    assert len(buckets) == expected, (cap, [b.stop - b.start for b in buckets])
