"""Distributed samplers: coverage, equal lengths per rank, torch's DistributedSampler as reference, padding waste."""
import pytest
import torch
from torch.utils.data import DistributedSampler as TorchDistributedSampler

from minidist.grading import implementation
from minidist.samplers import (DistributedSampler, LengthGroupedSampler, TokenBudgetBatchSampler, distributed_indices,
                               padding_waste)

CASES = [(10, 3), (12, 4), (7, 2), (2, 4), (1, 3), (100, 5), (0, 2)]


@pytest.mark.exercise("distributed_indices")
@pytest.mark.parametrize("n, replicas", CASES)
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_same_indices_as_torch(n, replicas, shuffle, drop_last):
    distributed_indices, data = implementation("distributed_indices"), list(range(n))
    for epoch in (0, 3):
        for rank in range(replicas):
            theirs = TorchDistributedSampler(data, replicas, rank, shuffle=shuffle, seed=7, drop_last=drop_last)
            theirs.set_epoch(epoch)
            assert distributed_indices(n, replicas, rank, shuffle, 7, epoch, drop_last) == list(theirs)


def test_the_sampler_class_matches_torch():
    for rank in range(3):
        theirs = TorchDistributedSampler(range(10), 3, rank, seed=7)
        theirs.set_epoch(2)
        ours = DistributedSampler(range(10), 3, rank, seed=7)
        ours.set_epoch(2)
        assert list(ours) == list(theirs) and len(ours) == len(theirs)


@pytest.mark.exercise("distributed_indices")
@pytest.mark.parametrize("n, replicas", CASES)
def test_coverage_and_equal_lengths(n, replicas):
    distributed_indices = implementation("distributed_indices")
    shares = [distributed_indices(n, replicas, r, seed=1) for r in range(replicas)]
    assert len({len(s) for s in shares}) == 1                       # every rank runs the same number of steps
    assert set().union(*shares) == set(range(n))                    # every sample read
    dropped = [distributed_indices(n, replicas, r, drop_last=True) for r in range(replicas)]
    flat = [i for s in dropped for i in s]
    assert len(flat) == len(set(flat)) == n - n % replicas          # no repeats, the tail dropped


@pytest.mark.exercise("distributed_indices")
def test_set_epoch_reshuffles_and_seed_is_shared():
    distributed_indices = implementation("distributed_indices")
    a = distributed_indices(50, 2, 0, seed=3, epoch=0)
    assert a != distributed_indices(50, 2, 0, seed=3, epoch=1)
    assert a == distributed_indices(50, 2, 0, seed=3, epoch=0)


@pytest.mark.parametrize("replicas, rank", [(0, 0), (2, 2), (2, -1), (2.0, 0)])
def test_bad_rank(replicas, rank):
    with pytest.raises(ValueError, match="num_replicas must be a positive integer|is not in"):
        distributed_indices(10, replicas, rank)


LENGTHS = [int(x) for x in torch.randint(1, 200, (997,), generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("replicas", [1, 2, 3, 4])
def test_length_grouped_batches_are_similar_within_a_step_across_ranks(replicas):
    b = 8
    per_rank = [list(LengthGroupedSampler(LENGTHS, b, replicas, r, seed=2)) for r in range(replicas)]
    assert len({len(s) for s in per_rank}) == 1 and len(per_rank[0]) % b == 0
    assert set().union(*per_rank) == set(range(len(LENGTHS)))
    steps = len(per_rank[0]) // b
    batches = [[s[k * b:(k + 1) * b] for k in range(steps)] for s in per_rank]
    # ranks see similar lengths: no rank is systematically shorter (the seed's sampler gave rank 0 the shortest)
    means = [sum(LENGTHS[i] for batch in rb for i in batch) / len(per_rank[0]) for rb in batches]
    assert max(means) - min(means) < 0.1 * (sum(LENGTHS) / len(LENGTHS))
    waste = padding_waste([batch for rb in batches for batch in rb], LENGTHS)
    random = padding_waste([list(range(i, min(i + b, len(LENGTHS)))) for i in range(0, len(LENGTHS), b)], LENGTHS)
    assert waste < 0.05 < 0.4 < random


@pytest.mark.exercise("token_budget_batches")
def test_token_budget_batches_by_hand():
    token_budget_batches = implementation("token_budget_batches")
    assert token_budget_batches([3, 3, 4, 10, 2], max_tokens=10) == [[0, 1], [2], [3], [4]]
    assert token_budget_batches([2, 2, 2, 2, 2, 2], max_tokens=8) == [[0, 1, 2, 3], [4, 5]]
    assert token_budget_batches([50, 1, 1], max_tokens=10) == [[0], [1, 2]]  # too long: alone in its batch
    assert token_budget_batches([], max_tokens=10) == []


@pytest.mark.exercise("token_budget_batches")
@pytest.mark.parametrize("max_tokens", [1, 150, 1000, 4096])
def test_token_budget_batches_keep_order_budget_and_every_sample(max_tokens):
    lengths = sorted(LENGTHS)
    batches = implementation("token_budget_batches")(lengths, max_tokens)
    assert [i for b in batches for i in b] == list(range(len(lengths)))   # in order, each sample once
    for k, batch in enumerate(batches):
        longest = max(lengths[i] for i in batch)
        assert len(batch) * longest <= max_tokens or len(batch) == 1
        if k + 1 < len(batches):  # greedy: the next sample would not have fitted
            nxt = batches[k + 1][0]
            assert (len(batch) + 1) * max(longest, lengths[nxt]) > max_tokens


@pytest.mark.parametrize("replicas", [1, 2, 3, 4])
@pytest.mark.parametrize("max_tokens", [150, 1000, 4096])
def test_token_budget_sampler(replicas, max_tokens):
    samplers = [TokenBudgetBatchSampler(LENGTHS, max_tokens, replicas, r, seed=5) for r in range(replicas)]
    per_rank = [list(s) for s in samplers]
    assert len({len(batches) for batches in per_rank}) == 1 == len({len(s) for s in samplers})
    assert len(per_rank[0]) == len(samplers[0])
    used = [i for batches in per_rank for batch in batches for i in batch]
    assert set(used) == set(range(len(LENGTHS)))                    # every sample used
    for batches in per_rank:
        for batch in batches:
            longest = max(LENGTHS[i] for i in batch)
            assert len(batch) * longest <= max_tokens or len(batch) == 1
    batches = [b for bs in per_rank for b in bs]
    g = torch.Generator().manual_seed(0)
    shuffled = torch.randperm(len(LENGTHS), generator=g).tolist()
    sizes, random, k = [len(b) for b in batches], [], 0
    for size in sizes:  # the same batch sizes filled at random
        random.append([shuffled[(k + j) % len(shuffled)] for j in range(size)])
        k += size
    assert padding_waste(batches, LENGTHS) < min(0.1, padding_waste(random, LENGTHS) / 4)


def test_token_budget_sampler_reshuffles_per_epoch():
    ranks = [TokenBudgetBatchSampler(LENGTHS, 1000, 2, r, seed=5) for r in range(2)]
    first = [list(s) for s in ranks]
    for s in ranks:
        s.set_epoch(1)
    second = [list(s) for s in ranks]
    assert second[0] != first[0]  # a new order of batches...
    covered = [{i for per_rank in epoch for b in per_rank for i in b} for epoch in (first, second)]
    assert covered[0] == covered[1] == set(range(len(LENGTHS)))  # ...of the same samples, every one read


def test_bad_budget():
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        TokenBudgetBatchSampler(LENGTHS, 0, 2, 0)


@pytest.mark.exercise("straggler_idle")
def test_straggler_idle_by_hand():
    straggler_idle = implementation("straggler_idle")
    assert straggler_idle([[3, 3], [5, 5]]) == 0.0                  # balanced: nobody waits
    assert straggler_idle([[4, 2]]) == pytest.approx(2 / 8)         # rank 1 waits 2 of the 2 x 4 rank-seconds
    assert straggler_idle([[4, 2], [1, 3]]) == pytest.approx((2 + 2) / (8 + 6))
    assert straggler_idle([[7], [9]]) == 0.0                        # one rank never waits
    assert straggler_idle([]) == 0.0


def test_token_budget_batches_leave_ranks_less_idle_than_random_batches():
    from minidist.samplers import padded_tokens_per_step
    random_batches = [list(DistributedSampler(range(len(LENGTHS)), 4, r, seed=0)) for r in range(4)]
    random_batches = [[b[i:i + 8] for i in range(0, len(b) - 7, 8)] for b in random_batches]
    budget = [list(TokenBudgetBatchSampler(LENGTHS, 1000, 4, r, seed=0)) for r in range(4)]
    from minidist.samplers import straggler_idle
    idle_random = straggler_idle(padded_tokens_per_step(random_batches, LENGTHS))
    idle_budget = straggler_idle(padded_tokens_per_step(budget, LENGTHS))
    assert idle_budget < idle_random / 2, (idle_budget, idle_random)
