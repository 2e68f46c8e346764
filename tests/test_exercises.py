"""Exercises: generated from one source, graded by the package's own tests; grading can fail, and a hang costs one
exercise."""
import json
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from minidist.exercises import CHAPTERS, ROOT, generate, out_of_date, registry
from minidist.grading import ENV, implementation


def test_the_committed_exercises_and_solutions_are_generated():
    assert out_of_date() == [], "run `python -m minidist.exercises` and commit the result"


def test_a_hand_edit_of_a_generated_file_is_caught(tmp_path):
    generate(tmp_path)
    assert out_of_date(tmp_path) == []
    path = tmp_path / "solutions" / "ch01_collectives.py"
    path.write_text(path.read_text().replace("group=None", "group=None ", 1))
    assert out_of_date(tmp_path) == ["solutions/ch01_collectives.py"]


def test_at_least_sixteen_exercises_with_points_for_chapters_00_to_03():
    exercises = registry()
    first_four = [e for e in exercises if e.chapter[2:4] in ("00", "01", "02", "03")]
    assert len(first_four) >= 16 and all(e.points > 0 for e in exercises)
    assert {e.chapter for e in exercises} == set(CHAPTERS)


def answer_lines() -> dict[str, str]:
    """Distinctive lines of every exercise's answer (long, and found nowhere in the package outside a region)."""
    import re
    from minidist.exercises import BEGIN, END, PACKAGE
    inside, outside = {}, set()
    for path in PACKAGE.rglob("*.py"):
        region = None
        for line in path.read_text().splitlines():
            if m := BEGIN.match(line):
                region = m.group(2)
            elif END.match(line):
                region = None
            elif region and not line.strip().startswith("#"):
                inside.setdefault(line.strip(), region)
            else:
                outside.add(line.strip())
    return {line: name for line, name in inside.items() if len(line) >= 30 and line not in outside
            and not re.fullmatch(r"[\w\s,=().\[\]]*", line)}


def test_no_notebook_shows_the_code_of_an_exercise_answer():
    import nbformat
    lines = answer_lines()
    assert len(lines) > 30  # the check has teeth: most answers have a line of their own
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        shown = []
        for cell in nb.cells:
            shown.append(cell.source)
            for out in cell.get("outputs", []):
                shown.append(str(out.get("text", "")) + str(out.get("data", {}).get("text/plain", "")) +
                             str(out.get("data", {}).get("text/html", "")))
        text = "\n".join(shown)
        leaked = {name: line for line, name in lines.items() if line in text}
        assert not leaked, f"{path.name} shows exercise answers: {leaked}"


def test_stubs_keep_hints_and_raise():
    text = (ROOT / "exercises" / "ch01_collectives.py").read_text()
    assert "# hint: use ring_exchange(send, recv, group)" in text
    assert 'raise NotImplementedError("exercise ring_reduce_scatter: write this part")' in text
    assert "ring_exchange(chunks[(rank - s) % n]" not in text  # the answer is not in the stub


def run_grade(*args):
    out = subprocess.run([sys.executable, "-m", "minidist", "grade", *args], capture_output=True, text=True,
                         timeout=900, cwd=ROOT)
    return out


def grade_json(tmp_path, *args):
    path = tmp_path / "grade.json"
    out = run_grade(*args, "--json", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(path.read_text())


def test_untouched_stubs_score_zero(tmp_path):
    report = grade_json(tmp_path)
    assert report["total"] == 0 and report["max"] == sum(e.points for e in registry())
    assert all(r["tests_total"] > 0 and r["tests_passed"] == 0 for r in report["exercises"])
    assert set(report["exercises"][0]) >= {"name", "points", "max", "passed"}


def test_solutions_score_full_marks(tmp_path):
    report = grade_json(tmp_path, "--solutions")
    assert report["total"] == report["max"]
    assert all(r["passed"] for r in report["exercises"])


def submission(tmp_path, solved_chapters=(), replace=None):
    """A learner's folder: the chapters in `solved_chapters` solved, the rest untouched stubs."""
    folder = tmp_path / "submission"
    folder.mkdir()
    for chapter in CHAPTERS:
        source = "solutions" if chapter in solved_chapters else "exercises"
        shutil.copy(ROOT / source / f"{chapter}.py", folder / f"{chapter}.py")
    for chapter, (old, new) in (replace or {}).items():
        path = folder / f"{chapter}.py"
        assert old in path.read_text()
        path.write_text(path.read_text().replace(old, new))
    return folder


def test_a_partial_submission_scores_what_it_solved(tmp_path):
    report = grade_json(tmp_path, str(submission(tmp_path, ["ch00_memory"])), "--only", "zero_state_bytes",
                        "activation_bytes_per_layer", "straggler_idle")  # chapters 00 solved, 03 not
    scores = {r["name"]: (r["points"], r["max"]) for r in report["exercises"]}
    assert scores["zero_state_bytes"] == (2, 2) and scores["activation_bytes_per_layer"] == (2, 2)
    assert scores["straggler_idle"] == (0, 1) and report["total"] == 4


def test_an_infinite_loop_costs_that_exercise_only(tmp_path):
    loop = ("    if cap is None:\n        return [[(i, 0, numels[i])]",
            "    while True:\n        pass\n    if cap is None:\n        return [[(i, 0, numels[i])]")
    folder = submission(tmp_path, ["ch02_data_parallel"], {"ch02_data_parallel": loop})
    start = time.monotonic()
    report = grade_json(tmp_path, str(folder), "--only", "assign_buckets", "loss_scale_update", "--timeout", "5")
    assert time.monotonic() - start < 120
    scores = {r["name"]: r for r in report["exercises"]}
    assert scores["assign_buckets"]["points"] == 0 and scores["assign_buckets"]["note"] == "timed out"
    assert scores["loss_scale_update"]["points"] == 1


def test_a_deadlocked_collective_fails_the_exercise_and_the_run_goes_on(tmp_path):
    # Every rank receives before anyone sends: all of them wait until the collective timeout.
    deadlock = ("    for s in range(n - 1):\n        ring_exchange(chunks[(rank - s) % n]",
                "    for s in range(n - 1):\n        dist.recv(chunks[(rank - s - 1) % n], (rank - 1) % n)\n"
                "        ring_exchange(chunks[(rank - s) % n]")
    folder = submission(tmp_path, ["ch01_collectives"], {"ch01_collectives": deadlock})
    report = grade_json(tmp_path, str(folder), "--only", "ring_all_gather", "ring_all_reduce", "--timeout", "8")
    scores = {r["name"]: r for r in report["exercises"]}
    assert scores["ring_all_gather"]["points"] < scores["ring_all_gather"]["max"]  # (one rank alone has no ring)
    # The first collective time-out skips the exercise's other tests, instead of waiting out each of them in turn.
    assert scores["ring_all_gather"]["note"] == "timed out"
    assert scores["ring_all_reduce"]["passed"]  # graded with the package's all-gather, so unaffected


def test_instructors_private_tests_count(tmp_path):
    private = tmp_path / "private"
    private.mkdir()
    (private / "test_private.py").write_text(textwrap.dedent("""
        import pytest
        from minidist.grading import implementation

        @pytest.mark.exercise("zero_state_bytes")
        def test_a_private_check_that_solutions_pass():
            assert implementation("zero_state_bytes")(10, 2, 3, "fp32").total == 80

        @pytest.mark.exercise("assign_buckets")
        def test_a_private_check_nobody_passes():
            assert implementation("assign_buckets")([1], 1) == []
    """))
    report = grade_json(tmp_path, "--solutions", "--extra-tests", str(private), "--only", "zero_state_bytes",
                        "assign_buckets")
    scores = {r["name"]: r for r in report["exercises"]}
    assert scores["zero_state_bytes"]["tests_total"] == 4 and scores["zero_state_bytes"]["passed"]
    assert scores["assign_buckets"]["tests_passed"] == scores["assign_buckets"]["tests_total"] - 1
    assert scores["assign_buckets"]["points"] < 2 and report["total"] < report["max"]


@pytest.mark.parametrize("args, message", [
    (["no/such/folder"], "no folder"),
    (["--only", "ring_all_to_all"], "unknown exercise(s) ['ring_all_to_all']"),
    (["--solutions", "--extra-tests", "no/such/tests"], "no folder no/such/tests of extra tests"),
])
def test_bad_grader_input(args, message):
    out = run_grade(*args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_implementation_errors(monkeypatch, tmp_path):
    with pytest.raises(KeyError, match="no exercise named 'ring_all_to_all'"):
        implementation("ring_all_to_all")
    (tmp_path / "ch00_memory.py").write_text("x = 1\n")
    monkeypatch.setenv(ENV, str(tmp_path))
    with pytest.raises(AttributeError, match="ch00_memory.py has no function zero_state_bytes"):
        implementation("zero_state_bytes")


def test_a_submission_that_kills_the_test_process_costs_that_exercise_only(tmp_path):
    crash = ("    w, g, k = BYTES_PER_PARAM[precision]", "    import os\n    os._exit(3)")
    folder = submission(tmp_path, ["ch00_memory", "ch02_data_parallel"], {"ch00_memory": crash})
    report = grade_json(tmp_path, str(folder), "--only", "zero_state_bytes", "loss_scale_update")
    scores = {r["name"]: r for r in report["exercises"]}
    assert scores["zero_state_bytes"]["points"] == 0 and "crashed" in scores["zero_state_bytes"]["note"]
    assert scores["loss_scale_update"]["passed"]
    assert report["problems"] and "exited with code 3" in report["problems"][0]


def test_grading_needs_its_test_tools(monkeypatch):
    import importlib.util as util
    from minidist import grading
    real = util.find_spec
    monkeypatch.setattr(grading.importlib.util, "find_spec", lambda name, *a: None if name == "pytest_timeout"
                        else real(name, *a))
    with pytest.raises(ValueError, match="grading needs pytest_timeout: pip install pytest pytest-timeout"):
        grading.grade(ROOT / "solutions")


def test_show_displays_the_skeleton_not_the_answer():
    from minidist.comm.ring import ring_all_gather_, ring_all_reduce
    from minidist.data_parallel import DataParallel
    from minidist.exercises import show, stub_source
    shown = show(ring_all_reduce)
    text = getattr(shown, "data", shown)
    assert "def ring_all_reduce" in text and "hint: copy and flatten" in text
    assert 'raise NotImplementedError("exercise ring_all_reduce: write this part")' in text
    assert "ring_reduce_scatter_(chunks, group)" not in text  # the answer's lines are gone
    gather = stub_source(__import__("inspect").getsource(ring_all_gather_))
    assert "ring_exchange(chunks[(rank - s) % n]" not in gather and "def ring_all_gather_" in gather
    assert "exercise" not in getattr(show(DataParallel.forward), "data", "")  # code without a region: unchanged


def test_show_keeps_a_method_valid_python():
    import ast
    from minidist.data_parallel import DataParallel
    from minidist.exercises import show
    ast.parse(show(DataParallel.forward).data)  # a body flush with its `def` would not parse
