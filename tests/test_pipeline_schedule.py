"""Pipeline schedules as data, with no processes: exact lists derived by hand, the validator, the simulator against the
papers' closed forms (property tests over p, m, v and the times), the message plan under NCCL's rules, clear errors."""
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidist.grading import implementation
from minidist.pipeline.messages import Batch, Op, plan, play, received_by, sent_by
from minidist.pipeline.schedule import (Action, build, gpipe, grid, interleaved_1f1b, one_f_one_b,
                                        peak_in_flight, shape, simulate, validate, waits_for, zero_bubble_h1)


def parse(text: str) -> list[Action]:
    """'F0 F1 B0.1' -> [Action("F", 0), Action("F", 1), Action("B", 0, 1)]"""
    out = []
    for word in text.split():
        mb, _, chunk = word[1:].partition(".")
        out.append(Action(word[0], int(mb), int(chunk or 0)))
    return out


ONE_F_ONE_B_BY_HAND = {  # derived on paper: rank r warms up with min(p - r - 1, m) forwards
    (3, 4): ["F0 F1 F2 B0 F3 B1 B2 B3", "F0 F1 B0 F2 B1 F3 B2 B3", "F0 B0 F1 B1 F2 B2 F3 B3"],
    (4, 2): ["F0 F1 B0 B1", "F0 F1 B0 B1", "F0 F1 B0 B1", "F0 B0 F1 B1"],
    (3, 1): ["F0 B0", "F0 B0", "F0 B0"],
    (1, 3): ["F0 B0 F1 B1 F2 B2"],
    (2, 5): ["F0 F1 B0 F2 B1 F3 B2 F4 B3 B4", "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4"],
}


@pytest.mark.exercise("one_f_one_b")
@pytest.mark.parametrize("p, m", list(ONE_F_ONE_B_BY_HAND))
def test_one_f_one_b_by_hand(p, m):
    assert implementation("one_f_one_b")(p, m) == [parse(r) for r in ONE_F_ONE_B_BY_HAND[p, m]]


@pytest.mark.exercise("one_f_one_b")
@given(p=st.integers(1, 6), m=st.integers(1, 14))
@settings(max_examples=40, deadline=None)
def test_one_f_one_b_validates_and_bounds_memory_by_p(p, m):
    schedule = implementation("one_f_one_b")(p, m)
    validate(schedule)
    assert peak_in_flight(schedule) == [min(p - r, m) for r in range(p)]
    assert simulate(schedule, 2, 3).makespan == (m + p - 1) * 5   # the same step time as GPipe


def test_gpipe_interleaved_and_zero_bubble_by_hand():
    assert gpipe(2, 2) == [parse("F0 F1 B0 B1")] * 2
    # Megatron's order: micro-batches in groups of p through chunk 0, then chunk 1; rank r warms up with
    # 2 (p - r - 1) + (v - 1) p forwards; backwards visit the chunks in reverse.
    assert interleaved_1f1b(2, 4, 2) == [
        parse("F0 F1 F0.1 F1.1 F2 B0.1 F3 B1.1 F2.1 B0 F3.1 B1 B2.1 B3.1 B2 B3"),
        parse("F0 F1 F0.1 B0.1 F1.1 B1.1 F2 B0 F3 B1 F2.1 B2.1 F3.1 B3.1 B2 B3")]
    # Slot x runs F(x), B(x - (p - 1 - r)), W(x - (p - 1)).
    assert zero_bubble_h1(2, 3) == [parse("F0 F1 B0 W0 F2 B1 W1 B2 W2"), parse("F0 B0 F1 B1 W0 F2 B2 W1 W2")]
    assert interleaved_1f1b(3, 6, 1) == one_f_one_b(3, 6)


def test_grid_prints_steps_by_ranks():
    assert grid(gpipe(2, 2)) == "\n".join([
        "step  rank 0  rank 1",
        "   0      F0       .",
        "   1      F1      F0",
        "   2       .      F1",
        "   3       .      B0",
        "   4      B0      B1",
        "   5      B1       ."])
    assert "  F1.1" in grid(interleaved_1f1b(2, 2, 2))


@pytest.mark.exercise("validate")
@pytest.mark.parametrize("name, p, m, v", [("gpipe", 3, 5, 1), ("1f1b", 4, 2, 1), ("interleaved", 2, 4, 3),
                                           ("zb", 3, 4, 1), ("1f1b", 1, 1, 1)])
def test_validate_returns_a_runnable_order(name, p, m, v):
    schedule = build(name, p, m, v)
    copy = [list(r) for r in schedule]
    order = implementation("validate")(schedule)
    assert schedule == copy
    assert sorted(order, key=str) == sorted(((r, a) for r, acts in enumerate(schedule) for a in acts), key=str)
    for r in range(p):
        assert [a for rank, a in order if rank == r] == schedule[r]
    position = {item: k for k, item in enumerate(order)}
    for item, k in position.items():
        needed = waits_for(item[1], item[0], p, p * v)
        assert needed is None or position[needed] < k


ORDER_AND_DEADLOCK = [
    ([parse("F0 B0 F1 B1"), parse("F1 B1 F0 B0")], r"deadlock: rank 0 waits at B0 for rank 1's B0; rank 1 waits "
                                                    r"at F1 for rank 0's F1"),
    ([parse("F0 B0"), parse("B0 F0")], "rank 1 runs B0 before F0"),
    ([parse("F0 B0 W0"), parse("F0 W0 B0")], "rank 1 runs W0 before B0"),
    ([parse("F0 F0.1 B0.1 B0"), parse("F0.1 F0 B0 B0.1")], "deadlock"),
]


@pytest.mark.exercise("validate")
@pytest.mark.parametrize("schedule, message", ORDER_AND_DEADLOCK)
def test_validate_names_the_problem(schedule, message):
    with pytest.raises(ValueError, match=message):
        implementation("validate")(schedule)


@pytest.mark.parametrize("schedule, message", [   # found before the exercise's part of validate runs
    ([parse("F0 B0 F0"), parse("F0 B0")], "rank 0 runs F0 twice"),
    ([parse("F0 B0 F1 B1"), parse("F0 B0")], "rank 1 never runs F1, B1"),
    ([parse("F0 B0 W0"), parse("F0 B0")], "rank 1 never runs W0"),
    ([], "non-empty list"),
    ([[]], "no actions"),
])
def test_validate_refuses_incomplete_schedules(schedule, message):
    with pytest.raises(ValueError, match=message):
        validate(schedule)


@given(p=st.integers(1, 6), m=st.integers(1, 12), t_f=st.integers(1, 5), t_b=st.integers(1, 9))
@settings(max_examples=60, deadline=None)
def test_gpipe_and_1f1b_step_time_is_the_closed_form(p, m, t_f, t_b):
    for schedule in (gpipe(p, m), one_f_one_b(p, m)):
        sim = simulate(schedule, t_f, t_b)
        assert sim.makespan == (m + p - 1) * (t_f + t_b)
        assert sim.bubble == Fraction(p - 1, m + p - 1)


@given(p=st.integers(1, 5), groups=st.integers(1, 4), v=st.integers(2, 4), t_f=st.integers(1, 5),
       t_b=st.integers(1, 9))
@settings(max_examples=60, deadline=None)
def test_interleaving_divides_the_bubble_by_v(p, groups, v, t_f, t_b):
    m = p * groups
    schedule = interleaved_1f1b(p, m, v)
    validate(schedule)
    sim = simulate(schedule, t_f, t_b)
    assert sim.makespan - m * (t_f + t_b) == Fraction((p - 1) * (t_f + t_b), v)  # Narayanan et al. 2021
    assert sim.bubble == Fraction(p - 1, v * m + p - 1)
    # Korthikanti et al. 2022: rank 0 holds p + (p - 1)/v micro-batches' worth (counted here in chunks of 1/v)
    assert peak_in_flight(schedule)[0] == min(v * p + p - 1, m * v)


@given(p=st.integers(2, 6), extra=st.integers(0, 8), t_f=st.integers(1, 6), t_b=st.integers(1, 6),
       t_w=st.integers(1, 6))
@settings(max_examples=80, deadline=None)
def test_zero_bubble_h1_beats_1f1b_at_the_same_peak_memory(p, extra, t_f, t_b, t_w):
    m = p + extra
    zb, ofob = zero_bubble_h1(p, m), one_f_one_b(p, m)
    validate(zb)
    assert max(peak_in_flight(zb)) == max(peak_in_flight(ofob)) == p
    zb_time, ofob_time = simulate(zb, t_f, t_b, t_w).makespan, simulate(ofob, t_f, t_b, t_w).makespan
    assert ofob_time == (m + p - 1) * (t_f + t_b + t_w)
    assert zb_time < ofob_time
    if t_w <= min(t_f, t_b):  # Qi et al. 2023: the bubble shrinks to (p - 1)(t_f + t_b - t_w)
        assert zb_time == m * (t_f + t_b + t_w) + (p - 1) * (t_f + t_b - t_w)


def schedules(draw_p=st.integers(1, 6), draw_groups=st.integers(1, 3)):
    """(name, p, m, v) of every built-in schedule; m a multiple of p so that interleaving allows it."""
    return st.tuples(st.sampled_from(["gpipe", "1f1b", "interleaved", "zb"]), draw_p, draw_groups,
                     st.integers(1, 4)).map(lambda t: (t[0], t[1], t[1] * t[2], t[3] if t[0] == "interleaved" else 1))


@given(case=schedules())
@settings(max_examples=60, deadline=None)
def test_the_message_plan_runs_under_nccl_rules_with_receives_just_in_time(case):
    name, p, m, v = case
    schedule = build(name, p, m, v)
    batches = plan(schedule)
    assert play(batches) == (2 * m * (v * p - 1) if p > 1 else 0)   # every message delivered, nothing hangs
    sends, receives = {}, {}
    for r, rank in enumerate(batches):
        for k, batch in enumerate(rank):
            for op in batch.ops:
                link = (op.message.src, op.message.dst)
                (sends if op.send else receives).setdefault(link, []).append((k, op.message))
    assert [[msg for _, msg in ops] for ops in sends.values()] == [[msg for _, msg in receives[link]]
                                                                     for link in sends]   # matched by order
    posted = {msg: k for ops in receives.values() for k, msg in ops}
    held = []
    for r, actions in enumerate(schedule):
        for k, a in enumerate(actions):
            need = received_by(a, r, p, p * v)
            if need is not None and need.src != r:
                assert posted[need] <= k   # a receive is posted before the action that needs it ...
        live = peak = 0
        for batch in batches[r]:
            live += sum(op.send for op in batch.ops) - len(batch.delivered)
            peak = max(peak, live)
        held.append(peak)
    late = [k - posted[received_by(a, r, p, p * v)] for r, actions in enumerate(schedule) for k, a in
            enumerate(actions) if (need := received_by(a, r, p, p * v)) is not None and need.src != r]
    assert not late or sorted(late)[len(late) // 2] == 0   # ... mostly just before it (the median)
    assert max(held) <= (3 if v > 1 else 1)   # sent tensors freed on the way: a few at once, not 2m


def one_by_one(schedule, ahead: bool) -> list[list[Batch]]:
    """Each message alone in its batch, in the order a rank issues it: a send right after the action producing it;
    a receive just before the action that needs it (ahead=False), or, as this runtime first did, the first receive
    from every peer at the start and the next one from a peer as soon as the previous one is taken (ahead=True)."""
    p, _, v = shape(schedule)
    order = {}
    for r, actions in enumerate(schedule):
        for a in actions:
            if (msg := sent_by(a, r, p, p * v)) is not None:
                order.setdefault((r, msg.dst), []).append(msg)
    plans = []
    for r, actions in enumerate(schedule):
        queues = {src: list(order.get((src, r), [])) for src in range(p) if src != r}
        ops = [Op(False, q.pop(0)) for q in queues.values() if q] if ahead else []
        for a in actions:
            if (msg := received_by(a, r, p, p * v)) is not None and (not ahead or queues[msg.src]):
                ops.append(Op(False, queues[msg.src].pop(0) if ahead else msg))
            if (msg := sent_by(a, r, p, p * v)) is not None:
                ops.append(Op(True, msg))
        plans.append([Batch([op], []) for op in ops])
    return plans


def test_receives_posted_one_ahead_or_apart_from_their_sends_hang_under_nccl_rules():
    # Rank 0 posts the receive of gradient 0 first: its second activation, which that gradient needs, queues behind.
    with pytest.raises(ValueError, match=r"hangs under NCCL: rank 0 in batch 0 \(recv grad 0 for stage 0 \(rank 1\)"):
        play(one_by_one(gpipe(2, 2), ahead=True))
    # Receives just in time, but each send alone: 1F1B's rank 0 sends activation 1 while rank 1 sends gradient 0.
    with pytest.raises(ValueError, match="rank 0 in batch 1 \\(send act 1 .*rank 1 in batch 1 \\(send grad 0"):
        play(one_by_one(one_f_one_b(2, 4), ahead=False))
    assert play(plan(one_f_one_b(2, 4))) == 8


@pytest.mark.parametrize("call, message", [
    (lambda: interleaved_1f1b(4, 6, 2), "m=6 must be divisible by the number of ranks p=4"),
    (lambda: one_f_one_b(0, 4), "p must be a positive integer, got 0"),
    (lambda: gpipe(2, 2.0), "m must be a positive integer, got 2.0"),
    (lambda: interleaved_1f1b(2, 4, 0), "v must be a positive integer, got 0"),
    (lambda: build("pipedream", 2, 2), "unknown schedule 'pipedream'"),
    (lambda: Action("X", 0), "kind is one of"),
    (lambda: Action("F", -1), "microbatch must be a non-negative integer"),
    (lambda: simulate(gpipe(2, 2), 1, -1), "non-negative"),
])
def test_bad_arguments_are_refused_with_the_numbers(call, message):
    with pytest.raises(ValueError, match=message):
        call()


INTERLEAVED_BY_HAND = {  # derived on paper: rank r warms up with min(2 (p - r - 1) + (v - 1) p, m v) chunk forwards
    (2, 4, 2): ["F0 F1 F0.1 F1.1 F2 B0.1 F3 B1.1 F2.1 B0 F3.1 B1 B2.1 B3.1 B2 B3",
                "F0 F1 F0.1 B0.1 F1.1 B1.1 F2 B0 F3 B1 F2.1 B2.1 F3.1 B3.1 B2 B3"],
    (4, 4, 2): ["F0 F1 F2 F3 F0.1 F1.1 F2.1 F3.1 B0.1 B1.1 B2.1 B3.1 B0 B1 B2 B3"] * 2 + [
                "F0 F1 F2 F3 F0.1 F1.1 F2.1 B0.1 F3.1 B1.1 B2.1 B3.1 B0 B1 B2 B3",
                "F0 F1 F2 F3 F0.1 B0.1 F1.1 B1.1 F2.1 B2.1 F3.1 B3.1 B0 B1 B2 B3"],
    (2, 2, 3): ["F0 F1 F0.1 F1.1 F0.2 F1.2 B0.2 B1.2 B0.1 B1.1 B0 B1",
                "F0 F1 F0.1 F1.1 F0.2 B0.2 F1.2 B1.2 B0.1 B1.1 B0 B1"],
}


@pytest.mark.exercise("interleaved_1f1b")
@pytest.mark.parametrize("p, m, v", list(INTERLEAVED_BY_HAND))
def test_interleaved_1f1b_by_hand(p, m, v):
    assert implementation("interleaved_1f1b")(p, m, v) == [parse(r) for r in INTERLEAVED_BY_HAND[p, m, v]]


@pytest.mark.exercise("interleaved_1f1b")
@pytest.mark.parametrize("p, groups, v", [(2, 1, 2), (3, 2, 2), (4, 1, 3), (3, 3, 4), (5, 2, 2)])
def test_interleaved_1f1b_runs_and_divides_the_bubble_by_v(p, groups, v):
    m = p * groups
    schedule = implementation("interleaved_1f1b")(p, m, v)
    validate(schedule)                                   # complete, ordered, and free of deadlocks
    assert shape(schedule) == (p, m, v)
    assert simulate(schedule, 1, 2).bubble == Fraction(p - 1, v * m + p - 1)
    assert peak_in_flight(schedule)[0] == min(v * p + p - 1, m * v)


WAITS_BY_HAND = [  # (p, stages, rank, action, what it waits for), worked out from stage = chunk * p + rank
    (2, 4, 0, "F0", None), (2, 4, 1, "F0", (0, "F0")), (2, 4, 0, "F3.1", (1, "F3")), (2, 4, 1, "F2.1", (0, "F2.1")),
    (2, 4, 1, "B0.1", None), (2, 4, 0, "B0.1", (1, "B0.1")), (2, 4, 1, "B1", (0, "B1.1")), (2, 4, 0, "B2", (1, "B2")),
    (2, 4, 0, "W1", None), (3, 9, 0, "F0.1", (2, "F0")), (3, 9, 2, "B4.2", None), (3, 9, 2, "B4.1", (0, "B4.2")),
    (3, 9, 1, "F5.2", (0, "F5.2")), (3, 3, 1, "B5", (2, "B5")), (3, 3, 2, "F5", (1, "F5")), (3, 3, 0, "B5", (1, "B5")),
    (1, 1, 0, "F0", None), (1, 1, 0, "B0", None),
]


@pytest.mark.exercise("waits_for")
@pytest.mark.parametrize("p, stages, rank, action, expected", WAITS_BY_HAND)
def test_waits_for_by_hand(p, stages, rank, action, expected):
    got = implementation("waits_for")(parse(action)[0], rank, p, stages)
    assert got == (None if expected is None else (expected[0], parse(expected[1])[0]))


WAITS_BY_HAND_V = [  # the V placement: rank r holds stage r (chunk 0) and 2p - 1 - r (chunk 1)
    (3, 6, 2, "F0.1", (2, "F0")), (3, 6, 0, "F0.1", (1, "F0.1")), (3, 6, 1, "F2", (0, "F2")), (3, 6, 0, "F2", None),
    (3, 6, 0, "B1.1", None), (3, 6, 0, "B1", (1, "B1")), (3, 6, 2, "B1", (2, "B1.1")), (3, 6, 1, "B4.1", (0, "B4.1")),
    (2, 4, 1, "F0.1", (1, "F0")), (2, 4, 0, "F3.1", (1, "F3.1")), (2, 4, 1, "B2", (1, "B2.1")), (2, 4, 0, "W1.1", None),
]


@pytest.mark.exercise("waits_for")
@pytest.mark.parametrize("p, stages, rank, action, expected", WAITS_BY_HAND_V)
def test_waits_for_by_hand_in_the_v(p, stages, rank, action, expected):
    """The turn (stage p - 1 to p) waits on the same rank; the way back up waits on the rank below."""
    got = implementation("waits_for")(parse(action)[0], rank, p, stages, v_shape=True)
    assert got == (None if expected is None else (expected[0], parse(expected[1])[0]))


@pytest.mark.exercise("waits_for")
def test_waits_for_links_each_interleaved_action_to_one_that_exists_upstream():
    """Following what each action waits for from the last stage's B (or the first stage's F) walks the pipeline one
    stage at a time and visits every stage once."""
    waits = implementation("waits_for")
    for p, v in [(2, 2), (3, 3), (4, 2)]:
        stages = p * v
        for kind, start, step in (("F", (p - 1, Action("F", 1, v - 1)), -1), ("B", (0, Action("B", 1, 0)), 1)):
            seen, at = [], start
            while at is not None and len(seen) <= stages:  # (a wrong answer may walk in a circle)
                seen.append(at[1].chunk * p + at[0])
                at = waits(at[1], at[0], p, stages)
            assert seen == list(range(stages))[::step], (kind, p, v)
