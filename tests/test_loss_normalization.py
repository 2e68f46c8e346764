"""Loss normalization across ranks with unequal batches, and the mixed-precision step's exercises."""
import pytest
import torch
import torch.distributed as dist

from minidist import launch
from minidist.grading import implementation
from minidist.tour.data_parallel import unequal_batches

SIZES = {2: [3, 23], 3: [3, 23, 10]}  # sequences per rank: rank 1 holds 7.7x rank 0's


def with_learners_function(sizes, normalize, micro_steps):
    """The tour's rank function, with the learner's global_mean_loss in place of minidist's."""
    import minidist.data_parallel as dp_module
    dp_module.global_mean_loss = implementation("global_mean_loss")
    return unequal_batches(sizes, normalize, micro_steps)


@pytest.mark.exercise("global_mean_loss")
@pytest.mark.parametrize("world_size, micro_steps", [(2, 1), (3, 1), (2, 3)])
def test_global_mean_loss_gives_the_global_batch_gradient(world_size, micro_steps):
    for r in launch(with_learners_function, world_size, SIZES[world_size], "global", micro_steps):
        assert r["diff"] < 1e-6 and r["divergence"] == 0.0


def test_averaging_per_rank_means_is_biased_with_unequal_batches():
    for r in launch(unequal_batches, 2, SIZES[2], "per-rank"):
        assert r["relative_error"] > 0.1 and r["divergence"] == 0.0  # consistent across ranks, and wrong


def zero_everywhere():
    implementation("global_mean_loss")(torch.zeros((), requires_grad=True), 0)


@pytest.mark.exercise("global_mean_loss")
def test_global_mean_loss_with_no_sample_anywhere_is_an_error():
    with pytest.raises(Exception, match="the total count is 0"):
        launch(zero_everywhere, 2)


@pytest.mark.exercise("unscale_and_check")
def test_unscale_and_check_divides_and_finds_non_finite_values():
    unscale = implementation("unscale_and_check")
    grads = [torch.full((3,), 8.0), torch.full((2, 2), -4.0)]
    assert unscale(grads, 4.0) is False
    assert torch.equal(grads[0], torch.full((3,), 2.0)) and torch.equal(grads[1], torch.full((2, 2), -1.0))
    for bad in (float("inf"), float("nan"), float("-inf")):
        assert unscale([torch.ones(3), torch.tensor([1.0, bad])], 2.0) is True


def agreed_inf():
    bad = float("inf") if dist.get_rank() == 2 else 1.0
    unscale = implementation("unscale_and_check")
    return unscale([torch.tensor([bad])], 1.0), unscale([torch.tensor([bad])], 1.0, agree=True)


@pytest.mark.exercise("unscale_and_check")
def test_unscale_and_check_agrees_across_ranks():
    assert launch(agreed_inf, 3) == [(False, True), (False, True), (True, True)]


@pytest.mark.exercise("clip_grad_norm")
@pytest.mark.parametrize("max_norm", [0.1, 1.0, 100.0])
def test_clip_grad_norm_against_torch(max_norm):
    clip = implementation("clip_grad_norm")
    torch.manual_seed(1)
    grads = [torch.randn(4, 3), torch.randn(5)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norm = clip(grads, max_norm)
    assert abs(norm - torch.nn.utils.clip_grad_norm_(params, max_norm).item()) < 1e-5
    assert all((g - p.grad).abs().max() < 1e-6 for g, p in zip(grads, params))
    small = [torch.full((3,), 0.01)]
    clip(small, 10.0)
    assert torch.equal(small[0], torch.full((3,), 0.01))  # within the bound: untouched, bit for bit


def sharded_clip():
    n, r = dist.get_world_size(), dist.get_rank()
    full = torch.arange(1.0, 13.0)
    shard = [full.tensor_split(n)[r].clone()]
    norm = implementation("clip_grad_norm")(shard, 2.0, sharded=True)
    return norm, shard[0]


@pytest.mark.exercise("clip_grad_norm")
def test_clip_grad_norm_of_shards_uses_the_global_norm():
    full = torch.arange(1.0, 13.0)
    for r, (norm, shard) in enumerate(launch(sharded_clip, 3)):
        assert abs(norm - full.norm().item()) < 1e-4
        assert torch.allclose(shard, (2.0 * full / full.norm()).tensor_split(3)[r], atol=1e-5)


def _global_mean_loss_on_meta():
    import minidist.data_parallel.wrapper as wrapper
    from minidist.data_parallel import global_mean_loss
    original, wrapper.comm.all_reduce_sum = wrapper.comm.all_reduce_sum, lambda t, group=None: t * 1
    try:   # a loss and a token count on the meta device stand in for a GPU's: reading their values raises
        loss = global_mean_loss(torch.ones((), device="meta"), torch.tensor(7, device="meta"))
    finally:
        wrapper.comm.all_reduce_sum = original
    return loss.device.type, loss.dtype


def test_global_mean_loss_never_reads_the_device():
    """Called every micro-step: a .item() (or float(count) of a device count) would sync with the GPU each time."""
    assert launch(_global_mean_loss_on_meta, 1) == [("meta", torch.float32)]
