"""The launcher: results in rank order, failures surfaced with rank and traceback, nothing left running."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

from minidist import RankError, launch
from minidist.launch import run_under_torchrun

pytestmark = pytest.mark.usefixtures("no_leftover_processes")


def rank_and_sum(scale, offset=0):
    x = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(x)
    return dist.get_rank(), dist.get_world_size(), scale * x.item() + offset


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_results_come_back_in_rank_order(world_size):
    results = launch(rank_and_sum, world_size, 2.0, offset=1)
    expected_sum = 2.0 * sum(range(world_size)) + 1
    assert results == [(r, world_size, expected_sum) for r in range(world_size)]


def test_runs_functions_that_cannot_be_pickled():
    # A lambda stands in for a function defined in a notebook: neither can be imported by name.
    assert launch(lambda: torch.get_num_threads(), 2) == [1, 1]  # and one thread per rank


def test_returns_tensors():
    out = launch(lambda: torch.full((3,), float(dist.get_rank())), 2)
    assert torch.equal(out[1], torch.ones(3))


def failing_rank():
    if dist.get_rank() == 2:
        raise ValueError("boom on purpose")
    dist.barrier()  # the other ranks wait for rank 2, which never comes


def test_a_raising_rank_is_named_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        launch(failing_rank, 3)
    assert time.monotonic() - start < 10
    assert info.value.rank == 2
    message = str(info.value)
    assert "rank 2 failed" in message and "ValueError: boom on purpose" in message
    assert "in failing_rank" in message  # the rank's own traceback, not the parent's


def raise_or_sleep():
    if dist.get_rank() == 2:
        raise ValueError("boom on purpose")
    time.sleep(30)


def test_ranks_that_all_raise_are_not_asked_for_their_stacks(monkeypatch):
    # Every rank raises the same error (a learner's stub, say): the others' errors arrive within launch's grace, so
    # none of them is signalled for a stack dump, which would cost 0.3 s a launch. A rank still busy would be.
    signalled, kill = [], os.kill
    monkeypatch.setattr(sys.modules["minidist.launch"].os, "kill",
                        lambda pid, sig: signalled.append(pid) if sig == signal.SIGUSR1 else kill(pid, sig))
    with pytest.raises(RankError, match="NotImplementedError: same on every rank"):
        launch(lambda: (_ for _ in ()).throw(NotImplementedError("same on every rank")), 3)
    assert signalled == []
    with pytest.raises(RankError, match="boom on purpose"):
        launch(raise_or_sleep, 3)  # ranks 0 and 1 are busy outside any collective: their stacks are taken
    assert len(signalled) == 2


def skips_the_collective():
    if dist.get_rank() == 0:
        x = torch.ones(1)
        dist.all_reduce(x)  # rank 1 never joins
    else:
        time.sleep(60)


def test_a_rank_stuck_in_a_collective_times_out():
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        launch(skips_the_collective, 2, timeout=3)
    assert info.value.rank == 0
    assert time.monotonic() - start < 30
    assert "timed out" in str(info.value).lower() or "timeout" in str(info.value).lower()


def test_a_rank_that_dies_silently_is_reported():
    with pytest.raises(RankError, match="exited with code 7") as info:
        launch(lambda: os._exit(7) if dist.get_rank() == 1 else dist.barrier(), 2)
    assert info.value.rank == 1


def test_an_unpicklable_result_is_an_error_not_a_hang():
    with pytest.raises(RankError, match="pickle"):
        launch(lambda: (lambda: None), 2)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "2"])
def test_bad_world_size(bad):
    with pytest.raises(ValueError, match="world_size must be a positive integer"):
        launch(rank_and_sum, bad, 1.0)


def test_bad_timeout():
    with pytest.raises(ValueError, match="timeout must be positive"):
        launch(rank_and_sum, 2, 1.0, timeout=0)


def test_two_launches_at_the_same_time_do_not_collide(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        from minidist import launch
        def f():
            x = torch.ones(1); dist.all_reduce(x); return x.item()
        for _ in range(5):
            assert launch(f, 2) == [2.0, 2.0]
        print("ok")
    """))
    jobs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    for job in jobs:
        out, err = job.communicate(timeout=120)
        assert job.returncode == 0, err
        assert out.strip() == "ok"


def test_killing_the_parent_leaves_no_rank_behind(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import os, time
        from minidist import launch
        def f():
            os.write(1, f"{os.getpid()}\\n".encode())  # one write: the two ranks' lines cannot interleave
            time.sleep(600)
        launch(f, 2)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(parent.stdout.readline()) for _ in range(2)]
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") and _state(p) != "Z" for p in pids):
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{p}") and _state(p) != "Z" for p in pids)


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_the_same_worker_runs_under_torchrun(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent("""
        import torch.distributed as dist
        from minidist import run_under_torchrun
        from tests.test_launch import rank_and_sum
        rank, world, total = run_under_torchrun(rank_and_sum, 2.0, offset=1)
        print(f"rank {rank} of {world}: {total}", flush=True)
    """))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, timeout=180, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(re.findall(r"rank \d of \d: [\d.]+", out.stdout)) == ["rank 0 of 2: 3.0", "rank 1 of 2: 3.0"]


def test_run_under_torchrun_explains_a_missing_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="not running under torchrun"):
        run_under_torchrun(rank_and_sum, 1.0)


def test_rank_output_reaches_a_pipe(tmp_path):
    """os._exit skips Python's flush: a rank's prints to a pipe (not a terminal) must still arrive."""
    script = tmp_path / "chatty.py"
    script.write_text(textwrap.dedent("""
        import sys, torch.distributed as dist
        from minidist import launch
        def f():
            print(f"stdout of rank {dist.get_rank()}")          # block-buffered: a pipe is not a terminal
            print(f"stderr of rank {dist.get_rank()}", file=sys.stderr)
        launch(f, 2)
    """))
    # PYTHONUNBUFFERED (as many CI systems set it) makes print write its text and its "\n" separately: the launcher
    # must still keep each rank's line whole
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.splitlines()) == ["stdout of rank 0", "stdout of rank 1"]
    assert "stderr of rank 0" in out.stderr and "stderr of rank 1" in out.stderr


def test_choosing_the_backend_does_not_initialize_cuda(monkeypatch):
    """A launcher that forks must decide "GPUs or not" without initializing CUDA in the parent (fork would break)."""
    import torch
    from minidist.launch import default_backend

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.cuda.is_available() initializes CUDA in the parent")
    monkeypatch.delenv("MINIDIST_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", forbidden)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)     # as on a CUDA build of torch...
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)             # ...with 4 GPUs, counted through NVML
    assert default_backend(2) == "nccl" and default_backend(8) == "gloo"
    assert not torch.cuda.is_initialized()
    monkeypatch.setenv("MINIDIST_BACKEND", "mpi")
    with pytest.raises(ValueError, match="MINIDIST_BACKEND must be 'gloo' or 'nccl'"):
        default_backend(2)


def test_nccl_without_a_gpu_per_rank_is_a_clear_error():
    from minidist.launch import gpu_count
    n = gpu_count() + 1  # one rank more than there are GPUs, on any machine
    with pytest.raises(ValueError, match=f"NCCL needs one GPU per rank: {n} ranks, {n - 1} GPUs visible"):
        launch(rank_and_sum, n, 1.0, backend="nccl")


def spins_on_rank_1():
    if dist.get_rank() == 1:
        while True:  # stuck in Python, and no collective left to time out
            pass
    return "done"


def test_a_rank_stuck_after_the_others_returned_is_reported_not_waited_for(no_leftover_processes):
    start = time.monotonic()
    with pytest.raises(RankError, match=r"had not returned 2 s after rank 0 had"):
        launch(spins_on_rank_1, 2, timeout=2)
    assert time.monotonic() - start < 30
