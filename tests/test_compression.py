"""Gradient compression: every hook's counted bytes equal its formula on several buckets, fp16/bf16/PowerSGD (rank 2
and, with QR, rank 3) give torch's weights on the same buckets, the hooks run on torch's DDP, top-k's error feedback
loses nothing (and without it entries are never sent), a zero gradient does not poison PowerSGD, the exercises."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from minidist import comm, launch
from minidist.compression import PowerSGDState, TopKState
from minidist.compression.powersgd import bucket_matrices, orthogonalize_
from minidist.grading import implementation
from minidist.tour.compression import (WholeBucket, every_hook, hook_against_plain, on_ddp,
                                       powersgd_after_a_zero_gradient, topk_invariant)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("world_size, methods", [(2, ["fp16", "bf16", "topk", "topk-bf16", "powersgd", "powersgd3"]),
                                                 (3, ["topk", "powersgd"])])
def test_counted_bytes_equal_the_formulas_and_weights_equal_torchs(world_size, methods):
    per_rank = launch(every_hook, world_size, methods)
    for m in methods:
        runs = [r[m][0] for r in per_rank]
        assert runs[0]["buckets"] > 1, m  # several buckets of whole parameters, as DDP makes them
        assert all(r["counted"] for r in runs) and max(r["divergence"] for r in runs) == 0.0, m
        assert sum(r["bytes"] for r in runs) / world_size == runs[0]["formula"], m  # exact (Fractions)
        if not m.startswith("topk"):  # torch has no top-k
            assert max(r[m][1] for r in per_rank) == 0.0, m  # the same weights as torch's hook: bit for bit


def test_the_hooks_run_on_torchs_ddp_with_torchs_weights():
    for r in launch(on_ddp, 2, ["fp16", "powersgd", "topk"]):
        assert r == {"fp16": 0.0, "powersgd": 0.0, "topk": 0.0}


def test_a_zero_gradient_leaves_powersgd_finite_where_torchs_makes_nan():
    for r in launch(powersgd_after_a_zero_gradient, 2):
        assert r["minidist"]["finite"] and r["minidist"]["after"] > 0  # the power iteration resumed
        assert not r["torch"]["finite"]  # torch's Gram-Schmidt divides 0 by 0 (the difference the docstring states)


def test_orthogonalize_dispatches_as_torchs_powersgd():
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _orthogonalize
    g = torch.Generator().manual_seed(0)
    for rank, dtype in [(1, torch.float32), (2, torch.float32), (3, torch.float32), (4, torch.float32),
                        (3, torch.bfloat16)]:
        m = torch.randn(10, rank, generator=g).to(dtype)
        theirs = m.clone().unsqueeze(0)
        _orthogonalize(theirs)
        assert torch.equal(orthogonalize_(m), theirs[0]), (rank, dtype)  # Gram-Schmidt up to 2 and in bf16, else QR
    zero = torch.zeros(6, 2)
    assert torch.equal(orthogonalize_(zero), torch.eye(6, 2))  # QR's answer for zeros, not 0/0


def test_a_bucket_cut_through_a_parameter_is_refused():
    buf = torch.randn(20)
    bucket = WholeBucket(buf[:12], shapes=[(4, 3)])
    bucket.gradients = lambda: [buf[8:20].view(4, 3)]  # a gradient reaching past the bucket's end
    with pytest.raises(ValueError, match="whole parameters"):
        bucket_matrices(bucket, PowerSGDState(None, 1))  # what powersgd_hook compresses


def test_error_feedback_loses_nothing_and_without_it_entries_are_never_sent():
    for with_ef, without in zip(launch(topk_invariant, 3), launch(topk_invariant, 3, error_feedback=False)):
        assert with_ef["error"] == 0.0 and with_ef["never_updated"] == 0.0
        assert without["error"] > 0 and without["never_updated"] >= 0.5  # the small half is never among the top k


def test_powersgd_and_solutions_import_on_their_own():
    for module in ("minidist.compression.powersgd", "solutions.ch10_compression"):
        out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=ROOT,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.exercise("allreduce_hook")
def test_allreduce_hook_trains_as_data_parallel_without_a_hook():
    per_rank = launch(hook_against_plain, 2, implementation("allreduce_hook"))
    for r in per_rank:
        assert r["torch_future"] and r["diff"] == 0.0 and r["divergence"] == 0.0 and r["counted"]
    assert per_rank[0]["buckets"] > 1 and sum(r["bytes"] for r in per_rank) / 2 == per_rank[0]["formula"]


class _Bucket:
    def __init__(self, buf):
        self._buf = buf

    def buffer(self):
        return self._buf


def hook_returns_before_the_sum():
    """The hook on one bucket under a slow link, then one more collective: was the hook's still running?"""
    from minidist.testing import issue_log
    rank = dist.get_rank()
    with comm.ring_backend(comm.SimulatedLink(alpha=0.05, bandwidth=1e9)), issue_log() as pending:
        future = implementation("allreduce_hook")(None, _Bucket(torch.full((4,), 2.0 * (rank + 1))))
        marker = comm.all_reduce_(torch.zeros(1), None, async_op=True)
        value = future.wait()
        marker.wait()
    return pending, value


@pytest.mark.exercise("allreduce_hook")
def test_allreduce_hook_returns_while_its_all_reduce_runs():
    for pending, value in launch(hook_returns_before_the_sum, 2):
        assert pending == [0, 1], f"collectives still running when each was issued: {pending} (the hook waited)"
        assert torch.equal(value, torch.full((4,), 3.0))  # the mean of 2 and 4


@pytest.mark.exercise("topk_compress")
def test_topk_compress():
    topk = implementation("topk_compress")
    acc = torch.tensor([0.5, -3.0, 2.0, 0.0, -1.0, 4.0])
    before = acc.clone()
    values, indices, residual = topk(acc, 3)
    assert sorted(indices.tolist()) == [1, 2, 5] and indices.dtype == torch.int32
    assert torch.equal(values, acc[indices.long()])
    assert torch.equal(residual, torch.tensor([0.5, 0.0, 0.0, 0.0, -1.0, 0.0])) and torch.equal(acc, before)
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for k in (1, 17, 1000):
        values, indices, residual = topk(g, k)
        assert torch.equal(values.abs().sort().values, g.abs().sort().values[-k:])
        sent = torch.zeros_like(g)
        sent[indices.long()] = values
        assert torch.equal(sent + residual, g)  # exact: each entry is either sent or kept


def power_round(shapes, rank):
    """power_iteration on matrices whose average over ranks has rank `rank`, under the ring backend."""
    power_iteration = implementation("power_iteration")
    n, me = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(0)
    averages = [torch.randn(s[0], rank, generator=g) @ torch.randn(rank, s[1], generator=g) for s in shapes]
    noise = [torch.randn(n, *s, generator=g) for s in shapes]
    ms = [a + z[me] - z.mean(0) for a, z in zip(averages, noise)]  # every rank its own; the mean is the average
    qs = [torch.linalg.qr(torch.randn(s[1], rank, generator=g))[0] for s in shapes]
    kept = [t.clone() for t in ms + qs]
    with comm.ring_backend(), comm.ByteLedger() as ledger:
        ps, qs_out = power_iteration(ms, qs, None)
    error = max((p @ q.t() - a).abs().max().item() for p, q, a in zip(ps, qs_out, averages))
    return {"error": error, "calls": ledger.count("all_reduce"), "bytes": ledger.total_bytes(),
            "orthonormal": max((p.t() @ p - torch.eye(rank)).abs().max().item() for p in ps),
            "unchanged": all(torch.equal(a, b) for a, b in zip(ms + qs, kept))}


@pytest.mark.exercise("power_iteration")
@pytest.mark.parametrize("world_size", [2, 3])
def test_power_iteration_recovers_a_rank_r_average(world_size):
    shapes, rank = [(12, 8), (20, 6)], 2
    per_rank = launch(power_round, world_size, shapes, rank)
    elements = sum(rank * (a + b) for a, b in shapes)
    for r in per_rank:
        assert r["calls"] == 2 and r["error"] < 1e-5 and r["orthonormal"] < 1e-5 and r["unchanged"]
    assert sum(r["bytes"] for r in per_rank) / world_size == comm.ring_bytes("all_reduce", 4 * elements, world_size)


@pytest.mark.exercise("orthogonalize")
def test_orthogonalize_gram_schmidt():
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _orthogonalize_gram_schmidt
    orthogonalize = implementation("orthogonalize")
    m = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    theirs = m.clone().unsqueeze(0)
    _orthogonalize_gram_schmidt(theirs)
    ours = m.clone()
    assert orthogonalize(ours) is ours and torch.equal(ours, theirs[0])  # in place, bit for bit
    assert (ours.t() @ ours - torch.eye(3)).abs().max() < 1e-5
    q = torch.linalg.qr(m)[0]
    assert torch.allclose(ours.abs(), q.abs(), atol=1e-5)  # QR's Q up to the signs of its columns
    for j in range(1, 4):  # the first j columns span what m's first j columns span
        assert torch.linalg.matrix_rank(torch.cat([ours[:, :j], m[:, :j]], 1), atol=1e-4) == j


@pytest.mark.exercise("initial_qs")
def test_initial_qs_by_hand():
    initial_qs = implementation("initial_qs")
    ms = [torch.randn(6, 4), torch.randn(5, 3), torch.randn(2, 9, dtype=torch.float64)]
    draws = []
    for global_seed in (1, 2):                    # two ranks whose global random streams differ
        torch.manual_seed(global_seed)
        state = PowerSGDState(None, 3, start_powerSGD_iter=2)
        draws.append([initial_qs(ms, state), initial_qs(ms, state)])   # two calls: two buckets
        after = torch.rand(3)
        torch.manual_seed(global_seed)
        assert torch.equal(after, torch.rand(3)), "the global random stream was used or reseeded"
    (first, second), (first_elsewhere, second_elsewhere) = draws
    assert [tuple(q.shape) for q in first] == [(4, 3), (3, 3), (9, 2)]    # r = min(n, m, 3)
    assert [q.dtype for q in first] == [torch.float32, torch.float32, torch.float64]
    for q in first + second:
        assert torch.allclose(q.T @ q, torch.eye(q.shape[1], dtype=q.dtype), atol=1e-5)   # orthonormal columns
    assert all(torch.equal(a, b) for a, b in zip(first + second, first_elsewhere + second_elsewhere))
    assert not torch.equal(first[0], second[0])   # each call draws anew


def powersgd_with_learners_qs():
    import minidist.compression.powersgd as powersgd
    from minidist.tour.compression import against_torch
    powersgd._initial_qs = implementation("initial_qs")   # what the hook calls, in this process only
    torch.manual_seed(10 + dist.get_rank())             # ranks whose global streams differ
    return against_torch("powersgd")


@pytest.mark.exercise("initial_qs")
def test_powersgd_with_initial_qs_gives_torchs_weights():
    assert launch(powersgd_with_learners_qs, 2) == [0.0, 0.0]


@pytest.mark.exercise("breakeven_bandwidth")
def test_breakeven_bandwidth():
    breakeven = implementation("breakeven_bandwidth")
    assert breakeven(1000, 200, 0.01) == pytest.approx(80_000)
    assert breakeven(1000, 200, 0.01, extra_messages=4, alpha=0.0025) == pytest.approx(40_000)
    assert breakeven(1000, 200, 0.0) == math.inf and breakeven(1000, 1000, 0.01) == 0.0
    b, alpha = breakeven(5e6, 1e5, 0.02, 6, 1e-3), 1e-3  # at B*, both sides cost the same
    assert 2 * alpha + 5e6 / b == pytest.approx(8 * alpha + 1e5 / b + 0.02)


def test_states_refuse_bad_settings():
    with pytest.raises(ValueError, match="ratio"):
        TopKState(None, 0.0)
    with pytest.raises(ValueError, match="start_iter"):
        TopKState(None, 0.1, start_iter=-1)
    with pytest.raises(ValueError, match="start_powerSGD_iter"):
        PowerSGDState(None, 1, start_powerSGD_iter=1)
    with pytest.raises(ValueError, match="matrix_approximation_rank"):
        PowerSGDState(None, 0)
