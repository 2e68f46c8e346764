"""A grader is as good as the wrong answers it rejects: every catalogued wrong answer must score below full marks.

The catalogue is tests/wrong_answers/*.py: module-level functions named `<function>__<label>`, `<function>` being an
exercise's function (minidist.exercises.registry()'s `e.function`), each with a one-line docstring naming the
mistake. Round k takes the k-th wrong answer (by label) of every exercise, writes one submission folder (each
chapter's solution file with those functions put in place of the answers) and grades it in one `python -m minidist
grade` run: a few grader runs for the whole catalogue, not one per answer.
"""
import ast
import importlib.util
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from minidist.exercises import CHAPTERS, ROOT, registry

CATALOGUE = Path(__file__).resolve().parent / "wrong_answers"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"wrong_answers_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def catalogue() -> dict[str, list[tuple[str, object]]]:
    """function -> [(label, wrong answer)], sorted by label. A name that matches no exercise's function is an error
    (a typo would otherwise drop the answer silently)."""
    functions = {e.function for e in registry()}
    found: dict[str, list] = {}
    for path in sorted(CATALOGUE.glob("*.py")):
        module = _load(path)
        for name, fn in vars(module).items():
            if not inspect.isfunction(fn) or fn.__module__ != module.__name__ or name.startswith("_"):
                continue
            owner = max((f for f in functions if name.startswith(f + "__")), key=len, default=None)
            if owner is None:
                raise ValueError(f"{path.name}: {name} is not <exercise function>__<label> for any exercise")
            found.setdefault(owner, []).append((name[len(owner) + 2:], fn))
    return {f: sorted(answers, key=lambda pair: pair[0]) for f, answers in found.items()}


def _imports(fn) -> list[str]:
    """The import statements of the module that defines `fn` (what a wrong answer may use besides itself)."""
    tree = ast.parse(Path(inspect.getsourcefile(fn)).read_text())
    return [ast.unparse(s) for s in tree.body if isinstance(s, (ast.Import, ast.ImportFrom))]


def chapter_file(chapter: str, replacements: dict) -> str:
    """The chapter's solution file with each function in `replacements` ({function: wrong answer}) swapped for the
    wrong answer's source, renamed, and the imports the wrong answers' files make added at the top."""
    source = (ROOT / "solutions" / f"{chapter}.py").read_text()
    lines, tree = source.splitlines(), ast.parse(source)
    imports = []
    for node in reversed(tree.body):  # bottom up, so that line numbers above stay valid
        if isinstance(node, ast.FunctionDef) and node.name in replacements:
            fn = replacements[node.name]
            code = inspect.getsource(fn).replace(f"{fn.__name__}(", f"{node.name}(")  # a recursive call too
            first = node.lineno - 1 - len(node.decorator_list)
            lines[first:node.end_lineno] = code.rstrip("\n").splitlines()
            imports += [i for i in _imports(fn) if i not in imports]
    missing = set(replacements) - {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert not missing, f"{chapter}: no function {missing} in the solution file"
    return "\n".join(imports + lines) + "\n"


WRONG = catalogue()
EXERCISES = registry()
ROUNDS = max((len(a) for a in WRONG.values()), default=0)


def test_every_exercise_has_two_catalogued_wrong_answers_with_a_docstring():
    short = sorted(e.name for e in EXERCISES if len(WRONG.get(e.function, [])) < 2)
    assert not short, f"exercises with fewer than two catalogued wrong answers: {short}"
    for function, answers in WRONG.items():
        for label, fn in answers:
            doc = inspect.getdoc(fn) or ""
            assert doc and "\n\n" not in doc, f"{function}__{label}: needs a docstring (a sentence) naming the mistake"
            assert inspect.signature(fn).parameters.keys() == inspect.signature(
                getattr(importlib.import_module(f"minidist.{_module(function)}"), function)).parameters.keys(), \
                f"{function}__{label}: its parameters differ from the exercise's"


def _module(function: str) -> str:
    return next(e.module for e in EXERCISES if e.function == function)


def _round(k: int, folder: Path) -> tuple[dict, list[str], subprocess.Popen]:
    """Write round k's submission into `folder` and start grading it: (the wrong answers chosen, the exercises
    graded, the grader's process)."""
    chosen = {f: answers[k] for f, answers in WRONG.items() if k < len(answers)}
    folder.mkdir()
    for chapter in CHAPTERS:
        mine = {e.function: chosen[e.function][1] for e in EXERCISES if e.chapter == chapter and e.function in chosen}
        (folder / f"{chapter}.py").write_text(chapter_file(chapter, mine))
    names = [e.name for e in EXERCISES if e.function in chosen]
    grader = subprocess.Popen([sys.executable, "-m", "minidist", "grade", str(folder), "--timeout", "20",
                               "--first-failure", "--json", str(folder / "grade.json"), "--only", *names],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    return chosen, names, grader


def test_every_wrong_answer_scores_below_full_marks(tmp_path):
    # The rounds are graded at the same time: a wrong answer can only lose points to a busy machine (a time-out
    # fails a test, it never passes one), so running them side by side cannot let one through.
    rounds = [_round(k, tmp_path / f"round{k}") for k in range(ROUNDS)]
    through = []
    for k, (chosen, names, grader) in enumerate(rounds):
        output, _ = grader.communicate(timeout=900)
        assert grader.returncode == 0, f"round {k}: {output}"
        rows = {r["name"]: r for r in json.loads((tmp_path / f"round{k}" / "grade.json").read_text())["exercises"]}
        passed = {}  # a function with several exercises: its wrong answer must lose points on at least one
        for e in EXERCISES:
            if e.function in chosen:
                passed[e.function] = passed.get(e.function, True) and rows[e.name]["passed"]
        through += [f"{f}__{chosen[f][0]} (round {k})" for f, ok in passed.items() if ok]
    assert ROUNDS >= 2 and not through, f"wrong answers that score full marks: {through}"
