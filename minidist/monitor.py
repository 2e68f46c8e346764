"""Training telemetry: per rank and step, where the time went, what was sent, and which rank holds the others up.

    monitor = Monitor()
    for x, y in batches:
        with monitor.step(tokens=x.numel()):      # or monitor.begin(tokens=...) ... monitor.end()
            ...forward, backward, optimizer step...
    records = monitor.save("run.jsonl")          # collective: every rank's records; rank 0 writes run.jsonl and
                                                 # run.trace.json (open it in Perfetto or chrome://tracing)

Each step record holds, measured on this rank: the step's wall time; the time with communication in flight (the
union of the intervals from entering each collective or message to its completion, read from the flight recorder,
so asynchronous collectives overlapping backward count once; one started before the step and still in flight, a
prefetch, counts from the step's start) and the rest, the time *outside* communication; the bytes sent (the byte
ledger: counted under comm.ring_backend(), else modelled from the formula, and marked so); the tokens and tokens
per second. "Outside communication" is compute and nothing else only when nothing overlaps: computing while an
asynchronous all-reduce is in flight counts as communication time (the flight recorder knows when an operation
started and completed, not when its caller blocked on it). Only what goes through minidist.comm is seen: torch DDP's
and FSDP's own collectives, or a raw torch.distributed call, are invisible; a step of a multi-rank run that records
no collective is reported with a warning, since its "outside communication" time then hides all the waiting. The
flight recorder keeps the last 1024 entries: a step that issues more is marked `truncated` (its comm undercounted).

Stragglers. In synchronous training every rank's step takes as long as the slowest rank's, because the others wait
for it inside the collective: wall step times cannot say who is slow. The time *outside* communication can: the
straggler computes longer and waits less, the others compute as usual and wait longer. `summary` names a rank whose
median time outside communication is more than `factor` (default 2) times the median of the other ranks' *and*
more than `min_seconds` (10 ms) above it: on a shared machine a rank's compute time wanders by tens of percent from
step to step, and a few milliseconds more is timer and scheduler noise; a straggler's excess is larger on both
counts. (Chapter 03's straggler idle share counted the waiting a slow rank causes; here it is found from measurements.)

Exports: JSON lines (one record per rank and step, for pandas or jq) and the Chrome trace event format: one process
track per rank, its steps on one row and its communication on another, on a common clock (time.time() of one
machine; clocks of different machines are only as close as NTP keeps them).
"""
import json
import statistics
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from . import comm
from .comm import flight
from .launch import device, synchronize


def find_stragglers(times: list[float], factor: float = 2.0) -> list[int]:
    """Indices r whose times[r] exceeds `factor` times the median of the *other* entries' times, in index order.

    Graded (tests/test_monitor.py): cases by hand (one straggler, two, none, two ranks, one rank: nobody to compare
    with, so none), the median of an even number of others (the mean of the middle two), and a ValueError when
    factor <= 1 whose message contains the word "factor".
    """
    # <exercise find_stragglers points=2>
    # hint: statistics.median gives the median of any non-empty list, the mean of the middle two for an even count.
    # hint: compare each rank with the others, not with a median that includes itself (think of two ranks).
    if not factor > 1:
        raise ValueError(f"factor must be greater than 1, got {factor!r}")
    slow = []
    for r, t in enumerate(times):
        others = times[:r] + times[r + 1:]
        if others and t > factor * statistics.median(others):
            slow.append(r)
    return slow
    # </exercise>


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals (start <= end), in any order: time covered by several counts once.

    The monitor's communication time: collectives started asynchronously overlap each other and the compute, and a
    second of waiting on two at once is one second. Graded: by hand (none, disjoint, overlapping, one inside another,
    touching, unsorted, empty intervals) and against a count of covered unit cells on random integer intervals.
    """
    # <exercise busy_seconds points=2>
    # hint: in order of start, an interval adds only the part of it past everything seen so far.
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total
    # </exercise>


class Monitor:
    """This rank's step records (see the module docstring). Monitor(enabled=False) records nothing and costs nothing,
    so a training loop can call it unconditionally."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.records, self._open, self._warned = enabled, [], None, False

    def begin(self, tokens: int = 0) -> None:
        if not self.enabled:
            return
        if self._open is not None:
            raise RuntimeError("Monitor.begin() twice: end() the step that is open first")
        synchronize()
        ledger = comm.ByteLedger().__enter__()
        self._open = (ledger, time.time(), tokens)

    def end(self) -> dict | None:
        if not self.enabled:
            return None
        if self._open is None:
            raise RuntimeError("Monitor.end() without a step: call begin() first")
        synchronize()
        stop = time.time()
        (ledger, start, tokens), self._open = self._open, None
        ledger.__exit__(None, None, None)
        recorded = comm.flight_recorder()
        events = [(e["op"], max(e["time"], start), min(e["done"] or stop, stop), e["numel"], e["dtype"])
                  for e in recorded if e["time"] <= stop and (e["done"] is None or e["done"] >= start)]
        seconds = stop - start
        in_flight = busy_seconds([(t0, t1) for _, t0, t1, _, _ in events])
        record = {"rank": dist.get_rank() if dist.is_initialized() else 0, "step": len(self.records),
                  "start": start, "seconds": seconds, "comm_seconds": in_flight,
                  "compute_seconds": seconds - in_flight, "bytes_sent": float(ledger.total_bytes()),
                  "bytes_counted": ledger.counted, "collectives": len(events), "tokens": tokens,
                  "tokens_per_second": tokens / seconds if seconds > 0 else 0.0, "events": events,
                  "truncated": len(recorded) == flight.CAPACITY and recorded[0]["time"] > start}
        self._warn(record)
        self.records.append(record)
        return record

    def _warn(self, record: dict) -> None:
        multi = dist.is_initialized() and dist.get_world_size() > 1
        if multi and record["collectives"] == 0 and not self._warned:
            self._warned = True
            warnings.warn(f"monitor: rank {record['rank']}'s step {record['step']} recorded no collective in a "
                          f"{dist.get_world_size()}-rank run: its communication does not go through minidist.comm "
                          "(torch DDP/FSDP, raw torch.distributed), so its time counts as 'outside comm' and "
                          "stragglers cannot be found", RuntimeWarning, stacklevel=3)
        if record["truncated"]:
            warnings.warn(f"monitor: step {record['step']} issued more than {flight.CAPACITY} collectives: the "
                          "flight recorder kept the last ones only; its communication time is undercounted",
                          RuntimeWarning, stacklevel=3)

    @contextmanager
    def step(self, tokens: int = 0):
        self.begin(tokens)
        try:
            yield
        finally:
            self.end()

    def report(self, path, group=None) -> list[dict] | None:
        """save(path) and print the summary on rank 0 (nothing when disabled): the example script's --monitor."""
        if not self.enabled:
            return None
        records = self.save(path, group)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(format_summary(summary(records)) + f"\nmonitor: {path}, {trace_path(path)}", flush=True)
        return records

    def gather(self, group=None) -> list[dict]:
        """Every rank's records, on every rank (collective: all ranks of `group` call it)."""
        return [r for blob in _all_gather_bytes(json.dumps(self.records).encode(), group) for r in json.loads(blob)]

    def save(self, path, group=None) -> list[dict]:
        """gather(), then on rank 0 write PATH (JSON lines) and PATH with suffix .trace.json (Chrome trace)."""
        records = self.gather(group)
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_jsonl(records, path)
            write_chrome_trace(records, trace_path(path))
        return records


def _all_gather_bytes(data: bytes, group=None) -> list[bytes]:
    """Each rank's bytes on every rank: their lengths all-gathered, then the bytes padded to the longest."""
    if not dist.is_initialized():
        return [data]
    n, dev = comm.group_size(group), device()
    sizes = comm.all_gather_cat(torch.tensor([len(data)], device=dev), group).tolist()     # (n,)
    buf = torch.zeros(max(sizes), dtype=torch.uint8, device=dev)
    buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    every = comm.all_gather_cat(buf, group).view(n, -1).cpu()
    return [every[r, :sizes[r]].numpy().tobytes() for r in range(n)]


def summary(records: list[dict], factor: float = 2.0, min_seconds: float = 0.01) -> dict:
    """Per rank: medians over its steps of step seconds, seconds outside communication ("compute_seconds"), seconds
    with communication in flight and tokens per second (each column its own median: they need not add up), the mean
    bytes per step and whether they were counted; the stragglers by median time outside communication: more than
    `factor` times the others' median, and more than `min_seconds` above it (module docstring)."""
    ranks = sorted({r["rank"] for r in records})
    per = {}
    for rank in ranks:
        mine = [r for r in records if r["rank"] == rank]
        per[rank] = {key: statistics.median(r[key] for r in mine)
                     for key in ("seconds", "compute_seconds", "comm_seconds", "tokens_per_second")}
        per[rank]["bytes_per_step"] = statistics.fmean(r["bytes_sent"] for r in mine)
        per[rank]["bytes_counted"] = all(r.get("bytes_counted", False) for r in mine)
        per[rank]["silent_steps"] = sum(r.get("collectives", 1) == 0 for r in mine)  # no collective recorded
    times = [per[r]["compute_seconds"] for r in ranks]
    slow = [i for i in (find_stragglers(times, factor) if ranks else [])
            if times[i] - statistics.median(times[:i] + times[i + 1:]) > min_seconds]
    return {"ranks": per, "stragglers": [ranks[i] for i in slow]}


def format_summary(info: dict) -> str:
    lines = ["medians over each rank's steps (each column its own median); outside comm = step - comm in flight",
             f"{'rank':>4} {'step ms':>9} {'outside comm ms':>16} {'comm in flight ms':>18} {'bytes/step':>13} "
             f"{'tokens/s':>10}"]
    for rank, s in info["ranks"].items():
        mark = "" if s.get("bytes_counted", True) else "*"
        lines.append(f"{rank:>4} {1e3 * s['seconds']:>9.1f} {1e3 * s['compute_seconds']:>16.1f} "
                     f"{1e3 * s['comm_seconds']:>18.1f} {s['bytes_per_step']:>12,.0f}{mark:1} "
                     f"{s['tokens_per_second']:>10,.0f}")
    if any(not s.get("bytes_counted", True) for s in info["ranks"].values()):
        lines.append("* modelled bytes (the ledger's formula: not run under comm.ring_backend(), nothing counted)")
    silent = [rank for rank, s in info["ranks"].items() if s.get("silent_steps")]
    if len(info["ranks"]) > 1 and silent:
        lines.append(f"warning: ranks {silent} had steps with no collective recorded: their communication is not "
                     "through minidist.comm, so it counts as 'outside comm' and stragglers cannot be found")
        return "\n".join(lines + ["stragglers: unknown (no communication seen)"])
    slow = info["stragglers"]
    lines.append(f"straggler{'s' if len(slow) > 1 else ''}: " + (", ".join(f"rank {r}" for r in slow) if slow
                                                                 else "none"))
    return "\n".join(lines)


def trace_path(path) -> Path:
    return Path(path).with_suffix(".trace.json")


def write_jsonl(records: list[dict], path) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if k != "events"}) + "\n")


def chrome_trace(records: list[dict]) -> dict:
    """The Chrome trace event format: per rank a process ("rank r") with a "steps" and a "communication" row."""
    origin = min((r["start"] for r in records), default=0.0)
    us = lambda t: round((t - origin) * 1e6, 1)  # noqa: E731  (microseconds from the first step)
    events = []
    for rank in sorted({r["rank"] for r in records}):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}})
        for tid, name in ((0, "steps"), (1, "communication")):
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": name}})
    for r in records:
        args = {k: r[k] for k in ("compute_seconds", "comm_seconds", "bytes_sent", "tokens_per_second")}
        events.append({"name": f"step {r['step']}", "cat": "step", "ph": "X", "pid": r["rank"], "tid": 0,
                       "ts": us(r["start"]), "dur": us(r["start"] + r["seconds"]) - us(r["start"]), "args": args})
        for op, t0, t1, numel, dtype in r["events"]:
            events.append({"name": op, "cat": "comm", "ph": "X", "pid": r["rank"], "tid": 1, "ts": us(t0),
                           "dur": us(t1) - us(t0), "args": {"numel": numel, "dtype": dtype}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(records: list[dict], path) -> None:
    with open(path, "w") as f:
        json.dump(chrome_trace(records), f)
