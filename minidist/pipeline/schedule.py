"""Pipeline schedules as plain data: for each pipeline rank, the list of what it computes in one step, in order.

A model is cut into S consecutive *stages* placed on p ranks, and the global batch into m *micro-batches*:

    Action("F", 3)      forward of micro-batch 3 through this rank's stage (receive the activation, compute, send)
    Action("B", 3)      its backward: input and weight gradients, or the input gradient only when the schedule has W
    Action("W", 3)      the weight gradient alone (zero-bubble schedules); it needs nothing from other ranks
    Action("F", 3, 1)   forward of micro-batch 3 through chunk 1 of this rank (interleaving: v chunks per rank,
                        chunk c of rank r is virtual stage c*p + r, as in Megatron-LM: S = v*p)

A schedule can be printed (`grid`), checked (`validate`) and timed (`simulate`) with no processes; pipeline/runtime.py
runs it on ranks. t_f, t_b + t_w: forward, backward time of one micro-batch through one rank's share (t_b the input
gradient, t_w the weights'; a chunk's action takes 1/v of it):

  GPipe (Huang et al. 2019)      all m forwards, then all m backwards. Step time (m + p - 1)(t_f + t_b + t_w): the
                                 p - 1 slots of fill and drain are the *bubble*, (p - 1)/(m + p - 1) of the step.
                                 Every rank holds the activations of all m micro-batches at once.
  1F1B (Narayanan et al. 2019,   rank r runs p - r - 1 warm-up forwards, then alternates one forward and one
  PipeDream-Flush)               backward, then drains. The same step time and bubble as GPipe, but rank r holds
                                 at most p - r micro-batches: memory bounded by p, not m.
  Interleaved 1F1B (Narayanan    v chunks per rank: a micro-batch crosses the ranks v times, each hop 1/v as
  et al. 2021)                   long, so the bubble shrinks v-fold to (p - 1)(t_f + t_b + t_w)/v, a fraction
                                 (p - 1)/(v m + p - 1); it costs (vp - 1)/(p - 1) times the messages (about v),
                                 needs m divisible by p, and rank 0 holds p + (p-1)/v micro-batches (Korthikanti).
  ZB-H1 (Qi et al. 2023)         B computes only the input gradient (what the previous stage waits for), W the
                                 weights' later: in slot x rank r runs F(x), B(x-(p-1-r)), W(x-(p-1)). The Ws fill
                                 the drain: bubble (p-1)(t_f + t_b - t_w), at 1F1B's peak memory (p micro-batches).
  ZB-V (Qi et al. 2024),         2 chunks per rank placed in a V (chunk 0 of rank r is stage r, chunk 1 stage
  DualPipeV (DeepSeek-V3)        2p - 1 - r: actions.py): at t_f = t_b = t_w no idle time inside a rank's span,
                                 the fill of p - 1 chunk forwards per step, 2p chunks held (DualPipeV 2p + 1) and
                                 4 m (p - 1) messages. Built in vshape.py, in torch's action order; a VSchedule.

`validate` assumes asynchronous sends: a schedule deadlocks only if its ranks wait on each other in a cycle. Under
NCCL sends can wait too: pipeline/messages.py orders the messages so that every schedule that validates runs there.
"""
from dataclasses import dataclass
from fractions import Fraction
from itertools import accumulate

from .actions import KINDS, Action, VSchedule, is_v, place, stage_of  # noqa: F401 (re-exported)
from .actions import check_sizes as _check
from .vshape import dualpipe_v, zero_bubble_v  # noqa: F401 (re-exported: every schedule is found here)


def gpipe(p: int, m: int) -> list[list[Action]]:
    """GPipe: on every rank, the m forwards, then the m backwards."""
    _check(p=p, m=m)
    return [[Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)] for _ in range(p)]


def one_f_one_b(p: int, m: int) -> list[list[Action]]:
    """1F1B (PipeDream-Flush) as data: for each rank r, its F and B actions for m micro-batches on p ranks.

    Every rank runs F0 .. F(m-1) and B0 .. B(m-1), each kind in micro-batch order. 1F1B is about memory: a
    micro-batch is *in flight* on a rank from its forward to its backward; rank r holds at most min(p - r, m) in
    flight, runs its next forward whenever that bound allows, and a backward only when the bound (or having no forward
    left) stops it. Graded: the exact list of every rank for any p, m >= 1 (m < p too), and that it validates.
    """
    _check(p=p, m=m)
    schedule = []
    # <exercise one_f_one_b points=3>
    # hint: draw a rank x step grid for p = 4, m = 6: when does the first backward reach rank r, and how many of its
    #       forwards have run by then? The list then has three phases; find where each one starts and ends.
    for r in range(p):
        warmup = min(p - r - 1, m)
        actions = [Action("F", i) for i in range(warmup)]
        for i in range(m - warmup):
            actions += [Action("F", warmup + i), Action("B", i)]
        actions += [Action("B", i) for i in range(m - warmup, m)]
        schedule.append(actions)
    # </exercise>
    return schedule


def interleaved_1f1b(p: int, m: int, v: int = 2) -> list[list[Action]]:
    """Megatron-LM's interleaved 1F1B: v chunks per rank, micro-batches in groups of p through each chunk in turn.

    The k-th forward of a rank is micro-batch (k // (p v)) p + k % p on chunk (k // p) % v; its k-th backward the
    same micro-batch on chunk v - 1 - (k // p) % v. Rank r warms up with 2 (p - r - 1) + (v - 1) p forwards.
    """
    # Then, as in 1F1B: one forward and one backward in turn, then the drain; a warm-up longer than the m v forwards
    # is cut to them. Graded: exact lists by hand, that they validate, the bubble (p - 1)/(v m + p - 1) simulated.
    _check(p=p, m=m, v=v)
    if m % p:
        raise ValueError(f"interleaved 1F1B sends micro-batches through the chunks in groups of p: the number of "
                         f"micro-batches m={m} must be divisible by the number of ranks p={p}")
    if v == 1:  # one chunk is plain 1F1B (Megatron's interleaved warm-up assumes v > 1)
        return one_f_one_b(p, m)
    schedule = []
    # <exercise interleaved_1f1b points=3>
    # hint: a rank's forwards, numbered k = 0 .. m v - 1, sweep p micro-batches through chunk 0, the same p through
    #       chunk 1, ..., then the next p micro-batches; its backwards sweep the same groups, chunks last to first.
    # hint: a warm-up longer than the forwards there are is cut, as 1F1B's is (p = m = 4, v = 2: rank 0).
    def nth(kind: str, k: int) -> Action:
        group, within = divmod(k, p * v)
        chunk = within // p
        return Action(kind, group * p + within % p, chunk if kind == "F" else v - 1 - chunk)
    total = m * v
    for r in range(p):
        warmup = min(2 * (p - r - 1) + (v - 1) * p, total)
        actions = [nth("F", k) for k in range(warmup)]
        for k in range(total - warmup):
            actions += [nth("F", warmup + k), nth("B", k)]
        schedule.append(actions + [nth("B", k) for k in range(total - warmup, total)])
    # </exercise>
    return schedule


def zero_bubble_h1(p: int, m: int) -> list[list[Action]]:
    """ZB-H1 (Qi et al. 2023): in slot x = 0 .. m + p - 2, rank r runs F(x), B(x - (p - 1 - r)), W(x - (p - 1)),
    each only if that micro-batch exists. Every rank holds at most p micro-batches, as rank 0 does under 1F1B."""
    _check(p=p, m=m)
    schedule = []
    for r in range(p):
        slots = ((("F", x), ("B", x - (p - 1 - r)), ("W", x - (p - 1))) for x in range(m + p - 1))
        schedule.append([Action(kind, i) for slot in slots for kind, i in slot if 0 <= i < m])
    return schedule


SCHEDULES = {  # the names the example script, the benchmark and the tour use
    "gpipe": lambda p, m, v: gpipe(p, m),
    "1f1b": lambda p, m, v: one_f_one_b(p, m),
    "interleaved": interleaved_1f1b,
    "zb": lambda p, m, v: zero_bubble_h1(p, m),
    "zbv": lambda p, m, v: zero_bubble_v(p, m),
    "dualpipev": lambda p, m, v: dualpipe_v(p, m),
}


def build(name: str, p: int, m: int, v: int = 2) -> list[list[Action]]:
    """The schedule called `name` (see SCHEDULES); `v` chunks per rank counts only for "interleaved" (the V
    schedules always have 2)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](p, m, v)


def shape(schedule) -> tuple[int, int, int]:
    """(p, m, v) of a schedule: ranks, micro-batches and chunks per rank, read from its actions."""
    if not (isinstance(schedule, (list, tuple)) and schedule and all(isinstance(acts, (list, tuple)) and all(
            isinstance(a, Action) for a in acts) for acts in schedule)):
        raise ValueError("a schedule is a non-empty list with one list of Action per rank")
    if not (actions := [a for rank in schedule for a in rank]):
        raise ValueError("the schedule has no actions")
    return len(schedule), 1 + max(a.microbatch for a in actions), 1 + max(a.chunk for a in actions)


def splits_backward(schedule) -> bool:
    """True when the schedule has W actions: its B computes only the input gradient."""
    return any(a.kind == "W" for rank in schedule for a in rank)


def waits_for(action: Action, rank: int, p: int, stages: int, v_shape: bool = False):  # (rank, Action) or None
    """The (rank, action) on another stage that `action` of `rank` needs first, or None (v_shape: the V placement).

    F of virtual stage s needs the forward of stage s - 1 (its input); B of stage s needs the backward of stage
    s + 1 (the gradient of its output). W and the first forward / last backward need nothing from elsewhere.
    Chunk c of rank r is virtual stage c p + r; with v_shape, rank r holds stages r and 2p - 1 - r. Graded: every
    action of interleaved schedules (p = 2, 3; v = 1, 2, 3) and of the V (p = 2, 3, the turn included) against the
    stages worked out by hand.
    """
    # <exercise waits_for points=2>
    # hint: go from (rank, chunk) to the stage, step one stage along the pipeline, and come back to (rank, chunk);
    #       minidist.pipeline.actions maps both ways between (rank, chunk) and stages, in either placement.
    stage = stage_of(rank, action.chunk, p, v_shape)
    if action.kind == "F" and stage > 0:
        return place(stage - 1, p, v_shape)[0], Action("F", action.microbatch, place(stage - 1, p, v_shape)[1])
    if action.kind == "B" and stage < stages - 1:
        return place(stage + 1, p, v_shape)[0], Action("B", action.microbatch, place(stage + 1, p, v_shape)[1])
    return None
    # </exercise>


def _check_complete(schedule, m: int, v: int) -> bool:
    """Every rank holds F and B of every (micro-batch, chunk) exactly once, and W for all of them or for none."""
    split = splits_backward(schedule)
    expected = {Action(k, i, c) for k in ("FBW" if split else "FB") for i in range(m) for c in range(v)}
    for r, actions in enumerate(schedule):
        seen = set()
        if (twice := next((a for a in actions if a in seen or seen.add(a)), None)) is not None:
            raise ValueError(f"rank {r} runs {twice} twice")
        if missing := sorted(expected - seen, key=lambda a: (a.chunk, a.microbatch, KINDS.index(a.kind))):
            raise ValueError(f"rank {r} never runs {', '.join(map(str, missing[:4]))}: with {m} micro-batches and "
                             f"{v} chunk(s) per rank, every rank runs F and B of each" + (", and W" if split else ""))
    return split


def validate(schedule) -> list[tuple[int, Action]]:
    """Check that `schedule` can run; return all its actions as (rank, action) in an order that runs them.

    A rank that runs some action twice or never runs one is refused before your part (_check_complete, given).
    minidist.pipeline.schedule.waits_for(action, rank, p, p * v, is_v(schedule)) (import both) gives the (rank,
    Action) an action needs first, or None (is_v: the V placement of ZB-V and DualPipeV); sends are asynchronous:
    only receives wait. Graded, messages exactly (str(Action): "F0", "B1.1"):
      - ValueError(f"rank {r} runs {a} before {b}") for a B before the F of its (micro-batch, chunk), or a W before
        its B, on rank r;
      - when ranks wait on each other in a cycle, ValueError("deadlock: " + "; ".join(f"rank {r} waits at {a} for
        rank {q}'s {b}")) over every stuck rank r in rank order, a its next action, (q, b) what it waits for:
        "deadlock: rank 0 waits at B0 for rank 1's B0; rank 1 waits at F1 for rank 0's F1";
      - otherwise the list: every (rank, action) once, each rank's in its own order, each after what it waits for;
        and the schedule left unchanged.
    """
    p, m, v = shape(schedule)
    _check_complete(schedule, m, v)
    # <exercise validate points=3>
    # hint: first, on each rank, note the position of every action; F, B, W of a (micro-batch, chunk) must rise.
    # hint: then play the step: each rank advances through its list while what the next action waits_for is done.
    # hint: when a full pass over the ranks advances nobody and some lists are unfinished, that is a deadlock.
    for r, actions in enumerate(schedule):
        position = {a: k for k, a in enumerate(actions)}
        for a in actions:
            before = {"B": "F", "W": "B"}.get(a.kind)
            if before and position[Action(before, a.microbatch, a.chunk)] > position[a]:
                raise ValueError(f"rank {r} runs {a} before {Action(before, a.microbatch, a.chunk)}")
    done, order, next_, progress = set(), [], [0] * p, True
    while progress:
        progress = False
        for r in range(p):
            while next_[r] < len(schedule[r]):
                a = schedule[r][next_[r]]
                needed = waits_for(a, r, p, p * v, is_v(schedule))
                if needed is not None and needed not in done:
                    break
                done.add((r, a))
                order.append((r, a))
                next_[r] += 1
                progress = True
    stuck = [(r, schedule[r][next_[r]]) for r in range(p) if next_[r] < len(schedule[r])]
    if stuck:
        raise ValueError("deadlock: " + "; ".join(
            f"rank {r} waits at {a} for rank %d's %s" % waits_for(a, r, p, p * v, is_v(schedule)) for r, a in stuck))
    # </exercise>
    return order


@dataclass
class Simulation:
    """What `simulate` found: per rank, each action with its start and end time."""
    timeline: list[list[tuple[Action, Fraction, Fraction]]]
    makespan: Fraction

    @property
    def busy(self) -> list[Fraction]:
        return [sum((end - start for _, start, end in events), Fraction(0)) for events in self.timeline]

    @property
    def bubble(self) -> Fraction:  # the idle share of the step, over all ranks: 1 - busy / (p * step time)
        return 1 - sum(self.busy) / (len(self.timeline) * self.makespan)


def _play(schedule, cost: dict) -> Simulation:
    """Every action starts when its rank is free and what it waits for has ended, and lasts cost[kind]."""
    p, _, v = shape(schedule)
    timeline, end, free = [[] for _ in range(p)], {}, [Fraction(0)] * p
    for r, a in validate(schedule):
        needed = waits_for(a, r, p, p * v, is_v(schedule))
        start = max(free[r], end[needed] if needed else Fraction(0))
        end[(r, a)] = free[r] = start + cost[a.kind]
        timeline[r].append((a, start, free[r]))
    return Simulation(timeline, max(free))


def simulate(schedule, t_f=1, t_b=1, t_w=0) -> Simulation:
    """Time `schedule` with no communication cost: t_f, t_b, t_w are the forward, input-gradient and weight-gradient
    times of one micro-batch through one rank's whole share of the model; an action on one of v chunks takes 1/v of
    it; in a schedule without W, B computes both gradients and takes t_b + t_w. Times are exact Fractions."""
    p, _, v = shape(schedule)
    split = splits_backward(schedule)
    t_f, t_b, t_w = (Fraction(t) for t in (t_f, t_b, t_w))
    if min(t_f, t_b, t_w) < 0:
        raise ValueError(f"times must be non-negative, got t_f={t_f}, t_b={t_b}, t_w={t_w}")
    return _play(schedule, {"F": t_f / v, "B": (t_b if split else t_b + t_w) / v, "W": t_w / v})


def peak_in_flight(schedule) -> list[int]:
    """Per rank, the most (micro-batch, chunk) pairs whose activations are alive at once: from an F until the
    backward that frees them (W when the schedule has W, else B)."""
    freed = "W" if splits_backward(schedule) else "B"
    return [max([0, *accumulate(1 if a.kind == "F" else -(a.kind == freed) for a in actions)]) for actions in schedule]


def grid(schedule) -> str:
    """The schedule as text: one line per time step, one column per rank, every action one step long."""
    timeline = _play(schedule, {"F": 1, "B": 1, "W": 1}).timeline
    cells = {(r, int(start)): str(a) for r, events in enumerate(timeline) for a, start, _ in events}
    steps = max(int(end) for events in timeline for *_, end in events)
    width = max(8, *(len(c) + 2 for c in cells.values()))
    lines = ["step" + "".join(f"{'rank ' + str(r):>{width}}" for r in range(len(timeline)))]
    for t in range(steps):
        lines.append(f"{t:>4}" + "".join(f"{cells.get((r, t), '.'):>{width}}" for r in range(len(timeline))))
    return "\n".join(lines)
