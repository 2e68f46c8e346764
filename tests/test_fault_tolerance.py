"""The example script's fault tolerance (chapter 11): under torchrun a killed rank and a hung rank each become a
restart that resumes from the newest checkpoint, and the run ends bit-identical to one that never failed; an elastic
restart on fewer ranks continues from the resharded checkpoint on the same data; bad flag combinations are refused."""
import os
import re
import subprocess
import sys

import pytest
import torch

from minidist import checkpoint, launch
from minidist.data import token_ids
from minidist.examples.train import main, parse, train
from minidist.models import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch-size", "6", "--block-size", "16", "--quiet"]  # --quiet: no progress bar, no fault messages


def test_torchrun_turns_a_kill_and_a_hang_into_restarts_and_ends_bit_identical(tmp_path):
    args = ["--strategy", "fsdp", "--steps", "6", "--dropout", "0.1", *TINY[:-1]]
    token_ids()  # tokenized once here, inherited by the forked ranks
    uninterrupted = launch(train, 2, parse([*args, "--quiet"]))[0]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=3",
           "-m", "minidist.examples.train", *args, "--checkpoint-dir", str(tmp_path), "--checkpoint-every", "2",
           "--fail-at-step", "3", "--hang-at-step", "5", "--timeout", "5"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT, MINIDIST_FLIGHT_DIR=str(tmp_path / "flight")))
    assert out.returncode == 0, out.stderr[-4000:]
    match = re.search(r"weights sha256 (\w+), resumed at step\(s\) \[([\d, ]+)\]", out.stdout)
    assert match, out.stdout + out.stderr[-3000:]
    assert match.group(1) == uninterrupted["digest"]
    assert {2, 4} <= {int(s) for s in match.group(2).split(",")}  # after the kill at 3, after the hang at 5
    assert "killing myself at step 3" in out.stderr and "hanging at step 5" in out.stderr
    assert re.search(r"Timed out waiting 5000ms|Application timeout", out.stderr)  # the collective timeout
    assert os.path.exists(tmp_path / "failed-at-step-3") and os.path.exists(tmp_path / "hung-at-step-5")


def _weights(path):
    model = GPT(GPTConfig(block_size=16))
    checkpoint.load(path, model)  # a sharded checkpoint, loaded by one process without a process group
    return model.state_dict()


def test_an_elastic_restart_on_fewer_ranks_continues_on_the_same_data(tmp_path):
    base = ["--strategy", "fsdp", "--checkpoint-every", "2", *TINY]
    token_ids()
    first = launch(train, 3, parse([*base, "--steps", "4", "--checkpoint-dir", str(tmp_path / "a")]))[0]
    resumed = launch(train, 2, parse([*base, "--steps", "6", "--checkpoint-dir", str(tmp_path / "a")]))[0]
    never = launch(train, 3, parse([*base, "--steps", "6", "--checkpoint-dir", str(tmp_path / "b")]))[0]
    assert resumed["resumed_at"] == [4] and resumed["losses"][:4] == first["losses"]  # the history travels along
    assert max(abs(a - b) for a, b in zip(resumed["losses"], never["losses"])) < 1e-5  # same data, same order
    a, b = _weights(str(tmp_path / "a" / "step-00000006")), _weights(str(tmp_path / "b" / "step-00000006"))
    tolerance = 0.01 * 3e-3 * 2  # README: 1% of lr x steps for Adam, over the 2 steps summed over 2 ranks, not 3
    assert 0 < max((a[k] - b[k]).abs().max().item() for k in a) <= tolerance


@pytest.mark.parametrize("argv, message", [
    (["--fail-at-step", "3"], "--fail-at-step needs --checkpoint-dir"),
    (["--checkpoint-every", "3"], "--checkpoint-every needs --checkpoint-dir"),
    (["--strategy", "none", "--checkpoint-dir", "x"], "does not support --strategy none"),
])
def test_the_example_refuses_flags_that_cannot_work(argv, message, capsys):
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_a_checkpoint_from_another_seed_is_refused(tmp_path):
    token_ids()
    launch(train, 2, parse(["--strategy", "ddp", "--steps", "2", "--checkpoint-dir", str(tmp_path), *TINY]))
    with pytest.raises(Exception, match="saved by a run with --seed 0, not 1"):
        launch(train, 2, parse(["--strategy", "ddp", "--steps", "4", "--seed", "1", "--checkpoint-dir",
                                str(tmp_path), *TINY]))
    assert torch.load(tmp_path / "step-00000002" / "extra-00001.pt", weights_only=True)["sampler"] == \
        {"seed": 0, "position": 2}
