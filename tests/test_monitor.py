"""Training telemetry: straggler detection (an exercise), comm vs compute from the flight recorder, counted bytes,
the Chrome trace and JSON lines exports, and the example script's --monitor."""
import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.distributed as dist

from minidist import comm, launch
from minidist.grading import implementation
from minidist.monitor import Monitor, busy_seconds, chrome_trace, format_summary, summary
from minidist.comm import ring_bytes
from minidist.tour.monitoring import DELAY, monitored_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.exercise("find_stragglers")
def test_find_stragglers_by_hand():
    find = implementation("find_stragglers")
    assert find([1.0, 1.1, 0.9, 3.0]) == [3]                          # the default factor: 2
    assert find([1.0, 1.0, 3.0, 3.2]) == [2, 3]                       # two: each against the median of the others
    assert find([1.0, 1.2, 0.9, 1.1]) == [] and find([1.0, 1.9]) == []
    assert find([1.0, 2.0], factor=1.5) == [1]                        # two ranks: each compared with the other
    assert find([5.0]) == []                                          # nobody to compare with
    assert find([1.0, 3.0, 1.9], factor=1.5) == [1]                   # others of rank 1: 1.0 and 1.9, median 1.45


@pytest.mark.exercise("find_stragglers")
def test_find_stragglers_refuses_a_factor_that_names_everybody():
    find = implementation("find_stragglers")
    assert find([1.0, 1.0, 1.6], factor=1.5) == [2]
    with pytest.raises(ValueError, match="factor"):
        find([1.0, 2.0], factor=1.0)


def test_busy_seconds_counts_overlaps_once():
    assert busy_seconds([]) == 0.0
    assert busy_seconds([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == 3.0
    assert busy_seconds([(2.0, 3.0), (0.0, 5.0)]) == 5.0


@pytest.mark.exercise("busy_seconds")
@pytest.mark.parametrize("intervals, expected", [
    ([], 0.0), ([(1.0, 1.0)], 0.0), ([(0.0, 1.0), (2.0, 3.5)], 2.5),          # none, empty, disjoint
    ([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)], 3.0),                               # two overlap, one apart
    ([(0.0, 5.0), (1.0, 2.0), (3.0, 4.0), (4.5, 6.0)], 6.0),                    # nested inside a long one
    ([(2.0, 3.0), (0.0, 5.0)], 5.0), ([(3.0, 4.0), (1.0, 2.0), (2.0, 3.0)], 3.0),  # unsorted, touching
    ([(10.0, 10.25), (10.125, 10.5), (10.0, 10.5)], 0.5),                       # same start, different ends
])
def test_busy_seconds_by_hand(intervals, expected):
    assert implementation("busy_seconds")(intervals) == expected


@pytest.mark.exercise("busy_seconds")
def test_busy_seconds_against_counting_covered_cells():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        ends = torch.randint(0, 30, (int(torch.randint(1, 8, (1,), generator=g)), 2), generator=g).sort(1).values
        intervals = [(float(a), float(b)) for a, b in ends.tolist()]
        covered = {t for a, b in ends.tolist() for t in range(a, b)}   # unit cell [t, t + 1) inside some interval
        assert implementation("busy_seconds")(intervals) == len(covered), intervals


def test_the_rank_slowed_inside_backward_is_named_and_the_bytes_are_counted():
    """The slow rank sleeps in its first block's backward, while the later buckets' all-reduces are in flight: part
    of its delay counts as communication time, and it must still be named."""
    n, slow, steps = 3, 1, 6
    results = launch(monitored_training, n, slow, DELAY, steps, "backward")
    records = results[0]["records"]
    assert records == results[2]["records"] and len(records) == n * steps  # every rank holds every rank's records
    info = summary(records)
    assert info["stragglers"] == [slow], format_summary(info)
    assert info["ranks"][slow]["seconds"] >= DELAY                        # the delay is in the step, somewhere
    formula = ring_bytes("all_reduce", 4 * results[0]["psi"], n)          # 2(N-1)/N x 4 psi per rank and step
    for step in range(steps):
        mine = [r for r in records if r["step"] == step]
        assert all(r["bytes_counted"] and r["collectives"] > 0 for r in mine)
        assert sum(r["bytes_sent"] for r in mine) == n * formula          # counted: the sum over ranks is exact
    for r in records:
        assert 0 < r["comm_seconds"] <= r["seconds"] and r["tokens_per_second"] == r["tokens"] / r["seconds"]
        assert all(r["start"] <= t0 <= t1 <= r["start"] + r["seconds"] for _, t0, t1, _, _ in r["events"])
    trace = chrome_trace(records)["traceEvents"]
    assert {e["pid"] for e in trace} == set(range(n))                     # one track per rank
    assert sum(e["ph"] == "X" and e["cat"] == "step" for e in trace) == n * steps
    assert sum(e["ph"] == "X" and e["cat"] == "comm" for e in trace) == sum(r["collectives"] for r in records)


def test_the_example_script_writes_its_telemetry(tmp_path):
    path = tmp_path / "run.jsonl"
    out = subprocess.run([sys.executable, "-m", "minidist.examples.train", "--strategy", "ddp", "--world-size", "2",
                          "--steps", "3", "--batch-size", "4", "--block-size", "16", "--quiet", "--monitor", str(path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted((r["rank"], r["step"]) for r in lines) == [(r, s) for r in (0, 1) for s in range(3)]
    assert all(r["bytes_sent"] > 0 and r["tokens"] == 4 * 16 // 2 for r in lines)  # this rank's half of the batch
    assert all(r["collectives"] > 0 and not r["bytes_counted"] for r in lines)  # DataParallel's, on gloo: modelled
    trace = json.loads((tmp_path / "run.trace.json").read_text())
    assert {e["pid"] for e in trace["traceEvents"]} == {0, 1}
    printed = format_summary(summary(lines))                           # the summary of the records it wrote
    assert printed in out.stdout and "* modelled bytes" in printed and "loss" in out.stdout
    assert "no collective" not in out.stderr + out.stdout


def _uneven_steps(raw: bool) -> dict:
    """Three monitored steps on two ranks: a raw torch all-reduce (invisible), minidist's, and a prefetch: an
    all-reduce started before the step (rank 1 joins it 0.2 s late) and waited inside it."""
    x, monitor = torch.ones(1000), Monitor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with monitor.step():
            dist.all_reduce(x) if raw else comm.all_reduce_sum(x)
        if dist.get_rank() == 1:
            time.sleep(0.2)
        work = comm.all_reduce_sum(x, async_op=True)
        with monitor.step():
            work.wait()
    return {"warnings": [str(w.message) for w in caught], "records": monitor.gather()}


def test_steps_without_collectives_are_flagged_and_prefetches_count():
    raw, seen = launch(_uneven_steps, 2, True)[0], launch(_uneven_steps, 2, False)[0]
    assert any("recorded no collective" in w for w in raw["warnings"])
    assert not any("recorded no collective" in w for w in seen["warnings"])
    assert "warning: ranks [0, 1] had steps with no collective" in format_summary(summary(raw["records"]))
    assert [r["collectives"] for r in seen["records"] if r["rank"] == 0] == [1, 1]
    prefetch = [r for r in seen["records"] if r["rank"] == 0][1]      # rank 0 waited for rank 1 in it
    assert prefetch["events"][0][1] == prefetch["start"] and prefetch["comm_seconds"] > 0.1


def test_a_few_milliseconds_more_is_noise_not_a_straggler():
    def records(computes):
        return [{"rank": r, "seconds": 0.1, "compute_seconds": c, "comm_seconds": 0.1 - c, "tokens_per_second": 1.0,
                 "bytes_sent": 0.0} for r, c in enumerate(computes)]
    assert summary(records([0.002, 0.002, 0.005]))["stragglers"] == []      # 2.5 times, but 3 ms
    assert summary(records([0.002, 0.002, 0.05]))["stragglers"] == [2]
