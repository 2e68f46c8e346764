"""Offload: the pack/unpack round trip through a tier, activation offload bit-identical to none with the bytes on
disk equal to the formula, optimizer-state offload bit-identical with 2Ψ + 2Ψ left on the fast tier, errors."""
import copy

import pytest
import torch

from minidist import launch
from minidist.grading import implementation
from minidist.models import GPT, lm_loss
from minidist.offload import DiskTier, HostTier, bytes_by_location, make_tier, offload_activations, storage_bytes
from minidist.tour.checkpointing import CFG, offloaded_layer_bytes, optimizer_offload_against_plain, zero_offload


def views():
    base = torch.arange(24, dtype=torch.float32).view(4, 6)
    return {"contiguous": base, "transposed": base.t(), "offset": base[1:3, 2:], "empty": torch.zeros(0),
            "int64": torch.arange(5)}


@pytest.mark.exercise("pack_saved")
def test_pack_saved_copies_the_whole_storage_onto_the_tier(tmp_path):
    pack = implementation("pack_saved")
    tier = DiskTier(str(tmp_path))
    for name, t in views().items():
        stored, dtype, size, stride, offset = pack(t, tier)
        assert torch.equal(stored, storage_bytes(t)), name
        assert stored.untyped_storage().filename is not None, name  # a file of the disk tier
        assert (dtype, tuple(size), tuple(stride), offset) == (t.dtype, t.shape, t.stride(), t.storage_offset())
    assert tier.bytes_on_disk() > 0


@pytest.mark.exercise("unpack_saved")
def test_unpack_saved_rebuilds_the_tensor_in_fast_memory(tmp_path):
    from minidist.offload import pack_saved
    unpack = implementation("unpack_saved")
    tier = DiskTier(str(tmp_path))
    for name, t in views().items():
        packed = pack_saved(t, tier)
        back = unpack(packed, t.device)
        assert torch.equal(back, t) and back.stride() == t.stride() and back.dtype == t.dtype, name
        assert back.untyped_storage().filename is None, name  # a copy in memory, not the mapped file
        assert t.numel() == 0 or back.untyped_storage().data_ptr() != packed[0].untyped_storage().data_ptr()


def gradients(model, hooks=None):
    model.zero_grad()
    torch.manual_seed(7)
    x = torch.randint(512, (6, 16), generator=torch.Generator().manual_seed(1))
    with hooks or torch.enable_grad():
        loss = lm_loss(model(x), x)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("tier", ["disk", "cpu"])
def test_activation_offload_is_bit_identical_and_frees_its_files(tier, tmp_path):
    torch.manual_seed(0)
    plain = GPT(CFG)  # with dropout: the masks travel through the tier too
    model = copy.deepcopy(plain)
    t = make_tier(tier, str(tmp_path))
    hooks = offload_activations(t, keep=model)
    assert all(torch.equal(a, b) for a, b in zip(gradients(model, hooks), gradients(plain)))
    if tier == "disk":
        assert t.bytes_on_disk() == 0  # every file deleted once backward has used it
    layer = offloaded_layer_bytes()
    assert layer["files"] == layer["formula"] and layer["held"] == {"fast": 0, "cpu": 0, "disk": layer["formula"]}
    assert layer["files_after_free"] == 0


def test_views_of_one_storage_are_stored_once(tmp_path):
    tier = DiskTier(str(tmp_path))
    qkv = torch.randn(4, 9, requires_grad=True)

    def fn(t):
        q, k, v = (t * 1.0).chunk(3, dim=1)  # three views of one (4, 9) storage
        return (q * k).sum() + (v * k).sum()  # saves q, k, v and k again
    with offload_activations(tier) as hooks:
        out = fn(qkv)
    assert tier.bytes_on_disk() == bytes_by_location(hooks.held(), "cpu")["disk"] == 4 * 9 * 4
    out.backward()
    assert torch.equal(qkv.grad, torch.autograd.grad(fn(qkv), qkv)[0])


def test_optimizer_offload_is_bit_identical_with_the_16_bit_model_on_the_fast_tier():
    for r in launch(optimizer_offload_against_plain, 2):
        psi = r["psi"]
        assert r["diff"] == 0.0 and r["divergence"] == 0.0
        assert r["before_step"] == {"fast": 4 * psi, "cpu": 0, "disk": 12 * psi}  # 2Ψ w + 2Ψ g; 4Ψ master + 8Ψ
        assert r["after_step"] == {"fast": 2 * psi, "cpu": 0, "disk": 12 * psi}   # gradients freed by zero_grad


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_offload_is_bit_identical_with_12_psi_over_n_on_disk(stage):
    n = 3
    for r in launch(zero_offload, n, stage):
        psi = r["psi"]  # the model's sizes divide by 3: no padding
        assert r["diff"] == 0.0 and r["divergence"] == 0.0
        grads = 2 * psi if stage == 1 else 2 * psi // n  # stage 2 keeps only its 16-bit gradient shards
        assert r["held"] == {"fast": 2 * psi + grads, "cpu": 0, "disk": 12 * psi // n}


def test_tiers_refuse_bad_names_and_the_host_tier_allocates_host_memory():
    with pytest.raises(ValueError, match="offload tier must be one of"):
        make_tier("nvme")
    assert HostTier().allocate(8, torch.device("cpu")).device.type == "cpu"


def test_the_example_script_combines_checkpointing_offload_and_compression(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "minidist.examples.train", "--strategy", "ddp", "--checkpointing", "selective",
           "--offload", "disk", "--offload-dir", str(tmp_path), "--compress", "topk", "--topk-ratio", "0.1",
           "--steps", "4", "--world-size", "2", "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root,
                         env=dict(os.environ, PYTHONPATH=str(root)))
    assert out.returncode == 0 and "replicas differ by 0" in out.stdout.splitlines()[-2], out.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # every offloaded file removed when its tensors were freed
    from minidist.examples.train import parse
    with pytest.raises(SystemExit):
        parse(["--strategy", "tp", "--compress", "fp16"])  # refused by name before any rank starts
