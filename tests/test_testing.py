"""The reference harness: it passes a correct technique and catches a wrong one."""
import pytest
import torch
import torch.distributed as dist

from minidist import launch
from minidist.data import random_batches
from minidist.data_parallel import average_gradients_
from minidist.models import GPT, GPTConfig, lm_loss
from minidist.testing import (
    adam,
    assert_replicas_in_sync,
    compare_with_reference,
    replica_divergence,
    shard_batch,
)
from minidist.tour.data_parallel import ADAM_LR, ADAM_TOL

CFG = GPTConfig(n_layer=1, n_embd=32, block_size=16)
BATCHES = random_batches(torch.randint(512, (5000,), generator=torch.Generator().manual_seed(1)), 12, 16, steps=4)


def averaged_step(module, opt, batch):
    """The simplest correct data parallelism: all-reduce every gradient and divide by N, then step."""
    x, y = batch
    loss = lm_loss(module(x), y)
    loss.backward()
    average_gradients_(module.parameters())
    opt.step()
    opt.zero_grad()
    return loss.item()


def local_step(module, opt, batch):
    """Wrong on purpose: each rank trains on its own slice and never communicates."""
    x, y = batch
    lm_loss(module(x), y).backward()
    opt.step()
    opt.zero_grad()
    return 0.0


def harness(step, optimizer=None):
    kwargs = {"optimizer": optimizer} if optimizer else {}
    trained = {}

    def wrap(model):
        trained["model"] = model
        return model
    result = compare_with_reference(lambda: GPT(CFG), wrap, BATCHES, step=step, **kwargs)
    return result.max_abs_diff, replica_divergence(trained["model"])


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_correct_technique_matches_the_single_process_reference(world_size):
    for diff, divergence in launch(harness, world_size, averaged_step):
        assert diff < 1e-6
        assert divergence == 0.0


def test_adam_too():
    for diff, _ in launch(harness, 2, averaged_step, adam(ADAM_LR)):
        assert diff < ADAM_TOL  # the README's Adam bound: 1% of lr x steps


def test_a_wrong_technique_is_caught():
    for diff, divergence in launch(harness, 2, local_step):
        assert diff > 1e-3
        assert divergence > 1e-3


def out_of_sync():
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(dist.get_rank())
    assert_replicas_in_sync(model)


def test_assert_replicas_in_sync_fails_on_every_rank():
    with pytest.raises(Exception, match="replicas out of sync: parameters differ from rank 0's by up to 1"):
        launch(out_of_sync, 2)


def test_shard_batch():
    x = torch.arange(12).view(6, 2)
    assert torch.equal(shard_batch((x,), 1, 3)[0], x[2:4])
    with pytest.raises(ValueError, match="global batch of 6 does not divide across 4 ranks"):
        shard_batch((x,), 0, 4)
