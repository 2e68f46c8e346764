"""Data parallel: equal to one process on the global batch and to torch DDP; bytes and collectives by the formula."""
import math
from fractions import Fraction

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from minidist import comm, launch
from minidist.data_parallel import MiB, DataParallel
from minidist.grading import implementation
from minidist.models import GPT, count_params, lm_loss
from minidist.testing import adam, compare_with_reference, replica_divergence, sgd
from minidist.tour.data_parallel import (ADAM_LR, ADAM_TOL, BATCHES, CFG, SGD_TOL, STAGES, accumulation,
                                         side_by_side_with_ddp, stage_against_one_process)



@pytest.mark.exercise("assign_buckets")
def test_buckets_by_hand():
    assign_buckets = implementation("assign_buckets")
    # parameters of 5, 3 and 4 elements, walked in reverse: 4, 3, 5
    assert assign_buckets([5, 3, 4], cap=6) == [[(2, 0, 4), (1, 0, 2)], [(1, 2, 3), (0, 0, 5)]]
    assert assign_buckets([5, 3, 4], cap=2) == [[(2, 0, 2)], [(2, 2, 4)], [(1, 0, 2)], [(1, 2, 3), (0, 0, 1)],
                                                [(0, 1, 3)], [(0, 3, 5)]]
    assert assign_buckets([5, 3, 4], cap=None) == [[(2, 0, 4)], [(1, 0, 3)], [(0, 0, 5)]]
    assert assign_buckets([5, 0, 4], cap=100) == [[(2, 0, 4), (0, 0, 5)]]
    assert assign_buckets([], cap=10) == []


@pytest.mark.exercise("assign_buckets")
@pytest.mark.parametrize("cap", [1, 7, 64, 1000, 10_000])
def test_buckets_cover_everything_once_in_ceil_total_over_cap(cap):
    numels = [17, 1, 300, 64, 5, 0, 129]
    buckets = implementation("assign_buckets")(numels, cap)
    assert len(buckets) == math.ceil(sum(numels) / cap)
    assert all(sum(b - a for _, a, b in bucket) == cap for bucket in buckets[:-1])
    covered = {i: [] for i in range(len(numels))}
    for bucket in buckets:
        for i, a, b in bucket:
            covered[i].append((a, b))
    for i, n in enumerate(numels):  # each parameter's pieces tile [0, n) in order
        ends = [0] + [b for _, b in sorted(covered[i])]
        assert ends[-1] == n and all(a == e for (a, _), e in zip(sorted(covered[i]), ends))


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("stage", list(STAGES))
def test_equals_one_process_on_the_global_batch_sgd(world_size, stage):
    n = world_size
    results = launch(stage_against_one_process, n, stage)
    for r in results:
        assert r["diff"] < SGD_TOL
        assert r["divergence"] == 0.0  # every rank applied the same bytes
        assert r["counted"] and r["collectives"] == r["buckets"]
    # Counted bytes: each rank sends 2(N-1) chunks of every bucket; summed over the ranks exactly 2(N-1) x 4Ψ.
    assert sum(r["bytes"] for r in results) == 2 * (n - 1) * 4 * results[0]["psi"]


@pytest.mark.parametrize("world_size", [2, 3])
def test_equals_one_process_on_the_global_batch_adam(world_size):
    for r in launch(stage_against_one_process, world_size, "overlapped", adam(ADAM_LR)):
        assert r["diff"] < ADAM_TOL
        assert r["divergence"] == 0.0


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_equals_torch_ddp(world_size):
    assert max(launch(side_by_side_with_ddp, world_size, sgd(0.1))) < 1e-6


def test_equals_torch_ddp_adam():
    assert max(launch(side_by_side_with_ddp, 3, adam(ADAM_LR))) < ADAM_TOL


def bytes_per_step(stage_kwargs, freeze_embeddings=False):
    torch.manual_seed(0)
    model = GPT(CFG)
    if freeze_embeddings:
        model.wpe.weight.requires_grad_(False)
    dp = DataParallel(model, **stage_kwargs)
    x, y = BATCHES[0]
    with comm.ring_backend(), comm.ByteLedger() as ledger:  # counted: minidist's own ring sends every byte
        lm_loss(dp(x), y).backward()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ledger.counted
    return ledger.total_bytes("all_reduce"), ledger.count("all_reduce"), ledger.count(), trainable


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("cap_mb", [None, 0.01, 0.05, 25])
def test_ledger_bytes_and_collectives_per_step(world_size, cap_mb):
    n = world_size
    results = launch(bytes_per_step, n, dict(bucket_cap_mb=cap_mb))
    assert sum(r[0] for r in results) == 2 * (n - 1) * 4 * results[0][3]  # counted bytes, summed over ranks
    for sent, count, everything, psi in results:
        expected = (sum(1 for p in GPT(CFG).parameters() if p.numel()) if cap_mb is None
                    else math.ceil(4 * psi / int(cap_mb * MiB)))
        assert count == everything == expected


def test_frozen_parameters_are_not_communicated():
    for sent, _, _, trainable in launch(bytes_per_step, 2, dict(bucket_cap_mb=0.05), True):
        assert trainable == count_params(GPT(CFG)) - CFG.block_size * CFG.n_embd
        assert sent == 4 * trainable  # 2(N-1)/N = 1 at N = 2


@pytest.mark.parametrize("world_size, micro_steps", [(2, 2), (3, 4), (4, 3)])
def test_no_sync_accumulation_equals_the_large_batch(world_size, micro_steps):
    psi = count_params(GPT(CFG))
    results = launch(accumulation, world_size, micro_steps)
    for diff, messages_inside_no_sync, synced_bytes in results:
        assert diff < 1e-7
        assert messages_inside_no_sync == 0
    assert sum(r[2] for r in results) == 2 * (world_size - 1) * 4 * psi  # counted, summed over the ranks


class Branchy(nn.Module):
    """`rare` is used only when the batch's first token is even; `never` is never used."""

    def __init__(self):
        super().__init__()
        self.emb, self.rare, self.never, self.out = (nn.Embedding(16, 8), nn.Linear(8, 8), nn.Linear(8, 8),
                                                     nn.Linear(8, 16))

    def forward(self, x):
        h = self.emb(x)
        if int(x[0, 0]) % 2 == 0:
            h = self.rare(h)
        return self.out(h)


def branchy_batches():
    g = torch.Generator().manual_seed(1)
    batches = []
    for step in range(4):
        x = torch.randint(16, (12, 5), generator=g)
        x[:, 0] = 2 * torch.randint(8, (12,), generator=g) + (step % 2)  # even first tokens on even steps only
        batches.append((x, torch.randint(16, (12, 5), generator=g)))
    return batches


def unused(find):
    kept = {}

    def wrap(model):
        kept["dp"] = DataParallel(model, find_unused_parameters=find)
        return kept["dp"]
    result = compare_with_reference(Branchy, wrap, branchy_batches())
    return result.max_abs_diff, kept["dp"].module.never.weight.grad


def test_parameters_without_gradient_need_find_unused_parameters():
    with pytest.raises(Exception, match=r"parameters \['never.weight', 'never.bias'\] received no gradient"):
        launch(unused, 2, False)


@pytest.mark.parametrize("world_size", [2, 3])
def test_parameters_without_gradient_in_some_steps(world_size):
    for diff, never_grad in launch(unused, world_size, True):
        assert diff < 1e-6
        assert never_grad is None  # no rank ever produced one: left alone, as in one process


def naive_function():
    torch.manual_seed(dist.get_rank())
    model = nn.Linear(3, 2)
    model.weight.grad, model.bias.grad = torch.full((2, 3), float(dist.get_rank())), None
    implementation("average_gradients")(model.parameters())
    return model.weight.grad, model.bias.grad


@pytest.mark.exercise("average_gradients")
def test_average_gradients_by_hand():
    for weight_grad, bias_grad in launch(naive_function, 3):
        assert torch.equal(weight_grad, torch.full((2, 3), 1.0))  # (0 + 1 + 2) / 3
        assert bias_grad is None


def bad_cap():
    DataParallel(nn.Linear(2, 2), bucket_cap_mb=0)


def test_bad_input():
    with pytest.raises(Exception, match="bucket_cap_mb must be positive"):
        launch(bad_cap, 2)


def starts_identical():
    torch.manual_seed(dist.get_rank())  # different weights on every rank...
    dp = DataParallel(GPT(CFG))
    return replica_divergence(dp)       # ...until DataParallel broadcasts rank 0's


def test_replicas_start_from_rank_0_weights():
    assert launch(starts_identical, 3) == [0.0, 0.0, 0.0]


def used_on_one_rank_only():
    torch.manual_seed(0)
    dp = DataParallel(Branchy(), find_unused_parameters=True)
    x = torch.randint(16, (3, 5))
    x[:, 0] = 2 * torch.randint(8, (3,)) + dist.get_rank()  # rank 0 takes the `rare` branch, rank 1 does not
    local = Branchy()
    local.load_state_dict(dp.module.state_dict())
    lm_loss(local(x), x).backward()
    lm_loss(dp(x), x).backward()
    return dp.module.rare.weight.grad, local.rare.weight.grad, dp.module.never.weight.grad


def test_a_parameter_used_on_some_ranks_only_is_averaged_with_zeros():
    (g0, local0, never0), (g1, local1, never1) = launch(used_on_one_rank_only, 2)
    assert local1 is None and never0 is None and never1 is None
    assert torch.equal(g0, g1)
    assert torch.allclose(g0, local0 / 2)  # (rank 0's gradient + nothing) / 2, as DDP does


def naive_training():
    average_gradients_ = implementation("average_gradients")

    def step(model, opt, batch):
        loss = lm_loss(model(batch[0]), batch[1])
        loss.backward()
        with comm.ByteLedger() as ledger:
            average_gradients_(model.parameters())
        step.collectives = ledger.count()
        opt.step()
        opt.zero_grad()
        return loss.item()
    kept = {}
    result = compare_with_reference(lambda: GPT(CFG), lambda m: kept.setdefault("m", m), BATCHES, step=step)
    return result.max_abs_diff, replica_divergence(kept["m"]), step.collectives


@pytest.mark.exercise("average_gradients")
@pytest.mark.parametrize("world_size", [2, 3])
def test_naive_averaging_trains_like_one_process(world_size):
    for diff, divergence, collectives in launch(naive_training, world_size):
        assert diff < SGD_TOL and divergence == 0.0
        assert collectives == len(list(GPT(CFG).parameters()))  # one all-reduce per parameter


def second_backward():
    dp = DataParallel(GPT(CFG))
    x, y = BATCHES[0]
    loss = lm_loss(dp(x), y)
    loss.backward(retain_graph=True)
    loss.backward()


def module_called_directly():
    dp = DataParallel(GPT(CFG))
    x, y = BATCHES[0]
    lm_loss(dp.module(x), y).backward()


@pytest.mark.parametrize("mistake", [second_backward, module_called_directly])
def test_a_backward_without_its_own_forward_is_an_error_not_a_silent_local_step(mistake):
    with pytest.raises(Exception, match="a second backward after one synchronized forward"):
        launch(mistake, 2)


def accumulate_with_a_branch_used_early():
    """`rare` is used in the no_sync micro-step only: its accumulated gradient must still be averaged."""
    torch.manual_seed(0)
    dp = DataParallel(Branchy(), find_unused_parameters=True)
    even = torch.full((3, 5), 2 * dist.get_rank())            # even first token: takes the `rare` branch
    odd = even + 1
    local = Branchy()
    local.load_state_dict(dp.module.state_dict())
    for x in (even, odd):  # what this rank accumulates on its own, without communication
        lm_loss(local(x), x).backward()
    with dp.no_sync():
        lm_loss(dp(even), even).backward()
    lm_loss(dp(odd), odd).backward()
    return dp.module.rare.weight.grad, local.rare.weight.grad


def test_find_unused_parameters_counts_gradients_accumulated_under_no_sync():
    (g0, local0), (g1, local1) = launch(accumulate_with_a_branch_used_early, 2)
    assert local0.abs().sum() > 0 and torch.equal(g0, g1)  # averaged: the same on both ranks...
    assert torch.allclose(g0, (local0 + local1) / 2, atol=1e-7)  # ...and the mean of what each rank accumulated
