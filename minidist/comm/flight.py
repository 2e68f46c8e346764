"""The flight recorder: the last collectives and messages each rank entered, and a diagnosis when ranks hang.

The most expensive failure in distributed training is not a crash but a hang: one rank skips a collective, issues
two in another order, or calls one with another size, and every rank waits until a timeout that says nothing about
why. So every collective and point-to-point message minidist issues (collectives.py, p2p.py, and the ring steps of
ring.py called directly) appends one small entry here: its sequence number on its group (or, for a message,
on its (source, destination) pair), the op, dtype and shape, and whether it completed. No tensor is copied.

When a rank runs under `minidist.launch`, the entries are mirrored into a small memory-mapped file, so they survive
even a rank that gloo aborts (a size mismatch ends the receiving process with SIGABRT); a rank asked with SIGUSR1
dumps every thread's stack next to it (faulthandler, which works while the main thread is blocked inside a C++
collective). When a rank fails, `launch` reads every rank's file and `diagnose` names the first disagreement: which
ranks are in which collective, who never entered it, who issued a different one, whose sizes differ, which message
was never sent, and where a rank that is in no collective at all is stuck. Under torchrun the files are written to
$MINIDIST_FLIGHT_DIR (default: a directory per job in the temporary directory, which a failing rank prints), and
`python -m minidist diagnose DIR` prints the analysis.
"""
import collections
import json
import mmap
import os
import struct
import threading
import time
from pathlib import Path

import torch.distributed as dist

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "send", "recv", "ring_step")
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool", "other")
RECORD = struct.Struct("<qiibbbxxxqdq")  # seq, group id, peer, op, dtype, state, (pad), numel, time, batch
HEADER = struct.Struct("<q")             # entries written so far
CAPACITY = 1024
ENTERED, COMPLETED = 1, 2


class Entry:
    __slots__ = ("seq", "group", "gid", "peer", "op", "dtype", "numel", "state", "time", "slot", "done", "batch")

    def as_dict(self) -> dict:
        return {"seq": self.seq, "group": list(self.group), "group_id": _table[self.gid][0], "peer": self.peer,
                "op": self.op, "dtype": self.dtype, "numel": self.numel, "completed": self.state == COMPLETED,
                "time": self.time, "done": self.done, "batch": self.batch}


_entries: collections.deque = collections.deque(maxlen=CAPACITY)
_seq: dict = {}
_groups: dict = {}       # id(group) -> (global ranks, index in the group table)
_table: list = []        # index -> (group id, the same on every rank; global ranks)
_file = {"map": None, "dir": None, "rank": None, "count": 0}
_lock = threading.Lock()  # under the ring backend, messages are recorded from the communication thread too
_batches = [0]


def new_batch() -> int:
    """A number for the messages of one batch_isend_irecv (0: a message posted alone)."""
    with _lock:
        _batches[0] += 1
        return _batches[0]


def start(rank: int, directory: str, world_size: int | None = None) -> None:
    """Mirror this rank's entries into DIRECTORY/flight-RANK (and its group table into groups-RANK.json); forget
    whatever this process recorded before (a forked rank inherits its parent's memory)."""
    path = Path(directory) / f"flight-{rank}"
    with open(path, "wb") as f:
        f.write(b"\0" * (HEADER.size + CAPACITY * RECORD.size))
    with open(path, "r+b") as f:
        _file.update(map=mmap.mmap(f.fileno(), 0), dir=Path(directory), rank=rank, count=0)
    if world_size is not None:
        (Path(directory) / "world-size").write_text(str(world_size))
    _entries.clear()
    _seq.clear()
    _table.clear()
    _groups.clear()


def _group(group) -> tuple[tuple, int]:
    key = id(group)
    if key not in _groups:
        if group is None or group is dist.group.WORLD:
            name, ranks = "world", tuple(range(dist.get_world_size()))
        else:  # process groups are created in the same order on every rank: their names agree across ranks
            name, ranks = str(getattr(group, "group_name", key)), tuple(dist.get_process_group_ranks(group))
        _table.append((name, ranks))
        _groups[key] = (ranks, len(_table) - 1)
        if _file["map"] is not None:
            (_file["dir"] / f"groups-{_file['rank']}.json").write_text(json.dumps(_table))
    return _groups[key]


ENABLED = os.environ.get("MINIDIST_FLIGHT_RECORDER", "1") != "0"  # 0: off (to measure what it costs)


def enter(op: str, tensor, group=None, peer: int | None = None, batch: int = 0) -> Entry | None:
    """Record that this rank entered `op` on `tensor`; for a message, `peer` is the other end (global rank) and
    `batch` the batch it was posted in (new_batch(); 0 if alone)."""
    if not ENABLED:
        return None
    with _lock:
        return _enter(op, tensor, group, peer, batch)


def _enter(op, tensor, group, peer, batch) -> Entry:
    ranks, gid = _group(group)
    me = dist.get_rank()
    key = (gid, "coll") if peer is None else (gid, me, peer) if op == "send" else (gid, peer, me)
    e = Entry()
    e.seq = _seq[key] = _seq.get(key, 0) + 1
    e.gid, e.group, e.peer, e.op, e.numel, e.state, e.time = gid, ranks, -1 if peer is None else peer, op, \
        tensor.numel(), ENTERED, time.time()
    e.batch = batch
    e.done = None  # time.time() when it completed (in this process only: the file keeps the state, not the time)
    e.dtype = str(tensor.dtype).removeprefix("torch.")
    _entries.append(e)
    m = _file["map"]
    if m is not None:
        e.slot = _file["count"]  # its position in the stream of entries (written at slot % CAPACITY)
        _file["count"] += 1
        _write(e)
        HEADER.pack_into(m, 0, _file["count"])
    return e


def _write(e: Entry) -> None:
    dtype = DTYPES.index(e.dtype) if e.dtype in DTYPES else len(DTYPES) - 1
    RECORD.pack_into(_file["map"], HEADER.size + e.slot % CAPACITY * RECORD.size, e.seq, e.gid, e.peer,
                     OPS.index(e.op), dtype, e.state, e.numel, e.time, e.batch)


def complete(e: Entry | None) -> None:
    if e is None or e.state == COMPLETED:
        return
    e.state, e.done = COMPLETED, time.time()
    if _file["map"] is not None and _file["count"] - e.slot <= CAPACITY:  # not yet overwritten by newer entries
        _write(e)


def flight_recorder() -> list[dict]:
    """This rank's recorded entries, oldest first (at most the last CAPACITY)."""
    return [e.as_dict() for e in _entries]


def read_rank(directory, rank: int) -> dict | None:
    """What rank `rank` left in `directory`: {"entries": [...], "stack": text or None}, or None if nothing."""
    directory = Path(directory)
    path, groups = directory / f"flight-{rank}", directory / f"groups-{rank}.json"
    if not path.exists():
        return None
    data = path.read_bytes()
    count = HEADER.unpack_from(data, 0)[0]
    table = json.loads(groups.read_text()) if groups.exists() else []
    entries = []
    for k in range(max(0, count - CAPACITY), count):
        seq, gid, peer, op, dtype, state, numel, t, batch = RECORD.unpack_from(data, HEADER.size + k % CAPACITY * RECORD.size)
        name, ranks = table[gid] if gid < len(table) else ("?", [])
        entries.append({"seq": seq, "group": ranks, "group_id": name, "peer": peer, "op": OPS[op],
                        "dtype": DTYPES[dtype], "numel": numel, "completed": state == COMPLETED, "time": t,
                        "batch": batch})
    stack = directory / f"stack-{rank}"
    return {"entries": entries, "stack": stack.read_text() if stack.exists() else None}


def read_directory(directory) -> dict[int, dict]:
    """Every rank's record in `directory` (as written under launch or torchrun): ranks 0..world size - 1 when the
    directory says its world size (a reused directory may hold more files, from an earlier and larger job)."""
    directory = Path(directory)
    ranks = sorted(int(p.name.split("-")[1]) for p in directory.glob("flight-*"))
    if (directory / "world-size").exists():
        ranks = [r for r in ranks if r < int((directory / "world-size").read_text())]
    return {r: read_rank(directory, r) for r in ranks}
