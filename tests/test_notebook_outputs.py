"""The notebooks' compared outputs do not depend on the machine, and what they print as a check is also asserted.

nbval compares every cell's committed output with the re-executed one after notebooks/sanitize.cfg has replaced what
legitimately varies. These tests read the committed notebooks (no kernel): a measured float printed in a format the
sanitizer misses, or a hash, would fail on the next machine, so it fails here first.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nbval.plugin import get_sanitize_patterns

from minidist.testing import beyond, equal, measured, within

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
PATTERNS = get_sanitize_patterns((ROOT / "notebooks" / "sanitize.cfg").read_text())
# What may remain after sanitizing: a tolerance or bound written in the source (`:g` of 1e-06 has no decimal point).
STATED = re.compile(r"(?:tolerance|tol|above|within|below) \d(?:\.\d+)?e-\d\d\b")
FLOAT_LEFT = re.compile(r"(?<![\w.])\d(?:\.\d+)?e-\d\d\b")
HEX = re.compile(r"\b[0-9a-f]{12,}\b")
SHOWS_CODE = re.compile(r"(?:\s*show\([\w.]+\)\s*)+")  # an exercise's skeleton: its docstring states tolerances


def sanitize(text: str) -> str:
    for regex, replace in PATTERNS:
        text = re.sub(regex, replace, text)
    return text


def compared_outputs(path):
    """(cell index, source, text of its outputs) for every code cell whose output nbval compares."""
    for i, cell in enumerate(json.loads(path.read_text())["cells"]):
        source = "".join(cell["source"])
        if cell["cell_type"] != "code" or "NBVAL_IGNORE_OUTPUT" in source or "NBVAL_SKIP" in source:
            continue
        text = ""
        for out in cell.get("outputs", []):
            if out["output_type"] == "stream":
                text += "".join(out["text"])
            elif "text/plain" in out.get("data", {}):
                text += "".join(out["data"]["text/plain"])
        yield i, source, text


def test_the_sanitizer_hides_measured_floats_and_digests_only():
    line = (f"max |w - w_ref| = {within(7.51e-9, 1e-6)}; zero {within(0.0, 0)}; wrong {beyond(9.7e-3, 5e-5)}; "
            f"bytes {equal(169_472, 169_472)}; 7.5e+09 parameters; sha256 6d0dcfc826dfe057...; step 12, loss 3.25")
    assert sanitize(line) == ("max |w - w_ref| = <measured> (tolerance 1e-06); zero <measured> (tolerance 0); wrong "
                              "<measured> (above 5e-05); bytes 169,472 (formula 169,472); 7.5e+09 parameters; "
                              "sha256 <digest>...; step 12, loss 3.25")
    assert sanitize(measured(-3.25e-7)) == "<measured>"


def test_the_check_helpers_raise_when_the_check_fails():
    with pytest.raises(AssertionError, match="exceeds its tolerance 1e-06"):
        within(2e-6, 1e-6)
    with pytest.raises(AssertionError, match="nan exceeds"):
        within(float("nan"), 1.0)
    with pytest.raises(AssertionError, match="expected above 5e-05"):
        beyond(1e-7, 5e-5)
    with pytest.raises(AssertionError, match="169472 != 169473"):
        equal(169_472, 169_473)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_compared_output_carries_a_floats_last_digits_or_a_hash(path):
    found = []
    for i, _, text in compared_outputs(path):
        for line in sanitize(text).splitlines():
            left = FLOAT_LEFT.findall(STATED.sub("", line))
            if left or HEX.search(line):
                found.append(f"cell {i}: {line.strip()[:160]}")
    assert not found, "print measured floats with minidist.testing.measured/within (or mark the cell " \
                      "NBVAL_IGNORE_OUTPUT): " + "; ".join(found)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_printed_check_is_also_asserted(path):
    unchecked = [i for i, source, text in compared_outputs(path)
                 if re.search(r"\(tol(?:erance)? ", text) and not SHOWS_CODE.fullmatch(source)
                 and not re.search(r"\b(?:within|equal|beyond)\(|\bassert\b", source)]
    assert not unchecked, f"cells {unchecked} print a tolerance but assert nothing"


def test_the_suites_perturbation_moves_the_floats():
    # `make test` runs nbval under MKL_CBWR=COMPATIBLE so that the notebooks are re-executed with another summation
    # order than the one that wrote their outputs. That only proves something if it moves the floats here.
    if not torch.backends.mkl.is_available():
        pytest.skip("this torch has no MKL: MKL_CBWR changes nothing (another BLAS orders its sums its own way)")
    code = ("import torch; torch.manual_seed(0); a, b = torch.randn(256, 384), torch.randn(384, 200); "
            "print(repr((a @ b)[0, :4].tolist()))")
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    plain, perturbed = (subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                                       check=True).stdout for e in (env, dict(env, MKL_CBWR="COMPATIBLE")))
    assert plain != perturbed, f"MKL_CBWR=COMPATIBLE left a matrix product unchanged: {plain}"
