"""The byte ledger: a record of every collective and point-to-point message minidist issues on this rank.

    with ByteLedger() as ledger:
        ...train one step...
    ledger.total_bytes("all_reduce", axis="dp")   # bytes this rank sent in data-parallel all-reduces

Each CommRecord says whether its bytes were *counted* or *modelled*:

  counted   minidist moved the bytes itself, with its own send/recv (the ring collectives of `ring.py`, every
            point-to-point send, and every collective issued inside `with comm.ring_backend():`): the record holds
            the bytes this rank really handed to the network.
  modelled  the collective was handed to the backend (gloo, NCCL), whose algorithm minidist cannot see: the record
            holds what the bandwidth-optimal ring would send, with S the bytes of the full (unsharded) tensor and
            N the group size:
                all_reduce  2 (N-1)/N * S     all_gather, reduce_scatter, all_to_all, broadcast  (N-1)/N * S
            When N does not divide S these are fractions (the mean over ranks of what each sends); they are kept as
            exact `Fraction`s so sums over many collectives equal their formula exactly.

A check that compares modelled bytes with the formula only checks the formula against itself; evidence comes from
counted runs. Each record also names the mesh axis of its group ("dp", "tp", ...; "world" for the default group), so
a tensor-parallel all-reduce and a data-parallel all-reduce of the same size are told apart.
"""
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import torch

RING_FACTOR = {  # bytes sent per rank, as a multiple of (N-1)/N * S
    "all_reduce": 2, "all_gather": 1, "reduce_scatter": 1, "broadcast": 1, "all_to_all": 1,
}


@dataclass(frozen=True)
class CommRecord:
    op: str
    group_size: int
    dtype: torch.dtype
    numel: int               # elements of the full tensor (S / element size); of the message for send/recv
    bytes_sent: Fraction     # by this rank: an int when counted, the ring model's Fraction when modelled
    counted: bool = False    # True: bytes really sent by minidist's own send/recv; False: the ring formula
    axis: str | None = None  # the group's mesh axis ("dp", "tp", ...), "world" for the default group


class ByteLedger:
    """Context manager collecting a CommRecord for every collective this rank issues through minidist.

    Ledgers nest (every open ledger sees every record); entering the same ledger twice does not count twice.
    """

    _active: list["ByteLedger"] = []  # ledgers currently open

    def __init__(self):
        self.records: list[CommRecord] = []
        self._depth = 0

    def __enter__(self):
        if self._depth == 0:
            ByteLedger._active.append(self)
        self._depth += 1
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            ByteLedger._active.remove(self)

    def _select(self, op, axis):
        return [r for r in self.records if (op is None or r.op == op) and (axis is None or r.axis == axis)]

    def total_bytes(self, op: str | None = None, axis: str | None = None) -> Fraction:
        return sum((r.bytes_sent for r in self._select(op, axis)), Fraction(0))

    def count(self, op: str | None = None, axis: str | None = None) -> int:
        return len(self._select(op, axis))

    @property
    def counted(self) -> bool:
        """True when there are records and every one holds bytes really sent (none modelled). An empty ledger is not
        evidence of anything: communication that bypassed minidist.comm leaves no record at all."""
        return bool(self.records) and all(r.counted for r in self.records)

    def by_op(self) -> dict[str, tuple[int, Fraction]]:
        """op -> (number of calls, bytes sent)."""
        return {op: (self.count(op), self.total_bytes(op)) for op in dict.fromkeys(r.op for r in self.records)}

    def table(self) -> str:
        """One row per (op, axis), sorted by axis then op: the same table on every run (point-to-point messages under
        the ring backend are recorded from its thread, so the records' own order varies)."""
        lines = [f"{'op':<16}{'axis':<7}{'calls':>7}{'bytes sent':>16}  kind"]
        keys = sorted({(r.op, r.axis) for r in self.records}, key=lambda k: (k[1] or "", k[0]))
        for op, axis in keys:
            rs = [r for r in self.records if r.op == op and r.axis == axis]
            kind = "counted" if all(r.counted for r in rs) else "modelled" if not any(r.counted for r in rs) \
                else "mixed"
            lines.append(f"{op:<16}{axis or '-':<7}{len(rs):>7}{float(sum(r.bytes_sent for r in rs)):>16,.0f}"
                         f"  {kind}")
        return "\n".join(lines)


def ring_bytes(op: str, nbytes: int, group_size: int) -> Fraction:
    """Bytes one rank sends for `op` on a full tensor of `nbytes` under the ring algorithm (see the module table)."""
    if op in ("send", "recv"):
        return Fraction(nbytes if op == "send" else 0)
    return Fraction(RING_FACTOR[op] * (group_size - 1) * nbytes, group_size)


# Group names: Mesh.build names the groups it creates, so every record can say which axis it belongs to.
_GROUP_NAMES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_NAMES_BY_ID: dict[int, str] = {}  # fallback for group objects that cannot be weakly referenced


def name_group(group, name: str) -> None:
    """Remember `name` (a mesh axis) for `group`; records of its collectives carry it."""
    try:
        _GROUP_NAMES[group] = name
    except TypeError:
        _NAMES_BY_ID[id(group)] = name


def group_name(group) -> str | None:
    import torch.distributed as dist
    if group is None or group is dist.group.WORLD:
        return "world"
    try:
        return _GROUP_NAMES.get(group) or _NAMES_BY_ID.get(id(group))
    except TypeError:
        return _NAMES_BY_ID.get(id(group))


_local = threading.local()  # per thread: open counts, and the ledgers an asynchronous collective reports to


def open_ledgers() -> list[ByteLedger]:
    """The ledgers a record made now goes to (for a collective run on the communication thread: those open when it
    was issued)."""
    captured = getattr(_local, "ledgers", None)
    return list(ByteLedger._active) if captured is None else captured


@contextmanager
def reporting_to(ledgers: list[ByteLedger]):
    """Inside, records go to `ledgers` (captured when an asynchronous collective was issued), not the open ones."""
    previous, _local.ledgers = getattr(_local, "ledgers", None), ledgers
    try:
        yield
    finally:
        _local.ledgers = previous


def record(op: str, tensor: torch.Tensor, group_size: int, bytes_sent=None, *, counted: bool = False,
           group=None) -> None:
    """Add a record to every open ledger; `bytes_sent` defaults to the ring model for the full `tensor`."""
    ledgers = open_ledgers()
    if not ledgers:
        return
    if bytes_sent is None:
        bytes_sent = ring_bytes(op, tensor.numel() * tensor.element_size(), group_size)
    rec = CommRecord(op, group_size, tensor.dtype, tensor.numel(), bytes_sent, counted, group_name(group))
    for ledger in ledgers:
        ledger.records.append(rec)


@contextmanager
def counting(op: str, tensor: torch.Tensor, group=None, group_size: int = 1):
    """Count the bytes of one collective built from sends: `with counting("all_reduce", x, group, n): ...sends...`.

    Every `count_send` inside adds to the innermost open count; when the outermost one closes, one counted record
    holds their sum. So a ring all-reduce built from a reduce-scatter and an all-gather is one record, not 2(N-1).
    """
    stack = _local.__dict__.setdefault("open", [])
    stack.append(0)
    try:
        yield
    finally:
        sent = stack.pop()
        if stack:  # nested inside a larger collective: its record holds these bytes
            stack[-1] += sent
        else:
            record(op, tensor, group_size, sent, counted=True, group=group)


def count_send(tensor: torch.Tensor, group, group_size: int) -> None:
    """A message of `tensor` leaves this rank: part of the open collective, or a record of its own."""
    nbytes = tensor.numel() * tensor.element_size()
    stack = _local.__dict__.setdefault("open", [])
    if stack:
        stack[-1] += nbytes
    else:
        record("send", tensor, group_size, nbytes, counted=True, group=group)


def in_counted_collective() -> bool:
    """True inside a collective minidist is counting (its sends are steps of that collective, not messages)."""
    return bool(_local.__dict__.get("open"))


def count_recv(tensor: torch.Tensor, group, group_size: int) -> None:
    """A message arrives: recorded (0 bytes sent) unless it is a step of a collective being counted."""
    if not _local.__dict__.get("open"):
        record("recv", tensor, group_size, 0, counted=True, group=group)
