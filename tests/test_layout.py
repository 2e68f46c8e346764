"""House rules that keep minidist readable."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted((ROOT / "minidist").rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_stays_under_300_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 300, f"{path.relative_to(ROOT)} has {lines} lines: split it by responsibility"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_technique_code_is_device_agnostic(path):
    text = path.read_text()
    allowed = {"launch.py"}  # the launcher is where devices are chosen
    if path.name not in allowed:
        assert "torch.cuda" not in text and ".cuda(" not in text


def test_the_readme_states_the_tolerance_policy():
    readme = (ROOT / "README.md").read_text()
    assert "## Tolerance policy" in readme
