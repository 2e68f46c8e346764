"""Checkpoints from strangers (minidist/checkpoint/files.py): a chunk file named outside the checkpoint directory is
refused by name, in minidist's format and in DCP's; a truncated or foreign file raises an error naming the file and
what is wrong with it. Everything here runs in one process, without a process group."""
import json
import os
import pickle
import re

import pytest
import torch

from minidist import checkpoint
from minidist.checkpoint.files import CorruptCheckpoint
from minidist.models import GPT, GPTConfig

CFG = GPTConfig(block_size=8, n_layer=1, n_embd=16, n_head=2, vocab_size=32)


def saved(path, extra=None):
    """A one-process checkpoint of a small GPT with its AdamW states; returns (model, optimizer) as saved."""
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    checkpoint.save(str(path), model, opt, extra=extra)
    return model, opt


def fresh():
    torch.manual_seed(1)
    model = GPT(CFG)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def rewrite_metadata(path, change):
    with open(path / "metadata.json") as f:
        meta = json.load(f)
    change(meta)
    with open(path / "metadata.json", "w") as f:
        json.dump(meta, f)


def first_chunk(meta):
    return meta["tensors"]["wte.weight"]["chunks"][0]


def test_a_saved_checkpoint_loads_whole(tmp_path):
    """The control for the refusals below: untouched, the same checkpoint loads and equals what was saved."""
    model, _ = saved(tmp_path / "ckpt")
    target, opt = fresh()
    checkpoint.load(str(tmp_path / "ckpt"), target, opt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), target.state_dict().values()))


@pytest.mark.parametrize("name", ["../elsewhere/rank00000.safetensors", "ABSOLUTE", "sub/rank00000.safetensors",
                                  "..", ""])
def test_a_chunk_file_outside_the_directory_is_refused_by_name(tmp_path, name):
    saved(tmp_path / "ckpt")
    os.makedirs(tmp_path / "elsewhere")
    saved(tmp_path / "elsewhere" / "other")  # a readable safetensors file that a traversal would read
    os.replace(tmp_path / "elsewhere" / "other" / "rank00000.safetensors",
               tmp_path / "elsewhere" / "rank00000.safetensors")
    name = str(tmp_path / "elsewhere" / "rank00000.safetensors") if name == "ABSOLUTE" else name
    rewrite_metadata(tmp_path / "ckpt", lambda meta: first_chunk(meta).update(file=name))
    with pytest.raises(CorruptCheckpoint, match=re.escape(f"names the chunk file {name!r}: refused")) as e:
        checkpoint.load(str(tmp_path / "ckpt"), *fresh())
    assert "metadata.json" in str(e.value)
    with pytest.raises(CorruptCheckpoint, match="refused"):
        checkpoint.read_metadata(str(tmp_path / "ckpt"))  # refused as soon as the metadata is read


def test_a_chunk_file_that_links_out_of_the_directory_is_refused(tmp_path):
    saved(tmp_path / "ckpt")
    saved(tmp_path / "other")
    os.remove(tmp_path / "ckpt" / "rank00000.safetensors")
    os.symlink(tmp_path / "other" / "rank00000.safetensors", tmp_path / "ckpt" / "rank00000.safetensors")
    with pytest.raises(CorruptCheckpoint, match=r"'rank00000.safetensors', a link to .*other.*outside"):
        checkpoint.load(str(tmp_path / "ckpt"), *fresh())


def dcp_checkpoint(path):
    import torch.distributed.checkpoint as dcp
    torch.manual_seed(0)
    state = GPT(CFG).state_dict()
    with pytest.warns(UserWarning, match="single process"):
        dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return state


def test_dcp_relative_paths_outside_the_directory_are_refused(tmp_path):
    state = dcp_checkpoint(tmp_path / "dcp")
    target, _ = fresh()
    checkpoint.load(str(tmp_path / "dcp"), target)  # the control: DCP's own names load
    assert all(torch.equal(state[k], v) for k, v in target.state_dict().items())
    with open(tmp_path / "dcp" / ".metadata", "rb") as f:
        md = pickle.load(f)  # written by this test: trusted
    for info in md.storage_data.values():
        info.relative_path = "../stolen.distcp"
    with open(tmp_path / "dcp" / ".metadata", "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(CorruptCheckpoint, match=r"\.metadata names the chunk file '\.\./stolen\.distcp': refused"):
        checkpoint.load(str(tmp_path / "dcp"), *fresh())


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize("cut, what", [(5, "header too small"), (100, "invalid header length"),
                                       (-10, "incomplete metadata")])  # in its length, its JSON header, its data
def test_a_truncated_safetensors_file_is_named(tmp_path, cut, what):
    saved(tmp_path / "ckpt")
    size = os.path.getsize(tmp_path / "ckpt" / "rank00000.safetensors")
    truncate(tmp_path / "ckpt" / "rank00000.safetensors", cut if cut > 0 else size + cut)
    with pytest.raises(CorruptCheckpoint) as e:
        checkpoint.load(str(tmp_path / "ckpt"), *fresh())
    message = str(e.value)
    assert str(tmp_path / "ckpt" / "rank00000.safetensors") in message and what in message, message
    assert "truncated or damaged" in message


def test_a_missing_chunk_file_is_named(tmp_path):
    saved(tmp_path / "ckpt")
    os.remove(tmp_path / "ckpt" / "rank00000.safetensors")
    with pytest.raises(CorruptCheckpoint, match=r"rank00000\.safetensors: missing \(listed in .*metadata\.json\)"):
        checkpoint.load(str(tmp_path / "ckpt"), *fresh())


def test_a_truncated_or_foreign_metadata_json_is_named(tmp_path):
    saved(tmp_path / "ckpt")
    where = str(tmp_path / "ckpt" / "metadata.json")
    text = open(where).read()
    with open(where, "w") as f:
        f.write(text[:len(text) // 2])
    with pytest.raises(CorruptCheckpoint, match=re.escape(where) + r": not valid JSON: .* \(the file ends there"):
        checkpoint.load(str(tmp_path / "ckpt"), *fresh())
    for foreign, problem in [([1, 2], "no 'tensors' object"), ({"tensors": {"w": {"shape": [2]}}}, "tensor 'w' lacks"),
                             ({"tensors": {"w": {"shape": [2], "dtype": "float32", "chunks": [{"file": "x"}]}}},
                              "a chunk of tensor 'w' lacks")]:
        with open(where, "w") as f:
            json.dump(foreign, f)
        with pytest.raises(CorruptCheckpoint, match=re.escape(where) + ": " + re.escape(problem)):
            checkpoint.load(str(tmp_path / "ckpt"), *fresh())
    with open(where, "wb") as f:
        f.write(b"\xff\xfe binary")
    with pytest.raises(CorruptCheckpoint, match=re.escape(where) + ": not UTF-8"):
        checkpoint.read_metadata(str(tmp_path / "ckpt"))


def test_truncated_pickled_files_are_named(tmp_path):
    saved(tmp_path / "ckpt", extra={"step": 3})
    for name in ("extra-00000.pt", "optimizer.pt"):
        original = open(tmp_path / "ckpt" / name, "rb").read()
        truncate(tmp_path / "ckpt" / name, 20)
        with pytest.raises(CorruptCheckpoint, match=re.escape(str(tmp_path / "ckpt" / name)) + ": cannot read"):
            checkpoint.load(str(tmp_path / "ckpt"), *fresh())
        open(tmp_path / "ckpt" / name, "wb").write(original)
    assert checkpoint.load(str(tmp_path / "ckpt"), *fresh()) == {"step": 3}  # restored: it loads again
    dcp_checkpoint(tmp_path / "dcp")
    truncate(tmp_path / "dcp" / ".metadata", 30)
    with pytest.raises(CorruptCheckpoint, match=re.escape(str(tmp_path / "dcp")) + r"/\.metadata: cannot read"):
        checkpoint.load(str(tmp_path / "dcp"), fresh()[0])
