"""Pipeline schedules as data, with no processes: exact lists derived by hand, the validator, the simulator against the
papers' closed forms (property tests over p, m, v and the times), and clear errors."""
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidist.grading import implementation
from minidist.pipeline.schedule import (Action, build, gpipe, grid, interleaved_1f1b, one_f_one_b,
                                        peak_in_flight, simulate, validate, waits_for, zero_bubble_h1)


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
