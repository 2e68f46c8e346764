"""The flight recorder and the hang diagnosis: planted faults, each named in the error within the timeout."""
import re
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from minidist import RankError, comm, launch
from minidist.comm.diagnose import diagnose
from minidist.testing import value_errors

TIMEOUT = 2  # seconds a collective waits for its peers in these tests


def planted(fault: str):
    r, n = dist.get_rank(), dist.get_world_size()
    x = torch.ones(1000)
    for _ in range(3):  # some healthy steps first: the diagnosis must find the first disagreement, not the first op
        comm.all_reduce_sum(x)
    if fault == "skip" and r == 2:
        return "skipped"
    if fault == "swap":
        ops = [lambda: comm.all_reduce_sum(x), lambda: comm.broadcast(x[:10], src=0)]
        for op in (reversed(ops) if r == 1 else ops):
            op()
        return "swapped"
    if fault == "size":
        comm.all_reduce_sum(torch.ones(999 if r == 2 else 1000))
    if fault == "hung collective":  # rank 0 stuck inside a collective that never times out (NCCL without a watchdog)
        if r == 0:
            from minidist.comm import flight
            flight.enter("all_reduce", x)
            time.sleep(60)
        dist.barrier = lambda *a, **k: time.sleep(60)  # this process only: it stays alive in launch's closing barrier
        return "done"
    if fault == "sleep" and r == 2:
        time.sleep(60)  # stuck in Python, outside any collective
    if fault == "pipeline":
        y = torch.zeros(8)
        if r > 0:
            comm.recv(y, src=r - 1)
        if r < n - 1 and r != 1:  # stage 1 forgets to pass its activations on
            comm.send(y + 1, dst=r + 1)
        return "done"
    comm.all_reduce_sum(x)
    return "done"


def diagnosis_of(fault, world_size):
    start = time.monotonic()
    with pytest.raises(RankError) as error:
        launch(planted, world_size, fault, timeout=TIMEOUT)
    elapsed = time.monotonic() - start
    text = str(error.value).split("Diagnosis from every rank's flight recorder:")[1]
    return text, elapsed


@pytest.mark.usefixtures("no_leftover_processes")
def test_ranks_that_returned_are_named_so_while_still_in_the_launchers_closing_barrier():
    """launch gives up `timeout` s after the first return; the returned ranks may still be alive then (tearing down):
    the diagnosis must still say they returned, not guess from their stacks."""
    text, elapsed = diagnosis_of("hung collective", 3)
    assert "rank 0 is in all_reduce #4 (float32, 1,000 elements)" in text, text
    for r in (1, 2):
        assert f"rank {r} never entered all_reduce #4 (it is in no collective: it returned from its function)" in text, \
            text
    assert elapsed < TIMEOUT + 10


@pytest.mark.usefixtures("no_leftover_processes")
def test_a_rank_that_skips_a_collective():
    text, elapsed = diagnosis_of("skip", 4)
    assert "group world [0, 1, 2, 3]: ranks 0, 1, 3 are in all_reduce #4 (float32, 1,000 elements)" in text, text
    assert "rank 2 never entered all_reduce #4 (it is in no collective: it returned from its function)" in text, text
    assert elapsed < TIMEOUT + 10


@pytest.mark.usefixtures("no_leftover_processes")
def test_two_ranks_swap_the_order_of_two_collectives():
    text, _ = diagnosis_of("swap", 3)
    assert re.search(r"ranks 0, 2 are in all_reduce #4 \(float32, 1,000 elements\); rank 1 is in broadcast #4 "
                     r"\(float32, 10 elements\): the ranks issued different collectives", text), text


@pytest.mark.usefixtures("no_leftover_processes")
def test_a_size_mismatch_is_named_even_when_gloo_aborts_a_rank():
    text, _ = diagnosis_of("size", 3)
    assert ("ranks 0, 1 are in all_reduce #4 (float32, 1,000 elements); rank 2 is in all_reduce #4 (float32, 999 "
            "elements): a size mismatch") in text, text


@pytest.mark.usefixtures("no_leftover_processes")
def test_a_pipeline_stage_that_never_sends():
    text, _ = diagnosis_of("pipeline", 4)
    assert "rank 2 waits in recv #1 from rank 1 (float32, 8 elements), which rank 1 never sent" in text, text


@pytest.mark.usefixtures("no_leftover_processes")
def test_a_rank_stuck_in_python_outside_any_collective():
    text, elapsed = diagnosis_of("sleep", 4)
    assert "ranks 0, 1, 3 are in all_reduce #4 (float32, 1,000 elements); rank 2 never entered all_reduce #4" in text
    assert re.search(r"its main thread is at \S*test_flight\.py:\d+ in planted\(\)", text), text
    assert elapsed < TIMEOUT + 10  # the sleeping rank is not waited for: 60 s would be


def recorder_entries():
    x = torch.ones(6)
    comm.all_reduce_sum(x)
    work = comm.all_gather_cat(x[:2], async_op=True)
    work.wait()
    if dist.get_rank() == 0:
        comm.send(x, dst=1)
    else:
        comm.recv(x, src=0)
    return comm.flight_recorder()


def test_the_recorder_lists_this_ranks_entries_oldest_first():
    for r, entries in enumerate(launch(recorder_entries, 2)):
        assert [(e["op"], e["seq"], e["numel"], e["completed"]) for e in entries] == [
            ("all_reduce", 1, 6, True), ("all_gather", 2, 4, True), ("send" if r == 0 else "recv", 1, 6, True)]
        assert entries[-1]["peer"] == 1 - r and entries[0]["group"] == [0, 1]


def test_agreeing_records_say_so():
    e = {"seq": 1, "group": [0, 1], "peer": -1, "op": "all_reduce", "dtype": "float32", "numel": 4,
         "completed": True, "time": 0.0}
    assert diagnose({0: {"entries": [e], "stack": None}, 1: {"entries": [e], "stack": None}}, 2).startswith(
        "the flight records agree")


def test_diagnose_from_the_command_line(tmp_path):
    """Under torchrun each rank leaves its record in a directory; `python -m minidist diagnose DIR` reads them."""
    from minidist.comm import flight
    for rank, numel in ((0, 1000), (1, 999)):
        flight._entries.clear()
        flight._seq.clear()
        flight._file["map"] = None
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dist, "get_rank", lambda: rank)
            mp.setattr(dist, "get_world_size", lambda: 2)
            flight.start(rank, str(tmp_path))
            flight.enter("all_reduce", torch.ones(numel))
            flight._file["map"] = None
    out = subprocess.run([sys.executable, "-m", "minidist", "diagnose", str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "rank 0 is in all_reduce #1 (float32, 1,000 elements); rank 1 is in all_reduce #1 (float32, 999" in \
        out.stdout, out.stdout
    empty = subprocess.run([sys.executable, "-m", "minidist", "diagnose", str(tmp_path / "nothing")],
                           capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "no flight records" in empty.stderr


@pytest.mark.parametrize("argv, message", [
    (["-m", "minidist.examples.train", "--steps", "0"], "argument --steps: 0 is not a positive integer"),
    (["-m", "minidist.examples.train", "--steps", "-3"], "argument --steps: -3 is not a positive integer"),
    (["-m", "minidist.examples.train", "--lr", "nan"], "argument --lr: 'nan' is not a finite number"),
    (["-m", "minidist", "tour", "--world-size", "0"], "argument --world-size: 0 is not a positive integer"),
    (["-m", "minidist", "bench", "ddp", "--warmup", "-1"], "argument --warmup: -1 is negative"),
    (["-m", "minidist", "bench", "buckets", "--caps", "0.1", "0"], "argument --caps: 0.0 is not positive"),
    (["-m", "minidist", "grade", "--timeout", "0"], "argument --timeout: 0 is not a positive integer"),
    (["-m", "minidist", "memory", "--params", "-5"], "argument --params: -5.0 is not positive"),
])
def test_bad_command_line_arguments_are_refused_by_name(argv, message):
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr, out.stderr


def bad_peers():
    return value_errors(lambda: comm.send(torch.ones(2), dst=2), lambda: comm.recv(torch.ones(2), src=dist.get_rank()),
                        lambda: comm.broadcast(torch.ones(2), src=-1))


def test_bad_ranks_in_point_to_point_and_broadcast_are_refused():
    errors = launch(bad_peers, 2)[0]
    assert errors == ["destination 2 is not another rank of the group (group ranks 0..1, this rank is 0)",
                      "source 0 is not another rank of the group (group ranks 0..1, this rank is 0)",
                      "broadcast source -1 is not a rank of the group (0..1)"]


@pytest.mark.parametrize("call, message", [
    (lambda: __import__("minidist.models").models.GPTConfig(n_layer=0), "GPTConfig.n_layer must be a positive"),
    (lambda: __import__("minidist.models").models.GPTConfig(dropout=1.0), "GPTConfig.dropout must be in"),
    (lambda: __import__("minidist.data").data.random_batches(torch.arange(100), 0, 8, 1), "need batch_size >= 1"),
    (lambda: __import__("minidist.samplers").samplers.LengthGroupedSampler([3, 4], 0, 2, 0),
     "batch_size and mega_batch_mult must be positive"),
])
def test_bad_arguments_to_public_functions_are_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_under_torchrun_the_records_land_in_a_directory_that_diagnose_reads(tmp_path):
    import os
    script = tmp_path / "job.py"
    script.write_text(
        "import time, torch, torch.distributed as dist\n"
        "from minidist import comm, run_under_torchrun\n"
        "def work():\n"
        "    x = torch.ones(10)\n"
        "    comm.all_reduce_sum(x)\n"
        "    if dist.get_rank() == 1:\n"
        "        time.sleep(60)  # stuck outside any collective: torchrun ends it once rank 0 times out\n"
        "    comm.all_reduce_sum(x)\n"
        "run_under_torchrun(work, timeout=2)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, MINIDIST_FLIGHT_DIR=str(tmp_path / "flight"))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, timeout=180, env=env, cwd=root)
    assert run.returncode != 0
    out = subprocess.run([sys.executable, "-m", "minidist", "diagnose", str(tmp_path / "flight")],
                         capture_output=True, text=True, timeout=60)
    assert "rank 0 is in all_reduce #2 (float32, 10 elements); rank 1 never entered all_reduce #2" in out.stdout, \
        out.stdout + out.stderr
    assert re.search(r"its main thread is at \S*job\.py:\d+ in work\(\)", out.stdout), out.stdout  # SIGTERM's stack
    assert "python -m minidist diagnose" in run.stderr  # the failing rank says where the records are


def completion_from_the_device():
    """A collective on an accelerator: its completion must come from an event recorded after it on the device, not
    from the work's future (NCCL completes the future at enqueue). A fake device and a fake event stand in."""
    from minidist.comm import backend, flight

    class FakeEvent:
        ran = False

        def query(self):
            return self.ran

    event, original = FakeEvent(), (backend._accelerator, backend._stream_event)
    backend._accelerator, backend._stream_event = (lambda result: "fake"), (lambda work, device: event)
    try:
        work = comm.all_reduce_(torch.ones(4), async_op=True)
        work.wait()
        time.sleep(0.05)                       # the future is long done, and waited on
        before = (work.completed_at, flight.flight_recorder()[-1]["completed"])
        event.ran = True                       # the device has run the collective
        deadline = time.monotonic() + 5
        while work.completed_at is None and time.monotonic() < deadline:
            time.sleep(0.001)
        return before, (work.completed_at is not None, flight.flight_recorder()[-1]["completed"])
    finally:
        backend._accelerator, backend._stream_event = original


def test_completion_on_an_accelerator_comes_from_the_stream_not_the_future():
    for before, after in launch(completion_from_the_device, 2):
        assert before == (None, False)         # not completed: the device has not run it yet
        assert after == (True, True)           # completed by the watcher once the event has
