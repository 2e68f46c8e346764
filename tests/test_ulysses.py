"""Ulysses attention: the two all-to-alls (exercises seq_to_heads, heads_to_seq) against a tensor cut by hand, the
attention exact against one process and ring attention at cp = 2 and 4, and at 2, 3, 4 on the load-balanced layout
(positions), forward and backward, counted bytes against
8 (N-1)/N B H (T/N) d values, and the head-count refusal by name."""
import pytest
import torch
import torch.distributed as dist

from minidist import comm, launch
from minidist.ulysses import ulysses_attention, ulysses_attention_bytes
from minidist.grading import implementation
from minidist.tour.parallel3d import ATTN_TOL
from minidist.tour.ulysses import ulysses_vs_ring
from minidist.ulysses import seq_to_heads


def all_to_all_run(name: str, shape=(2, 12, 12, 3)) -> dict:
    """On this rank, exercise `name` on its slice of one global tensor whose every value tells where it is from:
    seq_to_heads against the tensor cut by hand, heads_to_seq against the slice it must give back (from minidist's
    seq_to_heads, so each exercise is graded alone); the bytes and all-to-all calls it made."""
    n, r = dist.get_world_size(), dist.get_rank()
    B, H, T, d = shape
    x = torch.arange(B * H * T * d, dtype=torch.float32).view(B, H, T, d)
    mine = x[:, :, r * T // n:(r + 1) * T // n].clone()                     # (B, H, T/N, d)
    heads = x[:, r * H // n:(r + 1) * H // n].clone()                       # (B, H/N, T, d): my heads, in order
    given, expected = (mine, heads) if name == "seq_to_heads" else (seq_to_heads(mine, None), mine)
    with comm.ByteLedger() as ledger:
        got = implementation(name)(given, None)
    return {"ok": got.shape == expected.shape and torch.equal(got, expected), "bytes": ledger.total_bytes(),
            "calls": ledger.count("all_to_all"), "counted": ledger.counted, "formula": 4 * mine.numel() * (n - 1) / n}


@pytest.mark.exercise("seq_to_heads")
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_seq_to_heads_by_hand(n):
    for r in launch(all_to_all_run, n, "seq_to_heads"):
        assert r["ok"] and r["counted"] and r["calls"] == 1 and r["bytes"] == r["formula"], r


@pytest.mark.exercise("heads_to_seq")
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_heads_to_seq_gives_the_slice_back(n):
    for r in launch(all_to_all_run, n, "heads_to_seq"):
        assert r["ok"] and r["counted"] and r["calls"] == 1 and r["bytes"] == r["formula"], r


@pytest.mark.parametrize("n", [2, 4])
def test_exact_against_one_process_and_ring_attention_with_the_formula_bytes(n):
    for r in launch(ulysses_vs_ring, n):
        assert r["diff"] <= ATTN_TOL and r["vs_ring"] <= ATTN_TOL, r
        assert r["counted"] and r["bytes"] == r["formula"], r
        assert r["ring_bytes"] == r["ring_formula"]
        assert r["bytes"] < r["ring_bytes"]        # 8 (N-1)/N A against (3N-2) 2A


@pytest.mark.parametrize("n", [2, 3, 4])
def test_exact_on_the_load_balanced_layout_ring_attention_uses(n):
    # 12 heads, 24 positions: 2n chunks of 24 / 2n for n = 2, 3, 4; rank i holds chunks i and 2n-1-i
    for r in launch(ulysses_vs_ring, n, (1, 12, 24, 4), True):
        assert r["diff"] <= ATTN_TOL and r["vs_ring"] <= ATTN_TOL, r
        assert r["counted"] and r["bytes"] == r["formula"], r


def test_bytes_formula_by_hand():
    # N = 4, A = 2 * 4 * 6 * 8 values of 4 bytes: 8 * 3/4 * 1536 = 9216
    assert ulysses_attention_bytes(4, 2, 4, 6, 8) == 9216
    assert ulysses_attention_bytes(1, 2, 4, 24, 8) == 0


def refusals():
    q = torch.randn(1, 6, 4, 8)
    errors = []
    for args in ((q, q, q), (q, q[:, :4], q)):
        try:
            ulysses_attention(*args, None)
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_a_head_count_the_group_does_not_divide_is_refused_by_name():
    errors = launch(refusals, 4)[0]
    assert errors[0].startswith("Ulysses gives each of the 4 context-parallel ranks whole heads: 6 heads are not "
                                "divisible by 4")
    assert errors[1].startswith("q, k, v must share one (B, H, T/N, d) shape, got (1, 6, 4, 8), (1, 4, 4, 8)")
