"""The tour: every row passes at several world sizes, bytes equal the formulas, and a failing row fails the run."""
import json
import subprocess
import sys

import pytest

from minidist import tour
from minidist.tour import KEYS, covers, make_row, run_tour


def test_tour_at_world_size_3_through_the_cli(tmp_path):
    path = tmp_path / "out.json"
    out = subprocess.run([sys.executable, "-m", "minidist", "tour", "--world-size", "3", "--json", str(path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(path.read_text())
    assert report["world_size"] == 3
    for row in report["rows"]:
        assert set(KEYS) <= set(row)
        assert row["passed"], row
        if row["comm_bytes_theory"] is not None:
            assert row["comm_bytes"] == row["comm_bytes_theory"]
        if row["state_bytes_per_rank_theory"] is not None:
            assert row["state_bytes_per_rank"] == row["state_bytes_per_rank_theory"]
    assert "checks passed on 3 ranks" in out.stdout


@pytest.mark.parametrize("world_size, only", [(1, "data parallel"), (4, "ring")])
def test_every_row_passes(world_size, only):
    # The whole tour runs once, at 3 ranks through the CLI above (3 divides none of the sizes: the hardest case);
    # here a subset at 1 and 4 ranks (each chapter's tests cover the other sizes, 2 included, of its own rows).
    rows = run_tour(world_size, progress=False, only=only)["rows"]
    assert len(rows) >= 3
    assert all(only in r["technique"].lower() for r in rows)
    assert all(r["passed"] for r in rows), [r for r in rows if not r["passed"]]


def test_only_runs_the_checks_that_can_match(monkeypatch):
    ran = []
    monkeypatch.setattr(tour, "CHECKS", [
        covers("alpha things")(lambda n: ran.append("a") or [make_row("alpha one", "r", max_abs_diff=0, tolerance=0),
                                                             make_row("beta two", "r", max_abs_diff=0, tolerance=0)]),
        covers("gamma")(lambda n: ran.append("g") or [])])
    rows = run_tour(2, progress=False, only="ALPHA")["rows"]
    assert ran == ["a"] and [r["technique"] for r in rows] == ["alpha one"]


def test_passed_is_derived_from_the_numbers():
    assert make_row("t", "r", max_abs_diff=1e-6, tolerance=1e-5)["passed"]
    assert not make_row("t", "r", max_abs_diff=1e-4, tolerance=1e-5)["passed"]
    assert not make_row("t", "r", comm_bytes=100, comm_bytes_theory=101)["passed"]
    assert not make_row("t", "r", state_bytes_per_rank=5, state_bytes_per_rank_theory=4)["passed"]
    assert not make_row("t", "r")["passed"]  # a row that shows nothing proves nothing


def failing_check(world_size):
    return [make_row("broken on purpose", "nothing", max_abs_diff=1.0, tolerance=0.0)]


def test_a_failing_row_makes_the_cli_exit_nonzero(monkeypatch, capsys):
    from minidist.__main__ import main
    monkeypatch.setattr(tour, "CHECKS", [failing_check])
    assert main(["tour", "--world-size", "2", "--quiet"]) == 1
    assert "FAILED: broken on purpose" in capsys.readouterr().out


@pytest.mark.parametrize("world_size", [0, 5])
def test_a_world_size_the_tour_is_not_sized_for_is_refused_by_name(world_size):
    from minidist.tour import run_tour
    with pytest.raises(ValueError, match=f"the tour runs on 1 to 4 ranks .* got world_size={world_size}"):
        run_tour(world_size, progress=False)
