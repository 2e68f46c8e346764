"""Offload: the pack/unpack round trip through a tier, activation offload bit-identical to none with the bytes on
disk equal to the formula, optimizer-state offload bit-identical with 2Ψ + 2Ψ left on the fast tier, errors."""
import copy
import gc

import numpy as np
import pytest
import torch
import torch.nn as nn

from minidist import launch
from minidist.grading import implementation
from minidist.memory.offload import (DiskTier, HostTier, bytes_by_location, make_tier, offload_activations,
                                     offload_optimizer, states, storage_bytes)
from minidist.models import GPT, lm_loss
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
        filename = stored.untyped_storage().filename
        assert filename in tier.files(), name  # a file of the disk tier
        assert np.array_equal(np.fromfile(filename, dtype=np.uint8), storage_bytes(t).numpy()), name  # in the file
        assert (dtype, tuple(size), tuple(stride), offset) == (t.dtype, t.shape, t.stride(), t.storage_offset())
    assert tier.bytes_on_disk() > 0


@pytest.mark.exercise("unpack_saved")
def test_unpack_saved_rebuilds_the_tensor_in_fast_memory(tmp_path):
    from minidist.memory.offload import pack_saved
    unpack = implementation("unpack_saved")
    tier = DiskTier(str(tmp_path))
    for name, t in views().items():
        packed = pack_saved(t, tier)
        back = unpack(packed, t.device)
        assert torch.equal(back, t) and back.stride() == t.stride() and back.dtype == t.dtype, name
        assert back.untyped_storage().filename is None, name  # a copy in memory, not the mapped file
        assert t.numel() == 0 or back.untyped_storage().data_ptr() != packed[0].untyped_storage().data_ptr()


def gradients(model, hooks=None, held=None):
    """One backward's gradients (dropout seeded); `held` gets what the hooks hold between forward and backward."""
    model.zero_grad()
    torch.manual_seed(7)
    x = torch.randint(512, (6, 16), generator=torch.Generator().manual_seed(1))
    with hooks or torch.enable_grad():
        loss = lm_loss(model(x), x)
    if hooks is not None and held is not None:
        held.update(bytes_by_location(hooks.held(), "cpu"))
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("tier", ["disk", "cpu"])
def test_activation_offload_is_bit_identical_and_frees_its_files(tier, tmp_path):
    torch.manual_seed(0)
    plain = GPT(CFG)  # with dropout: the masks travel through the tier too
    model = copy.deepcopy(plain)
    t = make_tier(tier, str(tmp_path))
    hooks = offload_activations(t, keep=model)
    held = {}
    assert all(torch.equal(a, b) for a, b in zip(gradients(model, hooks, held), gradients(plain)))
    assert sum(held.values()) > 0 and (tier == "cpu" or held["fast"] == 0)  # offloaded: on disk, or host copies
    if tier == "disk":
        assert held["disk"] > 0 and t.bytes_on_disk() == 0  # every file deleted once backward has used it


def test_one_layer_on_disk_is_the_formula_and_freed_with_its_graph():
    layer = offloaded_layer_bytes()
    assert layer["files"] == layer["formula"] and layer["held"] == {"fast": 0, "cpu": 0, "disk": layer["formula"]}
    assert layer["files_after_free"] == 0


def test_two_tiers_sharing_a_directory_share_no_file(tmp_path):
    a, b = DiskTier(str(tmp_path)), DiskTier(str(tmp_path))
    ta, tb = a.allocate(16, torch.device("cpu")).fill_(1), b.allocate(16, torch.device("cpu")).fill_(2)
    assert ta.tolist() == [1] * 16 and set(a.files()).isdisjoint(b.files()) and len(a.files()) == 1
    del tb
    gc.collect()
    assert b.files() == [] and len(a.files()) == 1 and ta.tolist() == [1] * 16  # b's file went, a's stayed


def test_a_write_after_a_save_cannot_reach_what_backward_gets(tmp_path):
    w = torch.randn(3, 3, requires_grad=True)

    def rnn(in_place):  # h[t] = tanh(h[t-1] w): in place into one buffer (autograd refuses it), or a fresh list
        h = [torch.ones(3)] if not in_place else torch.zeros(4, 3)
        if in_place:
            h[0] = 1.0
        for t in range(1, 4):
            step = torch.tanh(h[t - 1] @ w)
            if in_place:
                h[t] = step
            else:
                h.append(step)
        return h.sum() if in_place else torch.stack(h).sum()
    expected = torch.autograd.grad(rnn(False), w)[0]
    with offload_activations(DiskTier(str(tmp_path))):
        loss = rnn(True)  # each h[t - 1] is saved, then h is written: a copy taken at the save keeps its values
    assert torch.equal(torch.autograd.grad(loss, w)[0], expected)


def test_states_replaced_by_load_state_dict_move_to_the_tier_and_free_the_old_files(tmp_path):
    class Wrapper:  # the seam OptimizerOffload uses: the torch optimizer, and what else holds the masters
        def __init__(self, params):
            self.optimizer, self.master = torch.optim.Adam(params, lr=1e-3), []
    lin, tier = nn.Linear(8, 8), DiskTier(str(tmp_path))
    opt = Wrapper(lin.parameters())
    offload_optimizer(opt, tier)
    lin(torch.randn(2, 8)).sum().backward()
    opt.optimizer.step()
    files = len(tier.files())  # 2 parameters and their 2 x 2 moments
    opt.optimizer.load_state_dict(copy.deepcopy(opt.optimizer.state_dict()))  # new state tensors, in memory
    gc.collect()
    assert files == 6 and len(tier.files()) == 6  # the new ones moved, the replaced ones' files deleted
    assert all(t.untyped_storage().filename is not None for t in states(opt.optimizer))


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
    assert out.returncode == 0 and "replicas differ by 0\n" in out.stdout, out.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # every offloaded file removed when its tensors were freed
    from minidist.examples.train import parse
    with pytest.raises(SystemExit):
        parse(["--strategy", "tp", "--compress", "fp16"])  # refused by name before any rank starts
