"""Run one function on N ranks, the way every minidist chapter does.

    results = launch(fn, 4, x, lr=0.1)    # fn(x, lr=0.1) runs on ranks 0..3; results[r] is rank r's return value

Each rank is a process with the default process group already initialized (gloo on CPU, NCCL when every rank can
have its own GPU), so `fn` uses `torch.distributed` as it would under `torchrun`. The ranks meet through a FileStore in
a fresh private directory, and gloo binds each of its loopback connections to a port the OS picks as free (port 0),
so two launches at once never collide. (A TCPStore rendezvous works too, but on a 2-core machine one launch in ten
stalled five seconds in the store's handshake; the FileStore never did.)

What can go wrong, and what launch does about it:
  * a rank raises: launch raises RankError naming the rank, with that rank's traceback, and ends the other ranks;
  * a rank waits in a collective that a peer never joins: gloo raises after `timeout` seconds (the process group
    timeout), which becomes a RankError as above (NCCL's watchdog aborts the process instead: a RankError with a
    negative exit code and no traceback);
  * a rank dies without a word (a signal, os._exit): RankError with its exit code;
  * in every case the RankError ends with a diagnosis from every rank's flight recorder (comm/flight.py,
    comm/diagnose.py): which ranks were in which collective, who never entered it, who issued another one or another
    size, and where a rank outside any collective is stuck (its stack, taken with SIGUSR1);
  * gloo sometimes aborts at interpreter exit after the work is done; ranks therefore barrier, destroy the process
    group and leave with os._exit(0), which skips the crashing teardown.
Every child asks the kernel to kill it when its parent dies, so nothing is left running even if the parent is killed.

Functions defined in a notebook cannot be pickled by name, so ranks are forked (`start_method="fork"`). CUDA does not
survive a fork once the parent has initialized it; in that case NCCL ranks are spawned, and `fn` must then live in
an importable module. Set MINIDIST_BACKEND=gloo to simulate ranks as CPU processes on a GPU machine. The same `fn`
runs unchanged under torchrun through `run_under_torchrun(fn, ...)`.
"""
import contextlib
import ctypes
import datetime
import faulthandler
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import wait

import torch
import torch.distributed as dist

from .comm import flight
from .comm.diagnose import diagnose_ranks
from .elastic import attempt_store, report_failure

ERROR_GRACE = 0.2  # seconds the others get to report once a rank has raised, before their stacks are taken
DEFAULT_TIMEOUT = float(os.environ.get("MINIDIST_TIMEOUT", 120))  # seconds a collective may wait for its peers


class RankError(RuntimeError):
    """A rank failed; `rank` says which, the message carries its traceback."""

    def __init__(self, rank: int, detail: str):
        self.rank = rank
        super().__init__(f"rank {rank} failed:\n{detail}")


def gpu_count() -> int:
    """GPUs visible to this process, counted *without* initializing CUDA here (forked ranks could not use it then).

    torch.cuda.is_available() initializes the CUDA driver in the calling process unless PYTORCH_NVML_BASED_CUDA_CHECK
    is set, and a process forked after that cannot use CUDA at all. device_count() asks NVML instead when it can.
    """
    if not torch.backends.cuda.is_built():
        return 0
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return torch.cuda.device_count()


def default_backend(world_size: int) -> str:
    """$MINIDIST_BACKEND if set (gloo or nccl); else NCCL when every rank can own a GPU, gloo otherwise."""
    if forced := os.environ.get("MINIDIST_BACKEND"):
        if forced not in ("gloo", "nccl"):
            raise ValueError(f"MINIDIST_BACKEND must be 'gloo' or 'nccl', got {forced!r}")
        return forced
    return "nccl" if gpu_count() >= world_size else "gloo"


def device() -> torch.device:
    """The device this rank computes on: its own GPU under NCCL, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return torch.device("cpu")


def synchronize() -> None:
    """Wait for this rank's device to finish its queued work (a no-op on the CPU): call it before reading a clock."""
    if device().type == "cuda":
        torch.cuda.synchronize()


def launch(fn, world_size: int, *args, backend: str | None = None, timeout: float = DEFAULT_TIMEOUT,
           start_method: str | None = None, **kwargs) -> list:
    """Run `fn(*args, **kwargs)` on `world_size` ranks; return the per-rank results in rank order.

    `backend`, `timeout` (seconds a collective may wait) and `start_method` are launch's own keywords; everything else
    goes to `fn`. Return values travel back pickled, so return tensors (detached) and plain data, not modules.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r} seconds")
    backend = backend or default_backend(world_size)
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and gpu_count() < world_size:
        raise ValueError(f"NCCL needs one GPU per rank: {world_size} ranks, {gpu_count()} GPUs visible")
    import torch._dynamo  # noqa: F401  (imported once here, not lazily by each rank's first optimizer: 2-8 s a rank)
    # CUDA cannot be used in a child forked after the parent initialized it; before that, fork is fine.
    start_method = start_method or ("spawn" if backend == "nccl" and torch.cuda.is_initialized() else "fork")
    ctx = mp.get_context(start_method)
    procs, conns = [], []
    rendezvous = tempfile.mkdtemp(prefix="minidist-")
    try:
        for rank in range(world_size):
            parent_end, child_end = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_run_rank, args=(rank, world_size, os.path.join(rendezvous, "store"), backend,
                                                    timeout, fn, args, kwargs, child_end))
            p.start()
            child_end.close()
            procs.append(p)
            conns.append(parent_end)
        return _collect(procs, conns, rendezvous, timeout)
    finally:
        _end(procs)
        for c in conns:
            c.close()
        shutil.rmtree(rendezvous, ignore_errors=True)


def _collect(procs, conns, directory, timeout: float) -> list:
    """Gather every rank's result in rank order; raise on the first failure, with the flight records' diagnosis.

    Once a rank has returned, the others get `timeout` seconds more to return too: a rank stuck outside any
    collective (an infinite loop, say) would otherwise keep launch waiting forever, no collective timing out."""
    results, pending = [None] * len(procs), dict(enumerate(conns))
    while pending:
        waitables = list(pending.values()) + [procs[r].sentinel for r in pending]
        ready = wait(waitables, timeout=None if len(pending) == len(procs) else timeout)
        if not ready:
            first = min(pending)
            raise RankError(first, f"the rank had not returned {timeout:g} s after rank "
                                   f"{min(set(range(len(procs))) - set(pending))} had (stuck outside any collective?)"
                            + diagnose_ranks(procs, directory, set(range(len(procs))) - set(pending)))
        for rank, conn in list(pending.items()):
            if conn in ready or procs[rank].sentinel in ready:
                try:
                    status, value = pickle.loads(conn.recv_bytes())
                except EOFError:  # the process ended without sending anything
                    procs[rank].join()
                    raise RankError(rank, f"the process exited with code {procs[rank].exitcode} before returning"
                                          " (a negative code is the signal that killed it)"
                                    + diagnose_ranks(procs, directory, set(range(len(procs))) - set(pending))) from None
                if status == "error":
                    del pending[rank]
                    late = _reports_within(pending, ERROR_GRACE)
                    raised = {rank} | {r for r, status in late.items() if status == "error"}
                    returned = {r for r, v in enumerate(results) if r not in pending and r != rank and r not in late}
                    returned |= {r for r, status in late.items() if status == "ok"}
                    raise RankError(rank, value + diagnose_ranks(procs, directory, returned, raised))
                results[rank] = value
                del pending[rank]
    for p in procs:  # every result is in: the ranks are only tearing down now
        p.join(timeout=30)
    return results


def _reports_within(pending: dict, seconds: float) -> dict:
    """{rank: "ok" | "error" | "exited"} of the `pending` ranks that report within `seconds` (taken out of `pending`).
    The others often raise the same error a moment after the first (every rank runs the same code); their stacks are
    not needed, and taking them costs 0.3 s a launch, which a suite of failing tests pays hundreds of times."""
    reported, deadline = {}, time.monotonic() + seconds
    while pending and (left := deadline - time.monotonic()) > 0:
        for conn in wait(list(pending.values()), timeout=left):
            rank = next(r for r, c in pending.items() if c is conn)
            try:
                reported[rank] = pickle.loads(conn.recv_bytes())[0]
            except (EOFError, OSError):
                reported[rank] = "exited"
            del pending[rank]
    return reported


def _end(procs):
    """Leave no process behind: ask politely, then insist."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()


def _die_with_parent():
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the parent's finally-block still ends us
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def _run_rank(rank, world_size, store_path, backend, timeout, fn, args, kwargs, conn):
    _die_with_parent()
    # One write per line, so ranks sharing a pipe never split each other's lines (PYTHONUNBUFFERED splits a print);
    # a partial line (print(..., end="")) waits for its newline: flush=True if the rank may be killed before it
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):  # a notebook kernel's stream: no reconfigure, no need
            stream.reconfigure(line_buffering=True, write_through=False)
    directory = os.path.dirname(store_path)
    flight.start(rank, directory, world_size)  # the flight recorder, mirrored to a file the parent reads
    faulthandler.register(signal.SIGUSR1, open(os.path.join(directory, f"stack-{rank}"), "w"), all_threads=True)
    os.environ.update(OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    # All ranks are on this machine: gloo talks over loopback, whatever the hostname resolves to (or fails to).
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    torch.set_num_threads(1)  # one thread per rank: N ranks share the cores, and forked OpenMP pools can hang
    ok = False
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, store=dist.FileStore(store_path, world_size), rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout),
                                **_eager(backend, rank))
        payload = pickle.dumps(("ok", fn(*args, **kwargs)))
        ok = True
    except BaseException:
        payload = pickle.dumps(("error", traceback.format_exc()))
    try:
        conn.send_bytes(payload)
        conn.close()
        if ok:
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:  # the result is out (or the parent is gone): the parent decides what failed
        pass
    for stream in (sys.stdout, sys.stderr):  # os._exit skips Python's flush: output to a file or pipe would be lost
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(0 if ok else 1)  # skip interpreter teardown, where gloo may abort


def init_from_env(backend: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Initialize the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"not running under torchrun: environment variables {missing} are not set")
    world_size = int(os.environ["WORLD_SIZE"])
    backend = backend or default_backend(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    limit, eager = datetime.timedelta(seconds=timeout), _eager(backend, int(os.environ.get("LOCAL_RANK", 0)))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun shares its rendezvous store with the workers and keeps it across restarts: a restarted worker can
        # read the address a dead peer published in the attempt before ("Connection refused", pytorch issue 135712).
        # Each attempt gets fresh keys, numbered alike on every node (elastic.py: not torchrun's restart count).
        shared = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, False, limit)
        store = attempt_store(shared, int(os.environ["RANK"]), world_size, timeout)
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world_size,
                                timeout=limit, **eager)
    else:
        dist.init_process_group(backend, timeout=limit, **eager)


def _eager(backend: str, local_rank: int) -> dict:
    """NCCL: bind the group to this rank's GPU, which creates its communicator now (and its subgroups' by splitting):
    minidist posts every message as a batch (comm/p2p.py), and a group's first batch must involve all its ranks."""
    return {"device_id": torch.device("cuda", local_rank)} if backend == "nccl" else {}


def run_under_torchrun(fn, *args, backend: str | None = None, timeout: float = DEFAULT_TIMEOUT, **kwargs):
    """Run `fn` on this rank of a torchrun job; the same worker functions launch() runs.

    The flight recorder is mirrored to $MINIDIST_FLIGHT_DIR (default: minidist-flight-RUN_ID in the temporary
    directory, one per torchrun job)/flight-RANK, and the rank's stacks are written next to it when torchrun ends it
    (SIGTERM) or on SIGUSR1: after a hang or a timeout, `python -m minidist diagnose DIR` says why. If `fn` raises,
    the error is said in one line (elastic.report_failure; its traceback goes to DIR/error-RANK.txt) and SystemExit(1)
    is raised."""
    init_from_env(backend, timeout)
    directory = os.environ.get("MINIDIST_FLIGHT_DIR") or os.path.join(
        tempfile.gettempdir(), f"minidist-flight-{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}")
    os.makedirs(directory, exist_ok=True)
    rank = dist.get_rank()
    flight.start(rank, directory, dist.get_world_size())
    stacks = open(os.path.join(directory, f"stack-{rank}"), "w")
    faulthandler.register(signal.SIGUSR1, stacks, all_threads=True)
    faulthandler.register(signal.SIGTERM, stacks, all_threads=True, chain=True)
    try:
        result = fn(*args, **kwargs)  # if it raises, torchrun sees the rank fail and ends the others
    except Exception as e:  # one line (a peer's death), the traceback in the flight directory; exit code 1
        report_failure(e, rank, directory)
        raise SystemExit(1) from None
    dist.barrier()
    dist.destroy_process_group()
    return result
