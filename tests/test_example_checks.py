"""The example script refuses, before any rank starts, in one line with exit code 2, what it can tell from its flags
and the world size (minidist/examples/preflight.py); and --model is the model it trains, pipeline included."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from minidist import checkpoint, launch
from minidist.data import token_ids
from minidist.examples import train as example
from minidist.examples.train import main, parse, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFUSED = [
    (["--strategy", "tp", "--world-size", "3"], "4 heads are not divisible by tensor-parallel size 3"),
    (["--strategy", "tp", "--model", "tiny-llama", "--world-size", "4"], "on 4 tensor-parallel ranks"),
    (["--strategy", "tp", "--sequence-parallel", "--block-size", "63"], "--block-size 63 over 2 ranks"),
    (["--strategy", "pp", "--schedule", "interleaved", "--microbatches", "3", "--batch-size", "6"],
     "micro-batches m=3 must be divisible by the number of ranks p=2"),
    (["--strategy", "pp", "--microbatches", "5"], "--batch-size 32 does not cut into --microbatches 5"),
    (["--strategy", "pp", "--n-layer", "1"], "cannot cut 1 blocks into 2 pipeline stages"),
    (["--strategy", "ddp", "--world-size", "3"], "--batch-size 32 is not divisible by the world size 3"),
    (["--steps", "4", "--fail-at-step", "100", "--checkpoint-dir", "ckpt"],
     "--fail-at-step 100 is never reached: the run has --steps 4"),
    (["--steps", "4", "--hang-at-step", "4", "--checkpoint-dir", "ckpt"], "--hang-at-step 4 is never reached"),
    (["--strategy", "ddp", "--microbatches", "8"], "--microbatches does nothing with --strategy ddp"),
    (["--strategy", "ddp", "--micro", "8"], "--microbatches does nothing with --strategy ddp"),  # abbreviated
    (["--strategy", "ddp", "--sequence-parallel"], "--sequence-parallel does nothing with --strategy ddp"),
    (["--strategy", "fsdp", "--bucket-cap-mb", "5"], "--bucket-cap-mb does nothing with --strategy fsdp"),
    (["--strategy", "pp", "--chunks", "3"], "--chunks does nothing without --schedule interleaved"),
    (["--strategy", "3d", "--tp", "2", "--world-size", "2", "--model", "tiny-llama"],
     "--strategy 3d trains tiny-gpt only, not --model tiny-llama"),
    (["--strategy", "3d", "--world-size", "1", "--monitor", "m.jsonl"], "--monitor does nothing with --strategy 3d"),
    (["--model", "tiny-llama", "--dropout", "0.1"], "--dropout does nothing without --model tiny-gpt"),
    (["--offload-dir", "x"], "--offload-dir does nothing without --offload disk"),
    (["--save-timeout", "5"], "--save-timeout does nothing without --checkpoint-dir"),
    (["--quiet", "--log-every", "5"], "--log-every does nothing with --quiet"),
    (["--strategy", "tp", "--compress", "fp16"], "--compress works with --strategy ddp, not tp"),
]


@pytest.fixture
def no_ranks(monkeypatch):
    """Fails the test if the example starts ranks: every refusal must come before."""
    def started(*args, **kwargs):
        raise AssertionError("ranks were started")
    monkeypatch.setattr(example, "launch", started)
    monkeypatch.setattr(example, "run_under_torchrun", started)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize("argv, message", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_a_configuration_that_cannot_run_is_refused_in_one_line_before_any_rank(argv, message, capsys, no_ranks):
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m minidist.examples.train: error: ") and message in err, \
        err


def test_world_size_under_torchrun_is_refused(monkeypatch, capsys, no_ranks):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="--world-size does nothing under torchrun"):
        main(["--world-size", "4"])


@pytest.mark.parametrize("argv", [[], ["--strategy", "pp", "--model", "tiny-llama"], ["--strategy", "tp"],
                                  ["--strategy", "pp", "--schedule", "interleaved", "--chunks", "2"],
                                  ["--strategy", "ddp", "--bucket-cap-mb", "5", "--steps", "4", "--fail-at-step", "3",
                                   "--checkpoint-dir", "x", "--save-timeout", "9"],
                                  ["--strategy", "3d", "--dp", "2", "--world-size", "2"]])
def test_configurations_that_can_run_pass_the_checks(argv):
    """The control: the checks refuse what cannot take effect, not what can (defaults never count as given)."""
    from minidist.examples.preflight import check_world
    from minidist.examples.train import MODELS
    args = parse(argv)
    assert check_world(args, args.world_size, MODELS) is None


def test_the_refusals_from_the_command_line(tmp_path):
    """As a user sees them: exit code 2, one line on stderr, nothing on stdout (no rank started, nothing trained)."""
    cases = [REFUSED[0], REFUSED[3], REFUSED[7]]  # tensor-parallel heads, interleaved micro-batches, a lost fault
    procs = [subprocess.Popen([sys.executable, "-m", "minidist.examples.train", *argv], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={k: v for k, v in dict(os.environ, PYTHONPATH=ROOT).items()
                                   if k not in ("RANK", "WORLD_SIZE")}) for argv, _ in cases]
    outs = [p.communicate(timeout=180) for p in procs]
    for (argv, message), p, (out, err) in zip(cases, procs, outs):
        assert p.returncode == 2 and out == "" and err.count("\n") == 1 and message in err, (argv, err[-2000:])
    assert not os.path.exists(tmp_path / "ckpt")  # the fault's checkpoint directory was never created


def tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, 512, (4, 8), generator=torch.Generator().manual_seed(seed))  # (B, T)


def _pipeline_grads():
    """One pipeline step of a 4-layer tiny Llama on 2 ranks (1F1B, 2 micro-batches): this rank's gradients by the
    whole model's names, and the loss (on the last rank)."""
    from minidist.models import build_llama, lm_loss
    from minidist.pipeline.runtime import PipelineRuntime
    from minidist.pipeline.schedule import build
    from minidist.pipeline.stages import parameter_names, rank_stages
    torch.manual_seed(0)
    model = build_llama(num_hidden_layers=4)
    x, y = tokens(1), tokens(2)
    pipe = PipelineRuntime(rank_stages(model, 2, dist.get_rank()), build("1f1b", 2, 2), model.config.hidden_size,
                           loss_fn=lm_loss)
    loss = pipe.step(x, y)
    names = parameter_names(model)
    return {names[id(q)]: q.grad.clone() for q in pipe.parameters()}, None if loss is None else loss.item()


def test_a_pipelined_llama_equals_one_process():
    """The stages of a Hugging Face Llama (embeddings, decoder layers with their rotary embeddings, norm and head)
    give the whole model's loss and gradients, the tied embedding's two parts added."""
    from minidist.models import build_llama, lm_loss
    (first, _), (last, loss) = launch(_pipeline_grads, 2)
    torch.manual_seed(0)
    model = build_llama(num_hidden_layers=4)
    reference = lm_loss(model(tokens(1)).logits, tokens(2))
    reference.backward()
    grads = {n: q.grad for n, q in model.named_parameters()}
    # Two micro-batches' losses and gradients are summed where one process takes the batch at once: equal up to the
    # order of float additions (the README's tolerance policy), not bit for bit.
    assert abs(loss - reference.item()) < 1e-5
    assert set(first) | set(last) == set(grads) and "model.embed_tokens.weight" in first  # the tied head, both
    assert "model.embed_tokens.weight" in last and "model.norm.weight" in last             # under its first name
    for part in (first, last):
        assert max((g - grads[n]).abs().max().item() for n, g in part.items()) < 1e-6


def test_pipeline_parallel_trains_the_model_it_is_given(tmp_path, capsys):
    """--strategy pp --model tiny-llama trained the tiny GPT (same loss curve as --model tiny-gpt): its checkpoint now
    holds a Llama's tensors, and the two models' losses differ."""
    base = ["--strategy", "pp", "--steps", "4", "--batch-size", "4", "--block-size", "16", "--quiet"]
    token_ids()  # once here, inherited by the forked ranks
    import transformers.models.llama.modeling_llama  # noqa: F401  (likewise)
    llama = launch(train, 2, parse([*base, "--model", "tiny-llama", "--checkpoint-dir", str(tmp_path)]))[-1]
    gpt = launch(train, 2, parse([*base, "--model", "tiny-gpt"]))[-1]
    keys = set(checkpoint.read_metadata(str(tmp_path / "step-00000004"))["tensors"])
    assert "model.layers.1.mlp.gate_proj.weight" in keys and "model.embed_tokens.weight" in keys
    assert not any(k.startswith("blocks.") for k in keys)
    assert llama["losses"] != gpt["losses"] and llama["replica_divergence"] == 0.0  # tied copies agree
    assert llama["last_loss"] < llama["first_loss"]
