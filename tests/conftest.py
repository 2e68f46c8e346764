import os

import pytest

# The tests build CPU tensors: simulate ranks as CPU processes over gloo, also on a machine with GPUs.
os.environ.setdefault("MINIDIST_BACKEND", "gloo")


def live_children() -> list[int]:
    """PIDs of this process's children that are still running (not zombies)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, ppid = fields[0], int(fields[1])
        if ppid == me and state != "Z":
            found.append(int(entry))
    return found


@pytest.fixture
def no_leftover_processes():
    yield
    assert live_children() == [], "a launch left processes running"
