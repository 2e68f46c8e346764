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
