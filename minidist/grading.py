"""Grading: the tests that check minidist also grade the learners' exercises, through one adapter seam.

    python -m minidist grade [PATH] [--solutions] [--only NAME ...] [--extra-tests DIR] [--first-failure] [--json PATH]

A test that grades exercise X is marked `@pytest.mark.exercise("X")` and gets the function under test from
`implementation("X")`: minidist's own function normally, or, when MINIDIST_EXERCISES names a folder, the learner's
function from that folder's chNN_*.py. The grader runs those tests once in a pytest subprocess with this module as a
plugin, and scores each exercise by the share of its tests that pass.

A hang costs one exercise, not the run: each test has a time limit (pytest-timeout), collectives give up sooner
(MINIDIST_TIMEOUT), and after one test of an exercise times out (either way) its remaining tests are skipped as
failed.
"""
import functools
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import types
from pathlib import Path

from .exercises import ROOT, registry

ENV = "MINIDIST_EXERCISES"
TESTS = ROOT / "tests"


@functools.cache
def _exercises() -> dict:
    return {e.name: e for e in registry()}


@functools.cache
def _submission(directory: str, chapter: str) -> types.ModuleType:
    path = Path(directory) / f"{chapter}.py"
    if not path.exists():
        raise ImportError(f"the submission has no {path.name} in {directory}")
    spec = importlib.util.spec_from_file_location(f"submission_{chapter}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _package_function(exercise):
    return getattr(importlib.import_module(f"minidist.{exercise.module}"), exercise.function)


def implementation(name: str):
    """The function that exercise `name` asks for: the learner's (MINIDIST_EXERCISES set) or minidist's own.

    A learner's function runs with every *other* exercise function of its chapter taken from minidist, so each
    exercise is graded on its own (a broken reduce-scatter does not also fail the all-reduce built on it).
    """
    if name not in _exercises():
        raise KeyError(f"no exercise named {name!r}; the exercises are {sorted(_exercises())}")
    exercise = _exercises()[name]
    directory = os.environ.get(ENV)
    if not directory:
        return _package_function(exercise)
    fn = getattr(_submission(directory, exercise.chapter), exercise.function, None)
    if fn is None:
        raise AttributeError(f"{exercise.chapter}.py has no function {exercise.function}")
    others = {e.function: _package_function(e) for e in _exercises().values()
              if e.chapter == exercise.chapter and e.function != exercise.function}
    isolated = types.FunctionType(fn.__code__, {**fn.__globals__, **others}, fn.__name__, fn.__defaults__,
                                  fn.__closure__)
    isolated.__kwdefaults__ = fn.__kwdefaults__
    return isolated


# The pytest plugin (loaded by the grader with `-p minidist.grading`).

# A test that ran out of time: pytest-timeout's "Failed: Timeout (>5.0s)", a collective that waited MINIDIST_TIMEOUT
# for a peer (gloo's "Timed out waiting 5000ms for recv operation"), a rank stuck after the others returned (launch).
# The exercise's remaining tests would most likely wait as long again: they are skipped as failed.
TIMEOUT_SIGNS = ("Timeout (>", "Timed out waiting", "stuck outside any collective?")
_results: dict[str, dict] = {}   # exercise -> {"passed", "done", "total", "timed_out", "failed"}
_owner: dict[str, str] = {}      # test node id -> exercise
_report_path: list[str] = []     # where to write _results after every test (so a crash loses only what is running)


def _exercise_of(item):
    marker = item.get_closest_marker("exercise")
    return marker.args[0] if marker else None


def pytest_addoption(parser):
    group = parser.getgroup("minidist grading")
    group.addoption("--exercise", action="append", default=[], help="run only the tests of this exercise")
    group.addoption("--grade-report", default=None, help="write per-exercise results to this JSON file")
    group.addoption("--first-failure", action="store_true",
                    help="skip an exercise's remaining tests after its first failure (they count as failed)")


def pytest_configure(config):
    config.addinivalue_line("markers", "exercise(name): the test grades exercise `name`")
    if config.getoption("--grade-report", default=None):
        _report_path.append(config.getoption("--grade-report"))


def pytest_collection_modifyitems(config, items):
    wanted = set(config.getoption("--exercise"))
    keep = [item for item in items if _exercise_of(item) and (not wanted or _exercise_of(item) in wanted)]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep
    for item in keep:
        _owner[item.nodeid] = _exercise_of(item)
        _results.setdefault(_exercise_of(item), {"passed": 0, "done": 0, "total": 0, "timed_out": False,
                                                 "failed": False})["total"] += 1
    _write_report()


def pytest_runtest_setup(item):
    result = _results.get(_exercise_of(item), {})
    if result.get("timed_out"):
        import pytest
        pytest.skip("an earlier test of this exercise timed out")
    if result.get("failed") and item.config.getoption("--first-failure"):
        import pytest
        pytest.skip("an earlier test of this exercise failed (--first-failure)")


def pytest_runtest_logreport(report):
    exercise = _owner.get(report.nodeid)
    if exercise is None:
        return
    if report.when == "call" and report.passed:
        _results[exercise]["passed"] += 1
    if report.failed:
        _results[exercise]["failed"] = True
    if report.failed and any(sign in str(report.longrepr) for sign in TIMEOUT_SIGNS):
        _results[exercise]["timed_out"] = True
    if report.when == "teardown":
        _results[exercise]["done"] += 1
        _write_report()


def _write_report():
    if _report_path:
        Path(_report_path[0]).write_text(json.dumps(_results))


# The grader.

def _run_pytest(names, test_files, directory, timeout, deadline, problems: list, first_failure=False) -> dict:
    """One pytest run over the exercises `names`: the results of every exercise whose tests all finished.

    A crash or an overrun keeps what had finished; pytest's own output is added to `problems` when it went wrong.
    """
    with tempfile.TemporaryDirectory() as tmp:
        report, log = Path(tmp) / "report.json", Path(tmp) / "pytest.log"
        cmd = [sys.executable, "-m", "pytest", "-p", "minidist.grading", "-p", "no:cacheprovider", "-o", "addopts=",
               "-q", f"--timeout={timeout}", f"--grade-report={report}", *[f"--exercise={n}" for n in names],
               *["--first-failure"] * first_failure, *map(str, test_files)]
        env = dict(os.environ, **{ENV: str(directory), "MINIDIST_TIMEOUT": str(max(5, timeout // 4))})
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                proc.wait(timeout=deadline)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole session: pytest and any ranks it started
                proc.wait()
        results = json.loads(report.read_text()) if report.exists() else {}
        finished = {n: r for n, r in results.items() if r["done"] == r["total"]}
        if proc.returncode not in (0, 1) or len(finished) < len(names):  # 1: some tests failed, which is normal
            problems.append(f"pytest exited with code {proc.returncode} grading {', '.join(names)}; its last "
                            f"output:\n{log.read_text()[-3000:]}")
        return finished


def grade(directory, only=None, extra_tests=None, timeout: int = 60, first_failure: bool = False) -> dict:
    """Grade the exercises in `directory`; returns {"total", "max", "exercises": [...], "problems": [...]}.

    With `first_failure`, an exercise's tests stop at its first failure (the rest count as failed): whether an
    answer loses points, found quickly (tests/test_wrong_answers.py grades its catalogue so)."""
    missing = [m for m in ("pytest", "pytest_timeout") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"grading needs {' and '.join(missing)}: pip install pytest pytest-timeout")
    if timeout < 1:
        raise ValueError(f"--timeout must be at least 1 second, got {timeout}")
    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise ValueError(f"no folder {directory} to grade")
    exercises = list(_exercises().values())
    if only:
        unknown = sorted(set(only) - set(_exercises()))
        if unknown:
            raise ValueError(f"unknown exercise(s) {unknown}; the exercises are {sorted(_exercises())}")
        exercises = [e for e in exercises if e.name in only]
    if extra_tests and not Path(extra_tests).is_dir():
        raise ValueError(f"no folder {extra_tests} of extra tests")
    files = [f for f in sorted(TESTS.glob("test_*.py"))
             if any(f'exercise("{e.name}")' in f.read_text() for e in exercises)]
    files += [Path(extra_tests).resolve()] if extra_tests else []
    names, problems = [e.name for e in exercises], []
    results = _run_pytest(names, files, directory, timeout, timeout * (len(names) + 2) + 600, problems, first_failure)
    for name in [n for n in names if n not in results]:  # a crash or an overrun: grade the rest one by one
        results.update(_run_pytest([name], files, directory, timeout, 3 * timeout + 300, problems, first_failure))
    rows = []
    for e in exercises:
        r = results.get(e.name, {"passed": 0, "total": 0, "timed_out": False})
        points = round(e.points * r["passed"] / r["total"], 2) if r["total"] else 0.0
        note = "timed out" if r["timed_out"] else ("no result: crashed or no tests" if not r["total"] else "")
        rows.append({"name": e.name, "chapter": e.chapter, "points": points, "max": e.points,
                     "passed": r["total"] > 0 and r["passed"] == r["total"], "tests_passed": r["passed"],
                     "tests_total": r["total"], "note": note})
    return {"path": str(directory), "total": round(sum(r["points"] for r in rows), 2),
            "max": sum(r["max"] for r in rows), "exercises": rows, "problems": problems}


def format_grades(report: dict) -> str:
    lines = [f"grading {report['path']}", f"{'exercise':<28}{'chapter':<22}{'points':>10}{'tests':>9}"]
    for r in report["exercises"]:
        lines.append(f"{r['name']:<28}{r['chapter']:<22}{r['points']:>6g}/{r['max']:<3}"
                     f"{r['tests_passed']:>5}/{r['tests_total']:<3} {r['note']}")
    lines.append(f"{'total':<50}{report['total']:>6g}/{report['max']}")
    lines += [f"\nproblem: {p}" for p in report.get("problems", [])]
    return "\n".join(lines)
