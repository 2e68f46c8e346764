"""Why are the ranks stuck? The analysis of every rank's flight record (flight.py), in words.

    python -m minidist diagnose DIR        # DIR: $MINIDIST_FLIGHT_DIR of a torchrun job (a failing rank prints it)

For each group, the collectives each rank entered are lined up by sequence number; the first number at which the ranks
disagree is the diagnosis:
  * some ranks entered collective #k and others never did (they skipped it, or are stuck elsewhere: where, is said);
  * the ranks entered different collectives as #k (issued in another order, or another op);
  * the same collective with different sizes or dtypes (a size mismatch; gloo then aborts the receiving rank).
For point-to-point messages, each (source, destination) pair is lined up the same way: a receive with no matching
send is named, with where the would-be sender is; so are two ranks that each wait in a send to the other and posted
their receive from it after that send, not in the same batch (NCCL's rules, strict.py: batch_isend_irecv them). A rank that is in no collective at all is located by its stack.
"""
import os
import re
import signal
import time

from . import flight
from .flight import read_directory


def _describe(e: dict) -> str:
    return f"{e['op']} #{e['seq']} ({e['dtype']}, {e['numel']:,} elements)"


def _ranks(ranks) -> str:
    ranks = sorted(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _group(ranks, world: int) -> str:
    return f"group world {list(ranks)}" if list(ranks) == list(range(world)) else f"group {list(ranks)}"


def where(rank: int, record: dict | None) -> str:
    """Where a rank is: in an unfinished collective or message, else the innermost user frame of its main thread."""
    if record is None:
        return "it left no record"
    pending = [e for e in record["entries"] if not e["completed"]]
    if pending:
        e = pending[-1]
        peer = "" if e["peer"] < 0 else f" {'to' if e['op'] == 'send' else 'from'} rank {e['peer']}"
        return f"it is in {_describe(e)}{peer} on group {e['group']}"
    if not record.get("stack") and record.get("exit"):
        return record["exit"]
    return _stack_location(record.get("stack"))


def _stack_location(stack: str | None) -> str:
    if not stack:
        return "it is in no collective (no stack was taken)"
    threads = re.split(r"\n(?=(?:Current thread|Thread) 0x)", stack.strip())
    main = next((t for t in threads if "_run_rank" in t or "run_under_torchrun" in t), threads[0])
    frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', main)
    entry = next((k for k, f in enumerate(frames) if f[2] in ("_run_rank", "run_under_torchrun")), len(frames))
    above = frames[:entry]  # below the rank's entry point lie the frames a forked rank inherited from its parent
    if entry < len(frames) and all("/torch/" in f[0] for f in above) and any(f[2] == "barrier" for f in above):
        return "it is in no collective: it returned from its function"
    frames = frames[:entry + 1]
    user = [f for f in frames if "/minidist/" not in f[0] and "/lib/python" not in f[0] and "site-packages" not in f[0]]
    if user:
        path, line, func = user[0]
        return f"it is in no collective: its main thread is at {path}:{line} in {func}()"
    return "it is in no collective" + (f": at {frames[0][0]}:{frames[0][1]} in {frames[0][2]}()" if frames else "")


def _collectives(records: dict, world: int) -> list[str]:
    found = []
    groups = {(e.get("group_id", ""), tuple(e["group"])) for r in records.values() if r for e in r["entries"]
              if e["peer"] < 0}
    for gid, ranks in sorted(groups):
        seen = {r: {e["seq"]: e for e in records[r]["entries"]
                    if e["peer"] < 0 and (e.get("group_id", ""), tuple(e["group"])) == (gid, ranks)}
                for r in ranks if records.get(r)}
        last = {r: max(s, default=0) for r, s in seen.items()}
        if len(set(last.values())) == 1 and all(e["completed"] for s in seen.values() for e in s.values()):
            continue
        first = max((min(s) for s in seen.values() if s), default=1)  # older entries may have left the window
        for k in range(first, max(last.values()) + 1):
            at = {r: s[k] for r, s in seen.items() if k in s}
            kinds = {}
            for r, e in at.items():
                kinds.setdefault((e["op"], e["dtype"], e["numel"]), []).append(r)
            missing = [r for r in seen if k not in seen[r]] + [r for r in ranks if r not in seen]
            head = f"{_group(ranks, world)}: "
            if len(kinds) > 1:
                parts = [f"{_ranks(rs)} {'is' if len(rs) == 1 else 'are'} in {_describe(at[rs[0]])}"
                         for rs in sorted(kinds.values(), key=len, reverse=True)]
                ops = {op for op, _, _ in kinds}
                why = "the ranks issued different collectives" if len(ops) > 1 else \
                    "a size mismatch (the same collective with different sizes or dtypes)"
                found.append(head + "; ".join(parts) + f": {why}")
            elif missing:
                (rs,) = kinds.values()
                found.append(head + f"{_ranks(rs)} {'is' if len(rs) == 1 else 'are'} in {_describe(at[rs[0]])}; "
                             + "; ".join(f"rank {r} never entered {at[rs[0]]['op']} #{k} ({where(r, records.get(r))})"
                                         for r in missing))
            elif not all(e["completed"] for e in at.values()):
                stuck = [r for r, e in at.items() if not e["completed"]]
                found.append(head + f"{_ranks(stuck)} did not complete {_describe(at[stuck[0]])}, which every "
                             f"rank entered")
            else:
                continue
            break
    return found


def _messages(records: dict) -> list[str]:
    found = []
    channels = {}
    for r, rec in records.items():
        for e in rec["entries"] if rec else []:
            if e["peer"] >= 0:
                src, dst = (r, e["peer"]) if e["op"] == "send" else (e["peer"], r)
                channels.setdefault((e.get("group_id", ""), src, dst), {"send": {}, "recv": {}})[e["op"]][e["seq"]] = e
    for (_, src, dst), ends in sorted(channels.items()):
        for k in sorted(set(ends["send"]) | set(ends["recv"])):
            s, r = ends["send"].get(k), ends["recv"].get(k)
            if r and not s and not r["completed"] and records.get(src) is not None:
                found.append(f"rank {dst} waits in recv #{k} from rank {src} ({r['dtype']}, {r['numel']:,} elements), "
                             f"which rank {src} never sent (it sent {len(ends['send'])} message(s) to rank {dst}; "
                             f"{where(src, records.get(src))})")
            elif s and not r and not s["completed"] and records.get(dst) is not None:
                found.append(f"rank {src} is in send #{k} to rank {dst}, which rank {dst} never receives "
                             f"({where(dst, records.get(dst))})")
            elif s and r and (s["numel"], s["dtype"]) != (r["numel"], r["dtype"]):
                found.append(f"message #{k} from rank {src} to rank {dst}: a size mismatch, sent {_describe(s)}, "
                             f"received into {_describe(r)}")
            else:
                continue
            break
    return found


def _unbatched(records: dict) -> list[str]:
    """Pairs of ranks deadlocked by NCCL's point-to-point rules (strict.py): each waits in a send to the other and
    posted its receive from the other after that send, outside the send's batch."""
    waits = {}
    for r, rec in records.items():
        pending = [e for e in rec["entries"] if e["peer"] >= 0 and not e["completed"]] if rec else []
        for i, s in enumerate(pending):
            behind = [e for e in pending[i + 1:] if e["op"] == "recv" and e["peer"] == s["peer"]
                      and (s.get("batch", 0) == 0 or e.get("batch", 0) != s.get("batch", 0))]
            if s["op"] == "send" and behind:
                waits.setdefault((r, s["peer"]), (s, behind[0]))
    found = []
    for (r, p), (s, rv) in sorted(waits.items()):
        if r < p and (p, r) in waits:
            s2, rv2 = waits[(p, r)]
            found.append(
                f"ranks {r} and {p} wait for each other: rank {r} waits in send #{s['seq']} to rank {p} "
                f"({s['dtype']}, {s['numel']:,} elements) and posted recv #{rv['seq']} from rank {p} after it; rank {p} "
                f"waits in send #{s2['seq']} to rank {r} ({s2['dtype']}, {s2['numel']:,} elements) and posted recv "
                f"#{rv2['seq']} from rank {r} after it. Under NCCL's point-to-point rules (MINIDIST_STRICT_P2P=1) the "
                f"operations between two ranks run in the order posted and a send completes only when its receive "
                f"runs, so each recv waits behind its own rank's send: the send and the recv must be posted together, "
                f"in one batch_isend_irecv")
    return found


def diagnose(records: dict[int, dict | None], world: int, deaths: dict[int, str] | None = None) -> str:
    """The first disagreement in every group and message channel, or where each rank is when there is none.

    records[r]: rank r's flight record ({"entries", "stack", and optionally "exit": how it ended}); deaths[r]: how a
    rank that was killed died (reported at the end)."""
    records = {r: records.get(r) for r in range(world)}
    found = _collectives(records, world) + (_unbatched(records) or _messages(records))
    if not found:
        found = ["the flight records agree: every rank completed the same collectives"]
        found += [f"rank {r}: {where(r, rec)}" for r, rec in records.items()
                  if rec is not None and r not in (deaths or {})]
    found += [f"rank {r} {how}" for r, how in sorted((deaths or {}).items())]
    return "\n".join(found)


def diagnose_directory(directory) -> str:
    records = read_directory(directory)
    if not records:
        raise ValueError(f"no flight records (flight-RANK files) in {directory}")
    return diagnose(records, max(records) + 1)


def diagnose_ranks(procs, directory, returned: set, raised: set = frozenset()) -> str:
    """launch's diagnosis of its failed ranks (processes `procs`, flight records in `directory`): every rank's flight
    record (ranks still running are asked for their stacks first), analysed. `returned`: the
    ranks whose function returned a result; `raised`: those whose function raised."""
    alive = [r for r, p in enumerate(procs)  # a returned or raised rank's stack is only its teardown
             if p.is_alive() and r not in returned and r not in raised]
    for r in alive:
        try:
            os.kill(procs[r].pid, signal.SIGUSR1)  # faulthandler writes every thread's stack to stack-RANK
        except ProcessLookupError:
            pass
    time.sleep(0.3 if alive else 0)
    deaths, records = {}, {r: flight.read_rank(directory, r) for r in range(len(procs))}
    for r, p in enumerate(procs):
        if not p.is_alive() and p.exitcode is not None and p.exitcode < 0:
            name = signal.Signals(-p.exitcode).name
            deaths[r] = f"died from {name}" + (" (gloo aborts a rank that receives a message of the wrong size)"
                                               if name == "SIGABRT" else "")
        elif r in returned and records[r] is not None:  # (it may still be alive, in launch's closing barrier)
            records[r]["exit"] = "it is in no collective: it returned from its function"
        elif r in raised and records[r] is not None:
            records[r]["exit"] = "it is in no collective: its function raised"
        elif not p.is_alive() and records[r] is not None:
            records[r]["exit"] = f"it is in no collective: it has exited (code {p.exitcode})"
    try:
        text = diagnose(records, len(procs), deaths)
    except Exception as e:  # a diagnosis must never hide the error it explains
        text = f"(no diagnosis: {type(e).__name__}: {e})"
    if text.startswith("the flight records agree") and not deaths:
        return ""  # nothing went wrong between the ranks: the traceback above says it all
    return "\n\nDiagnosis from every rank's flight recorder:\n" + text
