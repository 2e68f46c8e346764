"""Mixed precision: the loss scaler against torch.amp.GradScaler, fp16 and bf16 data parallel against one process."""
import pytest
import torch

from minidist import launch
from minidist.grading import implementation
from minidist.mixed_precision import LossScaler, MixedPrecisionOptimizer
from minidist.tour.data_parallel import BF16_TOL, FP16_TOL, bf16_side_by_side, fp16_side_by_side


@pytest.mark.exercise("loss_scale_update")
def test_update_scale_by_hand():
    update_scale = implementation("loss_scale_update")
    assert update_scale(1024.0, 5, found_inf=True) == (512.0, 0)
    assert update_scale(1024.0, 5, found_inf=False, growth_interval=10) == (1024.0, 6)
    assert update_scale(1024.0, 9, found_inf=False, growth_interval=10) == (2048.0, 0)
    assert update_scale(8.0, 0, True, backoff_factor=0.25) == (2.0, 0)


def test_bad_scaler_settings():
    with pytest.raises(ValueError, match="growth_factor > 1"):
        LossScaler(growth_factor=1.0)


@pytest.mark.exercise("loss_scale_update")
def test_same_scales_skips_and_weights_as_grad_scaler():
    """Drive both scalers with the same model and data; overflow on purpose at steps 2 and 3."""
    update_scale = implementation("loss_scale_update")
    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    theirs.load_state_dict(ours.state_dict())
    opt_ours, opt_theirs = torch.optim.SGD(ours.parameters(), lr=0.1), torch.optim.SGD(theirs.parameters(), lr=0.1)
    scaler = LossScaler(init_scale=2.0 ** 10)  # used for scale_loss and unscale_; the update is the exercise's
    reference = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    scales, reference_scales = [], []
    for step in range(10):
        x = torch.randn(8, 4)
        blow_up = float("inf") if step in (2, 3) else 1.0
        scaler.scale_loss(ours(x).pow(2).mean() * blow_up).backward()
        found_inf = scaler.unscale_([p.grad for p in ours.parameters()])
        if not found_inf:
            opt_ours.step()
        scaler.scale, scaler.good_steps = update_scale(scaler.scale, scaler.good_steps, found_inf, growth_interval=3)
        opt_ours.zero_grad()
        reference.scale(theirs(x).pow(2).mean() * blow_up).backward()
        reference.step(opt_theirs)
        reference.update()
        opt_theirs.zero_grad()
        scales.append(scaler.scale)
        reference_scales.append(reference.get_scale())
    assert scales == reference_scales == [1024, 1024, 512, 256, 256, 256, 512, 512, 512, 1024]
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters()))


def test_loss_scaler_follows_the_rule():
    scaler = LossScaler(init_scale=8.0, growth_interval=2)
    for found_inf, expected in ((False, 8.0), (False, 16.0), (True, 8.0), (False, 8.0)):
        scaler.update(found_inf)
        assert scaler.scale == expected


@pytest.mark.parametrize("world_size", [2, 3])
def test_fp16_data_parallel_with_master_weights_matches_one_process(world_size):
    for diff, skipped, ref_skipped, scales, ref_scales, divergence in launch(fp16_side_by_side, world_size, 2.0 ** 16):
        assert skipped == ref_skipped == 0 and scales == ref_scales
        assert divergence == 0.0  # every rank applied the same reduced bytes
        assert diff < FP16_TOL  # fp16 gradients differ in their last bits; see minidist/tour/data_parallel.py


def test_an_overflowing_scale_backs_off_and_every_rank_skips_the_same_steps():
    # 2^20 overflows fp16's 65504 in the first backward passes: steps are skipped until the scale has backed off,
    # then training proceeds (2 of the 4 steps here), still matching one process that skipped the same steps.
    results = launch(fp16_side_by_side, 2, 2.0 ** 20)
    assert len({tuple(r[3]) for r in results}) == 1  # all ranks went through the same scales
    diff, skipped, ref_skipped, scales, ref_scales, divergence = results[0]
    assert divergence == 0.0 and scales == ref_scales  # the same scale after every step, not just as many skips
    scale = scales[-1]
    assert 1 <= skipped == ref_skipped < 4
    assert scale < 2.0 ** 20
    assert diff < FP16_TOL


@pytest.mark.parametrize("world_size", [2, 3])
def test_bf16_autocast_data_parallel_matches_one_process(world_size):
    for diff, divergence in launch(bf16_side_by_side, world_size):
        assert diff < BF16_TOL
        assert divergence == 0.0  # a LayerNorm gradient left unaveraged would pass the tolerance but not this


def unscale_clip_step(max_norm):
    """minidist's unscale_ -> clip -> step against GradScaler's unscale_ -> clip_grad_norm_ -> step (fp32 model)."""
    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    theirs.load_state_dict(ours.state_dict())
    opt = MixedPrecisionOptimizer(ours, torch.optim.SGD, LossScaler(2.0 ** 8), lr=0.5)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    norms = []
    for _ in range(3):
        x = torch.randn(16, 6) * 10
        opt.scaler.scale_loss(ours(x).pow(2).mean()).backward()
        before = [p.grad.clone() for p in ours.parameters()]
        opt.unscale_()
        norms.append(opt.clip_grad_norm_(max_norm))
        opt.step()
        untouched = all(torch.equal(p.grad, b) for p, b in zip(ours.parameters(), before))
        opt.zero_grad()
        scaler.scale(theirs(x).pow(2).mean()).backward()
        scaler.unscale_(opt_theirs)
        norms.append(torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm).item())
        scaler.step(opt_theirs)
        scaler.update()
        opt_theirs.zero_grad()
    diff = max((p - q).abs().max().item() for p, q in zip(ours.parameters(), theirs.parameters()))
    return diff, norms, untouched


def test_unscale_then_clip_then_step_matches_grad_scaler():
    diff, norms, untouched = unscale_clip_step(max_norm=1.0)
    assert norms[0] > 1.0  # the clip did something
    assert diff < 1e-6, diff
    assert all(abs(a - b) <= 1e-4 * b for a, b in zip(norms[::2], norms[1::2]))
    assert untouched  # the fp32 model's own .grad was copied, not unscaled in place


def test_growth_never_reaches_inf():
    scaler = LossScaler(init_scale=1.5e308, growth_interval=1)  # doubling it overflows a Python float to inf
    scaler.update(False)
    assert scaler.scale == 1.5e308
