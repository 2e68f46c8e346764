"""The V-shaped schedules (ZB-V, DualPipeV): as data against torch's own action order and the papers' closed forms
(no processes), the placement exercise, then executed on ranks against one process and against torch's schedules."""
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from minidist import launch
from minidist.grading import implementation
from minidist.models import GPT, GPTConfig
from minidist.pipeline.messages import plan, play, sent_by
from minidist.pipeline.schedule import (Action, build, dualpipe_v, grid, is_v, one_f_one_b, peak_in_flight,
                                        simulate, stage_of, validate, zero_bubble_v)
from minidist.pipeline.runtime import PipelineRuntime
from minidist.pipeline.stages import rank_stages
from minidist.tour.pipeline import CFG, GRAD_TOL, SGD_TOL, pipeline_vs_one_process
from minidist.tour.vpipeline import v_bubble, v_configs, v_equivalence, v_in_flight, v_message_bytes


def torch_order(name: str, p: int, m: int) -> list[list[Action]]:
    """torch's own action lists for its ZB-V / DualPipeV (computed by the schedule class's per-rank method, no
    processes), as minidist Actions: stage r is chunk 0, stage 2p-1-r chunk 1; a full backward is B then W; an
    overlapped pair its forward then its backward."""
    from torch.distributed.pipelining import ScheduleDualPipeV, ScheduleZBVZeroBubble
    from torch.distributed.pipelining.schedules import _ComputationType as T
    cls = {"zbv": ScheduleZBVZeroBubble, "dualpipev": ScheduleDualPipeV}[name]
    kinds = {T.FORWARD: "F", T.BACKWARD_INPUT: "B", T.BACKWARD_WEIGHT: "W", T.FULL_BACKWARD: "BW"}
    fake = SimpleNamespace(pp_group_size=p, num_stages=2 * p, _n_microbatches=m)
    return [[Action(k, s.microbatch_index, int(s.stage_index != r))
             for a in cls._calculate_single_rank_operations(fake, r) if a is not None
             for s in (a.sub_actions or (a,)) for k in kinds[s.computation_type]] for r in range(p)]


def test_zero_bubble_v_by_hand():
    # p = 2, m = 2, laid out for n = 2p - 1 = 3 micro-batches, micro-batch 2 then left out. Rank 0: 2(p - r) - 1 = 3
    # forwards of chunk 0 (F0 F1 [F2]), then (F1 B1 W1) p - r = 2 times, then (B0 W0 [F1 B1 W1]) once, (B0 W0) twice
    # ([B2 W2] left out). Rank 1: one F0, then (F1 F0) once (F0.1 F1: the V turns here), (F1 B1 W1) once, one steady
    # (F0 B0 W0 F1 B1 W1) with its F0 and F1 of micro-batch 2 left out, (B0 B1) once ([B2.1] out), (B0 W0) ([B2] out).
    words = lambda text: [Action(w[0], int(w[1]), int(w[3:] or 0)) for w in text.split()]  # noqa: E731
    assert zero_bubble_v(2, 2) == [words("F0 F1 F0.1 B0.1 W0.1 F1.1 B1.1 W1.1 B0 W0 B1 W1"),
                                   words("F0 F0.1 F1 F1.1 B0.1 W0.1 B0 W0 B1.1 W1.1 B1 W1")]
    assert is_v(zero_bubble_v(2, 2)) and not is_v(one_f_one_b(2, 2))


@pytest.mark.parametrize("name", ["zbv", "dualpipev"])
def test_the_v_schedules_are_torchs_action_order(name):
    for p in range(1, 6):
        for m in range(2 * p if name == "dualpipev" else 1, 3 * p + 2):
            assert build(name, p, m) == torch_order(name, p, m), (p, m)


@given(p=st.integers(1, 5), extra=st.integers(0, 6), t=st.integers(1, 4))
@settings(max_examples=20, deadline=None)
def test_closed_forms_at_equal_times(p, extra, t):
    m = 2 * p + extra
    for name in ("zbv", "dualpipev"):
        schedule = build(name, p, m)
        validate(schedule)
        sim = simulate(schedule, t, t, t)
        # one step between a common start and end: the V's fill, (p - 1) chunk forwards on every rank
        assert sim.makespan == 3 * m * t + Fraction((p - 1) * t, 2)
        assert sim.bubble == Fraction(p - 1, 6 * m + p - 1) == Fraction(v_bubble(p, m)).limit_denominator(10**6)
        assert peak_in_flight(schedule) == [v_in_flight(name, p)] * p      # ZB: 2p chunks; DualPipe: PP + 1
        assert play(plan(schedule)) == 4 * m * (p - 1)                      # twice 1F1B's 2 m (p - 1)
    gaps = lambda sim: [sum(s - e for (_, _, e), (_, s, _) in zip(ev, ev[1:])) for ev in sim.timeline]  # noqa: E731
    # ZB-V: no idle time inside any rank's span (the paper's zero bubble, in the parallelogram of a step); DualPipeV,
    # whose overlapped pairs run one after the other here, keeps (p - 1 - r) chunk forwards inside rank r's span
    assert gaps(simulate(zero_bubble_v(p, m), t, t, t)) == [0] * p
    assert gaps(simulate(dualpipe_v(p, m), t, t, t)) == [Fraction((p - 1 - r) * t, 2) for r in range(p)]


def test_bubble_below_the_other_schedules_at_the_same_m():
    p, m = 4, 8
    bubbles = {n: simulate(build(n, p, m, 2), 1, 1, 1).bubble for n in ("1f1b", "interleaved", "zb", "zbv")}
    assert bubbles["zbv"] < bubbles["zb"] < bubbles["interleaved"] < bubbles["1f1b"]


def test_dualpipe_v_needs_two_micro_batches_per_rank_and_the_v_two_chunks():
    with pytest.raises(ValueError, match=r"DualPipeV needs at least as many micro-batches as stages: m=5 < 2p = 6"):
        dualpipe_v(3, 5)
    with pytest.raises(ValueError, match="m must be a positive integer"):
        zero_bubble_v(2, 0)
    with pytest.raises(ValueError, match="the V placement puts exactly 2 chunks on each rank, got v=3"):
        rank_stages(GPT(GPTConfig(n_layer=6, n_embd=32, block_size=16)), 1, 0, 3, v_shape=True)


@pytest.mark.exercise("validate")
def test_validate_follows_the_v_placement():
    assert len(implementation("validate")(zero_bubble_v(3, 5))) == 3 * 6 * 5
    broken = zero_bubble_v(2, 2)
    broken[1] = [broken[1][1], broken[1][0], *broken[1][2:]]      # rank 1: F0.1 before F0, its own input
    with pytest.raises(ValueError, match=r"deadlock: rank 0 waits at F0.1 for rank 1's F0.1; rank 1 waits at F0.1 "
                                         r"for rank 1's F0"):
        implementation("validate")(broken)


@pytest.mark.exercise("place")
def test_place_by_hand_and_the_v_message_pattern():
    place = implementation("place")
    for p in range(1, 6):
        for v in (1, 2, 3):
            assert [place(s, p) for s in range(v * p)] == [(s % p, s // p) for s in range(v * p)]
        v_pairs = [place(s, p, True) for s in range(2 * p)]
        assert v_pairs == [(r, 0) for r in range(p)] + [(r, 1) for r in reversed(range(p))]
        assert all(stage_of(r, c, p, True) == s for s, (r, c) in enumerate(v_pairs))
        path = [place(s, p, True)[0] for s in range(2 * p)]
        assert path == list(range(p)) + list(reversed(range(p)))
        assert sum(a == b for a, b in zip(path, path[1:])) == 1 and path[p - 1] == path[p] == p - 1


def test_the_turn_of_the_v_is_no_message():
    # rank p - 1 passes stage p - 1's output to its own stage p: sent_by names itself, and the plan leaves it out
    assert sent_by(Action("F", 0, 0), 2, 3, 6, True).dst == 2
    assert all(op.message.src != op.message.dst for rank in plan(zero_bubble_v(3, 6)) for b in rank for op in b.ops)
    assert grid(zero_bubble_v(2, 4)).splitlines()[3].split() == ["2", "F2", "F0.1"]   # rank 1 turns at step 2


def test_the_runtime_equals_one_process_and_torch_at_2_ranks():
    p, per_rank = 2, launch(v_equivalence, 2)
    for ours, theirs in per_rank:
        for r, (name, m, _) in zip(ours, v_configs(p)):
            assert max(r["loss_diff"], r["grad_diff"], r["weight_diff"]) < SGD_TOL, r
            assert r["counted"] and r["tied_messages"] == 0 and r["peak_in_flight"] == v_in_flight(name, p)
        for r in theirs:
            assert r["grad_diff"] < GRAD_TOL and r["loss_diff"] < GRAD_TOL, r
    for k, (_, m, _) in enumerate(v_configs(p)):
        assert sum(ours[k]["bytes"] for ours, _ in per_rank) == v_message_bytes(m, p)


def test_bench_pp_refuses_on_the_host_what_it_cannot_run():
    from minidist.bench.pp import bench_pp, check_pp, pp_config   # the run itself: tests/test_pipeline.py's bench test
    with pytest.raises(ValueError, match="a V schedule cuts the model into 2p = 6 stages: 4 layers are too few"):
        bench_pp(3, schedule="zbv", microbatches=6, batch_size=12, n_layer=4)
    with pytest.raises(ValueError, match=r"bench pp compares the schedules \['1f1b', 'dualpipev', 'zbv'\]"):
        bench_pp(2, schedule="zb")
    with pytest.raises(ValueError, match=r"DualPipeV needs at least as many micro-batches as stages: m=4 < 2p = 6"):
        bench_pp(3, schedule="dualpipev")                  # refused before any rank starts
    with pytest.raises(ValueError, match="torch's Schedule1F1B needs micro-batches >= ranks: got 2 micro-batches"):
        check_pp(3, batch_size=12, microbatches=2)
    with pytest.raises(ValueError, match="5 micro-batches do not divide the batch of 16"):
        check_pp(2, microbatches=5, schedule="zbv")
    check_pp(3, batch_size=12, microbatches=1, schedule="zbv")   # ZB-V takes m < p; a V at p = 3 gets 2p = 6 layers
    assert [pp_config(3, None, None, None, s).n_layer for s in ("zbv", "dualpipev", "1f1b")] == [6, 6, 4]
    assert pp_config(2, None, None, None, "zbv").n_layer == 4 and pp_config(3, 8, None, None, "zbv").n_layer == 8


def p3_runs_and_refusals() -> tuple[list[dict], list[str], bool]:
    """On this rank of 3: pipeline_vs_one_process for m not a multiple of p (ZB-V below 2p - 1); the refusals of
    stages the schedule's placement does not hold and of a list() copy of a V schedule; whether that copy, passed
    with v_shape=True, gets the original's message plan."""
    results = pipeline_vs_one_process([("zbv", 2, 2), ("dualpipev", 7, 2)], 1)
    rank, errors, model = dist.get_rank(), [], GPT(CFG)
    looped, v_stages = rank_stages(model, 3, rank, 2), rank_stages(model, 3, rank, 2, v_shape=True)
    for stages, schedule in ((looped, zero_bubble_v(3, 4)), (v_stages, list(zero_bubble_v(3, 4)))):
        try:
            PipelineRuntime(stages, schedule, CFG.n_embd)
        except ValueError as e:
            errors.append(str(e))
    copy = PipelineRuntime(v_stages, list(zero_bubble_v(3, 4)), CFG.n_embd, v_shape=True)
    return results, errors, copy.v_shape and copy.batches == PipelineRuntime(v_stages, zero_bubble_v(3, 4), 32).batches


def test_the_runtime_at_3_ranks_with_m_not_a_multiple_of_p_and_its_placement_refusals():
    for rank, (results, errors, copy_runs_as_v) in enumerate(launch(p3_runs_and_refusals, 3)):
        for r in results:
            assert max(r["loss_diff"], r["grad_diff"], r["weight_diff"]) < SGD_TOL and r["counted"], r
        assert copy_runs_as_v
        # the list() copy: the looped placement deadlocks it, and the error says where it runs
        assert errors[-1].startswith("deadlock: ") and errors[-1].endswith(
            "; the schedule runs on the V placement: a copy of a VSchedule that lost its type? Pass "
            "PipelineRuntime(..., v_shape=True)"), errors
        if rank == 1:                                      # the middle rank holds stages 1 and 4 in both placements
            assert len(errors) == 1
        else:                                              # chunk 1: stage 3 + r looped, 5 - r in the V
            assert errors[0].startswith(f"rank {rank}'s chunk 1 holds stage {3 + rank}, but the schedule's V "
                                        f"placement puts stage {5 - rank} there: build the stages with "
                                        f"rank_stages(model, p, rank, v, v_shape=True)"), errors


def test_a_slice_or_copy_of_a_v_schedule_stays_v():
    s = zero_bubble_v(2, 3)
    assert is_v(s[:]) and is_v(s.copy()) and not is_v(list(s)) and s[0] == list(s)[0]


def split_backwards(name: str, m: int) -> int:
    """On this rank: how many input-only backwards (backward_input) one step of schedule `name` runs."""
    from minidist.pipeline import runtime
    from minidist.tour.pipeline import batches, placed
    calls, original = [], runtime.backward_input
    runtime.backward_input = lambda *args: calls.append(1) or original(*args)
    try:
        runtime.PipelineRuntime(*placed(GPT(CFG), name, 2, dist.get_rank(), m, 2), CFG.n_embd).step(*batches(m, 1)[0])
    finally:
        runtime.backward_input = original
    return len(calls)


def test_a_b_right_before_its_w_runs_as_one_fused_backward():
    # DualPipeV, p = 2, m = 4 (grid above): rank 0 runs each of its 8 B right before its W, rank 1 all but B3.1 and
    # B3 (B3.1 B3 W3.1 W3): only those two are cut into B and W. Their gradients: the equivalence test above.
    assert launch(split_backwards, 2, "dualpipev", 4) == [0, 2]


def test_place_and_stage_of_refuse_what_the_placement_lacks():
    from minidist.pipeline.schedule import place
    for call, message in ((lambda: place(4, 2, True), "stage 4 is not a stage of the V on 2 ranks (0 .. 3)"),
                          (lambda: place(-1, 2), "stage -1 is not a stage of the looped placement on 2 ranks"),
                          (lambda: place(0, 0), "p must be a positive integer, got 0"),
                          (lambda: stage_of(2, 0, 2), "rank 2, chunk 0 is not a place of the looped placement on 2 "
                                                      "ranks (ranks 0 .. 1"),
                          (lambda: stage_of(0, 2, 2, True), "rank 0, chunk 2 is not a place of the V placement on 2 "
                                                            "ranks (ranks 0 .. 1, chunks 0 and 1)"),
                          (lambda: stage_of(0, -1, 3), "rank 0, chunk -1 is not a place of the looped")):
        with pytest.raises(ValueError) as error:
            call()
        assert str(error.value).startswith(message), error.value
    assert place(5, 2) == (1, 2) and stage_of(1, 2, 2) == 5      # looped: any number of chunks
