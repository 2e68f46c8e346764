"""Context parallelism: the load-balanced split, the online-softmax merge, ring attention against one process's
attention at cp = 2, 3, 4 (outputs, gradients, counted bytes against (3N-2) K/V blocks, equal work per rank), and the
tiny GPT trained with it against one process."""
import math

import pytest
import torch

from minidist import launch
from minidist.context_parallel import (layout, load_balanced_positions, ring_attention, ring_attention_bytes,
                                      shard_sequence)
from minidist.grading import implementation
from minidist.models import GPT, GPTConfig
from minidist.tour import parallel3d as t3
from minidist.tour.parallel3d import ADAM_TOL, ATTN_TOL, mesh_vs_one_process, ring_vs_one_process


# The load-balanced split (exercise load_balanced_positions).

@pytest.mark.exercise("load_balanced_positions")
@pytest.mark.parametrize("seq, n, expected", [
    (8, 1, [[0, 1, 2, 3, 4, 5, 6, 7]]),
    (8, 2, [[0, 1, 6, 7], [2, 3, 4, 5]]),
    (12, 3, [[0, 1, 10, 11], [2, 3, 8, 9], [4, 5, 6, 7]]),
    (8, 4, [[0, 7], [1, 6], [2, 5], [3, 4]]),
])
def test_load_balanced_positions_by_hand(seq, n, expected):
    got = [implementation("load_balanced_positions")(seq, n, r) for r in range(n)]
    assert all(g.dim() == 1 and not g.is_floating_point() for g in got)
    assert [g.tolist() for g in got] == expected


@pytest.mark.exercise("load_balanced_positions")
@pytest.mark.parametrize("seq, n", [(24, 2), (24, 3), (48, 4), (96, 4)])
def test_every_position_is_held_once_and_every_rank_holds_an_early_and_a_late_chunk(seq, n):
    held = [implementation("load_balanced_positions")(seq, n, r) for r in range(n)]
    assert sorted(torch.cat(held).tolist()) == list(range(seq))
    c = seq // (2 * n)
    for r, pos in enumerate(held):
        assert pos[:c].tolist() == list(range(r * c, (r + 1) * c))                      # chunk r
        assert pos[c:].tolist() == list(range((2 * n - 1 - r) * c, (2 * n - r) * c))    # chunk 2n-1-r


@pytest.mark.exercise("load_balanced_positions")
def test_a_length_that_does_not_cut_into_2n_chunks_is_refused():
    with pytest.raises(ValueError, match=r"10.*6"):
        implementation("load_balanced_positions")(10, 3, 0)


def test_a_rank_outside_the_group_is_refused():
    with pytest.raises(ValueError, match="rank 3 is not a rank of a context-parallel group of 3"):
        load_balanced_positions(12, 3, 3)


# The online-softmax merge (exercise merge_partials).

def _partial(q, k, v, keep):
    """Attention of q over the keys where keep is True: (out, lse), out 0 and lse -inf for rows that see none."""
    s = (q @ k.transpose(-2, -1)).masked_fill(~keep, float("-inf"))
    lse = s.logsumexp(-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    return p @ v, lse


@pytest.mark.exercise("merge_partials")
@pytest.mark.parametrize("seed", [0, 1])
def test_merging_two_disjoint_key_sets_gives_attention_over_their_union(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(2, 5, 8, generator=g), torch.randn(2, 7, 8, generator=g), torch.randn(2, 7, 8, generator=g)
    a = torch.rand(5, 7, generator=g) < 0.5
    a[:, 0] = True                                       # every row sees key 0 in part a (the union is never empty)
    b = ~a
    expected = ((q @ k.transpose(-2, -1))).softmax(-1) @ v
    parts = _partial(q, k, v, a), _partial(q, k, v, b)
    copies = [t.clone() for part in parts for t in part]
    for first, second in (parts, parts[::-1]):           # in either order
        out, lse = implementation("merge_partials")(*first, *second)
        assert (out - expected).abs().max().item() <= 1e-6
        assert (lse - (q @ k.transpose(-2, -1)).logsumexp(-1)).abs().max().item() <= 1e-6
    assert all(torch.equal(t, c) for t, c in zip([t for part in parts for t in part], copies))  # inputs untouched


@pytest.mark.exercise("merge_partials")
def test_rows_without_keys_in_one_or_both_parts():
    out_a, lse_a = torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]), torch.tensor([0.5, float("-inf"), -math.inf])
    out_b, lse_b = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]]), torch.tensor([-math.inf, 1.5, -math.inf])
    out, lse = implementation("merge_partials")(out_a, lse_a, out_b, lse_b)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert out[0].tolist() == [1.0, 2.0] and lse[0].item() == 0.5      # only part a saw keys: a unchanged
    assert out[1].tolist() == [3.0, 4.0] and lse[1].item() == 1.5      # only part b
    assert out[2].tolist() == [0.0, 0.0] and lse[2].item() == -math.inf  # neither


@pytest.mark.exercise("merge_partials")
def test_merge_is_stable_at_extreme_log_sum_exps():
    # fp32: exp(100) overflows (above 3.4e38) and exp(-200) underflows to 0, yet their logs are ordinary numbers.
    lse_a, lse_b = torch.tensor([100.0, -200.0, 100.0]), torch.tensor([99.0, -201.0, -math.inf])
    out_a, out_b = torch.tensor([[1.0], [1.0], [1.0]]), torch.tensor([[0.0], [0.0], [0.0]])
    out, lse = implementation("merge_partials")(out_a, lse_a, out_b, lse_b)
    share = 1 / (1 + math.exp(-1))             # part a's weight when its lse is 1 above part b's: e / (e + 1)
    expected = [100 + math.log1p(math.exp(-1)), -200 + math.log1p(math.exp(-1)), 100.0]
    assert torch.allclose(lse.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-5), lse
    assert torch.allclose(out.squeeze(-1).double(), torch.tensor([share, share, 1.0], dtype=torch.float64),
                          atol=1e-6), out


# Ring attention on ranks.

@pytest.mark.parametrize("n", [2, 3, 4])
def test_ring_attention_equals_one_process_and_sends_the_formula(n):
    per_rank = launch(ring_vs_one_process, n)
    assert max(r["diff"] for r in per_rank) <= ATTN_TOL
    formula = ring_attention_bytes(n, 2, 3, 24 // n, 8)
    assert all(r["counted"] and r["bytes"] == formula for r in per_rank)       # every rank sends (3N-2) blocks
    assert all(r["messages"] == 3 * n - 2 for r in per_rank)
    assert len({r["work"] for r in per_rank}) == 1                              # the same work on every rank


def _counting_batches():
    from minidist import comm
    batches, original = [], comm.batch_isend_irecv

    def counting(ops):
        batches.append(sorted(op.op.__name__ for op in ops))
        return original(ops)
    comm.batch_isend_irecv = counting
    try:
        return batches, ring_vs_one_process()["messages"]
    finally:
        comm.batch_isend_irecv = original


def test_every_ring_step_posts_its_send_and_receive_as_one_batch():
    # Posted apart, at cp = 2 two NCCL ranks could each wait in a send for a receive queued behind the other's.
    for batches, messages in launch(_counting_batches, 2):
        assert batches == [["irecv", "isend"]] * 4 and messages == 4      # 3N-2 blocks, each sent in a batch


def test_the_contiguous_layout_is_exact_too_but_its_work_grows_with_the_rank():
    per_rank = launch(ring_vs_one_process, 3, False)
    assert max(r["diff"] for r in per_rank) <= ATTN_TOL
    work = [r["work"] for r in per_rank]
    assert work == [64, 128, 192]            # rank r sees r + 1 blocks of (24/3)^2 scores (the diagonal one whole)
    balanced = launch(ring_vs_one_process, 3)[0]["work"]
    assert balanced * 3 < sum(work)          # and the zig-zag layout skips more: no rank does more than needed


def _positions_run():
    from minidist.tour.parallel3d import causal_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=g) for _ in range(3))
    for bad, message in ((layout(12, 2), "do not describe 2 ranks holding 4"),
                         (layout(8, 2).float(), "an integer tensor"),
                         (torch.arange(8).view(2, 4), r"shape \(2, 4\)"),
                         (torch.tensor([[[0, 1, 2, 3]], [[0, 5, 6, 7]]]), "0 .. 7 exactly once: 1 of them"),
                         (torch.tensor([[[0, 1, 2, 3]], [[4, 5, 6, 9]]]), "0 .. 7 exactly once: 1 of them")):
        with pytest.raises(ValueError, match=message):
            ring_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], None, bad)
    # Any permutation is exact, pieces out of order or not contiguous, whole rows seeing no key in a block included
    # (rank 0's position 0 sees nothing of rank 1's block): no NaN.
    positions = torch.tensor([[[0, 7], [3, 4]], [[5, 2], [6, 1]]])
    mine = positions[torch.distributed.get_rank()].flatten()
    local = [t[:, :, mine].clone().requires_grad_() for t in (q, k, v)]
    dense = [t.clone().requires_grad_() for t in (q, k, v)]
    dout = torch.randn(1, 2, 8, 4, generator=g)
    out = ring_attention(*local, None, positions)
    out.backward(dout[:, :, mine])
    causal_attention(*dense).backward(dout)
    return max([(out - causal_attention(q, k, v)[:, :, mine]).abs().max().item()] +
               [(a.grad - d.grad[:, :, mine]).abs().max().item() for a, d in zip(local, dense)])


def test_bad_positions_are_refused_and_any_permutation_is_exact():
    assert max(launch(_positions_run, 2)) <= ATTN_TOL


def test_context_parallelism_needs_whole_sequences_and_no_dropout():
    from minidist.context_parallel import apply_context_parallel

    def run():
        model = apply_context_parallel(GPT(GPTConfig(n_layer=1, n_embd=16, block_size=8)))
        with pytest.raises(ValueError, match="block_size 8"):
            shard_sequence(torch.zeros(2, 6, dtype=torch.long), model)
        with pytest.raises(ValueError, match="dropout"):
            apply_context_parallel(GPT(GPTConfig(n_layer=1, n_embd=16, block_size=8, dropout=0.1)))
        return shard_sequence(torch.arange(16).view(2, 8), model)[0].tolist()
    assert launch(run, 2) == [[0, 1, 6, 7], [2, 3, 4, 5]]


# The tiny GPT with context parallelism (5 AdamW steps).

@pytest.mark.parametrize("n", [2, 3])
def test_the_tiny_gpt_with_context_parallelism_trains_like_one_process(n):
    per_rank = launch(mesh_vs_one_process, n, dict(cp=n), 1)
    assert max(r["diff"] for r in per_rank) <= ADAM_TOL
    assert max(r["divergence"] for r in per_rank) == 0


def test_without_averaging_gradients_over_cp_it_does_not(monkeypatch):
    # Each cp rank's gradient covers only its own tokens' loss: not averaging them over cp trains another model.
    monkeypatch.setattr(t3.ParallelRun, "__init__", _dp_only(t3.ParallelRun.__init__))
    per_rank = launch(mesh_vs_one_process, 2, dict(cp=2), 1)
    assert max(r["diff"] for r in per_rank) > 10 * ADAM_TOL


def _dp_only(init):
    import minidist.parallel3d as p3

    def patched(self, *args, **kwargs):
        original, p3.grad_axes = p3.grad_axes, lambda mesh: ("dp",)
        try:
            init(self, *args, **kwargs)
        finally:
            p3.grad_axes = original
    return patched


def _bf16_errors():
    """Max error against float64 attention of ring attention and of plain attention, both on bf16 inputs."""
    import torch.distributed as dist
    import torch.nn.functional as F
    n, me = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 64, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mine = layout(64, n)[me].flatten()
    out = ring_attention(q[:, :, mine], k[:, :, mine], v[:, :, mine])
    return ((out.double() - reference[:, :, mine]).abs().max().item(),
            (plain.double() - reference).abs().max().item(), out.dtype)


@pytest.mark.parametrize("n", [2, 4])
def test_ring_attention_under_bf16_is_as_accurate_as_plain_bf16_attention(n):
    """The online softmax's state is kept in fp32 (merged in bf16 its max error was 0.021, plain bf16 attention's
    0.0086): then only the output's one rounding to bf16 remains."""
    for ring_err, plain_err, dtype in launch(_bf16_errors, n):
        assert dtype == torch.bfloat16
        assert ring_err <= plain_err, (ring_err, plain_err)


# The causal skip, block by block (exercise causal_pairs).

@pytest.mark.exercise("causal_pairs")
def test_causal_pairs_by_hand():
    pairs = implementation("causal_pairs")
    pos = layout(12, 3)                      # rank 0: [0 1][10 11], rank 1: [2 3][8 9], rank 2: [4 5][6 7]
    assert pairs(pos[0], pos[1]) == [[], [0, 1]]        # 0-1 see nothing of rank 1; 10-11 see all of it
    assert pairs(pos[1], pos[0]) == [[0], [0]]          # 2-3 and 8-9 see 0-1, never 10-11
    assert pairs(pos[2], pos[2]) == [[0], [0, 1]]       # the diagonal: own pieces, the future one skipped
    assert pairs(pos[1], pos[1]) == [[0], [0, 1]]
    assert pairs(torch.tensor([[3, 0]]), torch.tensor([[1, 2], [3, 9], [4, 5]])) == [[0, 1]]  # unordered pieces
    assert pairs(torch.tensor([[5, 6, 7]]), torch.tensor([[7, 8, 9]])) == [[0]]   # one key on the diagonal is enough
    assert pairs(layout(8, 1)[0], layout(8, 1)[0]) == [[0], [0, 1]]                # one rank: 0-3, 4-7
    assert pairs(layout(6, 2, False)[1], layout(6, 2, False)[0]) == [[0]]          # contiguous: the past, whole


def _ring_with_learners_pairs(balanced: bool):
    import minidist.context_parallel as cp
    cp._pairs = implementation("causal_pairs")   # what RingAttention calls, in this rank's process only
    return ring_vs_one_process(balanced)


@pytest.mark.exercise("causal_pairs")
def test_ring_attention_with_causal_pairs_is_exact_and_skips_exactly_the_future_blocks():
    # 24 positions on 3 ranks: balanced, chunks of 4 and 16 scores per (query chunk, key chunk) pair: 3 pairs on the
    # own block and 2 on each of the 2 others (module docstring), 7 x 16 per batch row and head on every rank.
    per_rank = launch(_ring_with_learners_pairs, 3, True)
    assert max(r["diff"] for r in per_rank) <= ATTN_TOL
    assert [r["work"] for r in per_rank] == [7 * 16] * 3
