"""V-shaped schedules: two chunks per rank, chunk 0 of rank r is stage r, chunk 1 is stage 2p - 1 - r (actions.py).

Both are written as a rank's *order of work*, by chunk, and numbered afterwards: the k-th "F1" of a rank is the
forward of micro-batch k through its chunk 1, and so on, so each phase reads as the papers draw it. A W runs the
weight gradient of the oldest backward whose W is still pending (of the chunk named, or of either one).

ZB-V (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024, section 6). Rank r warms up with 2(p-r) - 1
forwards of chunk 0, then r pairs (F1 F0), then p - r triples (F1 B1 W1); the steady state repeats
F0 B0 W0 F1 B1 W1; the cool-down runs the last backwards, leaving the pending Ws for the end. The paper's claim,
for t_f = t_b = t_w: zero bubble, no idle time between a rank's first and last action (in one step with a common
start and end the V's fill remains: p - 1 chunk forwards per rank, tour/vpipeline.py), at 1F1B's peak memory: rank
r holds at most 2p chunk-activations, p micro-batches' worth (each chunk is half a rank's layers).
For m < 2p - 1 the order is the one for 2p - 1 micro-batches with the missing ones left out (as torch does).

DualPipeV (DeepSeek-V3 report, 2024; the V form of DualPipe, deepseek-ai/DualPipe). Needs m >= 2p. Rank r: F0 on
2(p-r-1) micro-batches, r + 1 pairs (F0 F1), p-r-1 triples (B1 W F1), then the main phase of *overlapped pairs*: the
forward of one chunk with the full backward of the other, F0&b1 then F1&b0, m - 2p + r + 1 times; p-r-1 times b1,
F1&b0; then the last backwards, which switch to B (W deferred) half-way, the deferred Ws filling the drain.
Here b is a full backward, written as B immediately followed by W of the same micro-batch (one backward, cut where
the runtime can cut it), and an overlapped pair F&b is the F then the b, back to back. On a GPU DualPipe runs the
pair's two computations on one device at once so that each one's communication (MoE all-to-all, pipeline messages)
hides behind the other's compute. On CPU the runtime cannot run two computations at once: what overlaps is only
what overlaps in every schedule here, the pair's messages in flight while a computation runs; its compute is serial.
Bubble: the DualPipe README (and DeepSeek-V3's table 2) gives (PP/2 - 1)(F&B + B - 3W) with PP = 2p stages, F one
chunk's forward, B its *full* backward (input and weight gradients), W the weight part alone and F&B the time of an
overlapped pair, less than F + B when the two really run at once on a GPU. It is not what runs here: with serial
pairs (F&B = F + B) and equal times t for F, the input backward and W of a chunk, the formula says 2(p - 1) t of idle
per rank, the simulation of this schedule (p - 1) t, ZB-V's (tests/test_pipeline_v.py). Peak activations: PP + 1 =
2p + 1 chunks.
"""
from .actions import Action, VSchedule, check_sizes


def _numbered(order: list[tuple[str, int | None]], m: int) -> list[Action]:
    """A rank's order of work as Actions: ("F", c) and ("B", c) the next micro-batch of chunk c, ("b", c) a full
    backward (B then its W at once), ("W", c) the W of chunk c's oldest pending B, ("W", None) of the oldest one.
    Micro-batches >= m are left out."""
    count, pending, actions = {}, [], []

    def emit(kind, microbatch, chunk):
        if microbatch < m:
            actions.append(Action(kind, microbatch, chunk))

    for kind, chunk in order:
        if kind == "W":
            k = next(j for j, (c, _) in enumerate(pending) if chunk is None or c == chunk)
            emit("W", pending[k][1], pending.pop(k)[0])
            continue
        key = ("F" if kind == "F" else "B", chunk)
        count[key] = i = count.get(key, 0) + 1
        emit(key[0], i - 1, chunk)
        if kind == "b":
            emit("W", i - 1, chunk)
        elif kind == "B":
            pending.append((chunk, i - 1))
    return actions


def _times(n: int, *tokens: str) -> list[tuple[str, int | None]]:
    """'F0', 'b1', 'W' ... repeated n times as (kind, chunk) pairs."""
    return [(t[0], int(t[1:]) if t[1:] else None) for _ in range(max(n, 0)) for t in tokens]


def zero_bubble_v(p: int, m: int) -> VSchedule:
    """ZB-V: per rank, 3 m actions on each of its two chunks, in the V placement (see the module docstring)."""
    check_sizes(p=p, m=m)
    n, schedule = max(m, 2 * p - 1), VSchedule()
    for r in range(p):
        order = (_times(2 * (p - r) - 1, "F0") + _times(r, "F1", "F0") + _times(p - r, "F1", "B1", "W1")
                 + _times(n - 2 * p + r + 1, "F0", "B0", "W0", "F1", "B1", "W1")
                 + _times(p - r - 1, "B0", "W0", "F1", "B1", "W1")
                 + _times(r, "B0", "B1") + _times(p - r, "B0", "W0") + _times(r, "W1") + _times(r, "W0"))
        schedule.append(_numbered(order, m))
    return schedule


def dualpipe_v(p: int, m: int) -> VSchedule:
    """DualPipeV: per rank, 3 m actions on each of its two chunks, in the V placement (see the module docstring)."""
    check_sizes(p=p, m=m)
    if m < 2 * p:
        raise ValueError(f"DualPipeV needs at least as many micro-batches as stages: m={m} < 2p = {2 * p}")
    schedule = VSchedule()
    for r in range(p):
        order = (_times(2 * (p - r - 1), "F0") + _times(r + 1, "F0", "F1") + _times(p - r - 1, "B1", "W", "F1")
                 + _times(m - 2 * p + r + 1, "F0", "b1", "F1", "b0") + _times(p - r - 1, "b1", "F1", "b0"))
        half, deferred = (r + 1) // 2, False   # the last backwards: full ones, then B with W deferred
        for i in range(r + 1):
            deferred |= i == half and r % 2 == 1
            order += [("B" if deferred else "b", 1)]
            deferred |= i == half and r % 2 == 0
            order += [("B" if deferred else "b", 0)]
        order += _times(p - r - 1, "W", "B0") + _times(r + 1, "W")
        schedule.append(_numbered(order, m))
    return schedule
