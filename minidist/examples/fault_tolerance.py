"""Checkpoints and failures for the example script: --checkpoint-dir, --checkpoint-every, --fail-at-step,
--hang-at-step, --timeout, --save-timeout.

    torchrun --standalone --nproc_per_node=2 --max-restarts=3 -m minidist.examples.train --strategy fsdp \\
             --steps 40 --checkpoint-dir ckpt --checkpoint-every 10 --fail-at-step 25

Every --checkpoint-every steps the ranks save ckpt/step-SSSSSSSS with minidist.checkpoint (each rank its own shards;
the two newest are kept). At step K of --fail-at-step one rank kills itself with SIGKILL, once: a marker file in the
checkpoint directory remembers it across restarts. torchrun sees a rank die, ends the others and starts them all
again (up to --max-restarts times); they load the newest whole checkpoint and continue from it. The final weights
are bit-identical to those of a run that never failed (the script prints their SHA-256, to compare). With
--hang-at-step K one rank instead sleeps, once: the others wait in their next collective until --timeout seconds
pass, raise, and torchrun restarts everyone: a hang becomes a restart. (--timeout counts from an attempt's second
step on; setting up, ranks wait up to 120 s for each other; a save's collectives wait --save-timeout, as writing
to disk may take longer than a step.) A checkpoint that cannot be loaded is passed over for the one before it.
Several nodes (torchrun --nnodes=N, c10d rendezvous) restart alike: each attempt's process group meets under keys
numbered from torchrun's shared store, the same on every node (minidist/elastic.py; torchrun's restart count is
not: each agent counts its own). A rank's failure is one line on stderr (a peer that died: the surviving ranks say
so), its traceback in the flight directory (launch.run_under_torchrun).

What resuming needs besides the tensors travels in each rank's `extra`: the step, the RNG states (torch's, Python's,
the accelerator's; dropout draws from them), the sampler's seed and position, the loss scaler's state (--offload),
the flags that fix the data and the update (a resumed run with another --batch-size, --block-size or --lr is
refused), the loss history and the steps at which the run resumed so far.

Data order. Step k trains on global batch k of random_batches(--seed): the same batches, in the same order, whatever
the number of ranks; data-parallel strategies give rank r slice r of N, tensor and pipeline parallelism the whole
batch. An elastic restart with fewer ranks (torchrun --nproc_per_node=M, or --world-size M) loads the checkpoint
resharded to M ranks and continues at global batch k, cut in M slices: the same data in the same order. The gradient
sums then run over another number of ranks, so the weights match the N-rank run within the reduction-order
tolerance, not bit for bit; the RNG states are those of the ranks of the same number (rank 0's on a new rank).
"""
import datetime
import hashlib
import os
import re
import shutil
import signal
import sys
import time

import torch
import torch.distributed as dist

from minidist import checkpoint
from minidist.args import nonnegative_int, positive_float, positive_int
from minidist.launch import device

STEP_DIR = re.compile(r"^step-(\d{8})(\.old)?$")
FLAGS = ("seed", "batch_size", "block_size", "lr")  # a resumed run must have the saving run's
UNSUPPORTED = {"none": "its replicas differ, a checkpoint holds one model",
               "torch-fsdp": "its DTensor parameters are torch.distributed.checkpoint's to save",
               "3d": "its loop (examples/parallel3d.py) does not checkpoint yet",
               "ep": "its loop (examples/moe.py) does not checkpoint yet"}


def add_arguments(p) -> None:
    p.add_argument("--checkpoint-dir", default=None, help="save here; resume from the newest checkpoint in it")
    p.add_argument("--checkpoint-every", type=positive_int, default=None,
                   help="steps between checkpoints (one is also saved after the last step)")
    p.add_argument("--fail-at-step", type=nonnegative_int, default=None,
                   help="the last rank SIGKILLs itself at the start of this step, counted from 0 (after that many "
                        "steps), once (needs --checkpoint-dir)")
    p.add_argument("--hang-at-step", type=nonnegative_int, default=None,
                   help="the last rank sleeps at the start of this step (from 0), once, until --timeout ends the "
                        "others (needs --checkpoint-dir)")
    p.add_argument("--timeout", type=positive_float, default=120.0,
                   help="seconds a collective waits for its peers, from the second step of an attempt on "
                        "(default: %(default)s; setting up waits 120 s)")
    p.add_argument("--save-timeout", type=positive_float, default=600.0,
                   help="seconds a checkpoint's collectives wait for a slow writer (default: %(default)s)")


def check(args) -> str | None:
    """Why these flags cannot run together (None: they can), said before any rank starts."""
    wanted = [f for f in ("checkpoint_every", "fail_at_step", "hang_at_step") if getattr(args, f) is not None]
    if wanted and args.checkpoint_dir is None:
        return f"--{wanted[0].replace('_', '-')} needs --checkpoint-dir (checkpoints and the fault's marker live there)"
    if args.checkpoint_dir is not None and args.strategy in UNSUPPORTED:
        return f"--checkpoint-dir does not support --strategy {args.strategy}: {UNSUPPORTED[args.strategy]}"
    if args.checkpoint_dir is not None and getattr(args, "compress", None) in ("topk", "powersgd"):
        return (f"--checkpoint-dir does not support --compress {args.compress}: its error feedback (and PowerSGD's "
                f"step counter) is not in the checkpoint, so a resumed run would differ")
    return None


def whole(directory: str) -> list[tuple[str, int]]:
    """(path, step) of every whole checkpoint in `directory`, newest first (a commit cut short counts: see
    checkpoint.resolve)."""
    steps = sorted({int(m.group(1)) for m in map(STEP_DIR.match, os.listdir(directory)) if m}, reverse=True)
    out = []
    for step in steps:
        path = os.path.join(directory, f"step-{step:08d}")
        try:
            checkpoint.resolve(path)
            out.append((path, step))
        except FileNotFoundError:
            continue
    return out


def latest(directory: str) -> tuple[str, int] | None:
    """(path, step) of the newest whole checkpoint in `directory`, or None."""
    return next(iter(whole(directory)), None)


def _load_agreed(args, model, opt) -> tuple[str, dict] | None:
    """Load the newest checkpoint that every rank can load (an unloadable one would restart the run forever);
    (its path, this rank's extra), or None if there is none. Collective."""
    errors = []
    for path, _ in whole(args.checkpoint_dir):
        try:
            extra, error = checkpoint.load(path, model, opt), None
        except Exception as e:  # noqa: BLE001  (every rank must reach the all_reduce)
            extra, error = None, e
        failed = torch.tensor([float(error is not None)], device=device())
        dist.all_reduce(failed)
        if not failed.item():
            return path, extra
        errors.append(f"{path}: {error or 'another rank could not load it'}")
        if dist.get_rank() == 0:
            _say(args, f"cannot resume from {path} ({errors[-1].split(': ', 1)[1]}): trying the one before")
    if errors:
        raise RuntimeError("no checkpoint could be loaded: " + "; ".join(errors))
    return None


def resume(args, model, opt) -> dict:
    """Load the newest checkpoint, if any, and restore this rank's RNG: {"step", "losses", "resumed_at"}."""
    state = {"step": 0, "losses": [], "resumed_at": []}
    if args.checkpoint_dir is None:
        return state
    os.makedirs(args.checkpoint_dir, exist_ok=True)
    found = _load_agreed(args, model, opt)
    if found is None:
        return state
    extra = found[1]
    for flag in FLAGS:
        saved = extra["flags"][flag] if flag in extra.get("flags", {}) else extra["sampler"].get(flag)
        if saved is not None and saved != getattr(args, flag):
            raise ValueError(f"{found[0]} was saved by a run with --{flag.replace('_', '-')} {saved}, not "
                             f"{getattr(args, flag)}: its data or its update differs")
    checkpoint.set_rng_state(extra["rng"])
    if "scaler" in extra:
        opt.scaler.load_state_dict(extra["scaler"])
    state = {"step": extra["step"], "losses": extra["losses"], "resumed_at": extra["resumed_at"] + [extra["step"]]}
    if dist.get_rank() == 0:
        saved_by = checkpoint.read_metadata(found[0])["world_size"]
        _say(args, f"resumed at step {extra['step']} from {found[0]} (saved by {saved_by} ranks, loaded on "
             f"{dist.get_world_size()})")
    return state


def _say(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _once(args, what: str, step: int) -> bool:
    """True the first time the last rank reaches `step` for this fault (a marker file remembers it)."""
    if dist.get_rank() != dist.get_world_size() - 1:
        return False
    marker = os.path.join(args.checkpoint_dir, f"{what}-at-step-{step}")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def inject(args, step: int) -> None:
    """The faults, at the start of `step`: the last rank dies (SIGKILL) or hangs, once."""
    if step == args.fail_at_step and _once(args, "failed", step):
        _say(args, f"rank {dist.get_rank()}: killing myself at step {step} (--fail-at-step)")
        os.kill(os.getpid(), signal.SIGKILL)
    if step == args.hang_at_step and _once(args, "hung", step):
        _say(args, f"rank {dist.get_rank()}: hanging at step {step} (--hang-at-step)")
        while True:
            time.sleep(60)


def after_step(args, state: dict, done: int, model, opt, loss: float) -> None:
    """Record the loss; every --checkpoint-every steps (and after the last one) save, keeping the two newest. After
    this attempt's first step, collectives may wait --timeout seconds (setting up keeps the launcher's 120 s: ranks
    that start, build and load a few seconds apart are not hung; torchtitan's init and train timeouts do the same)."""
    state["losses"].append(loss)
    if not state.setdefault("timeout_set", False):
        from torch.distributed.distributed_c10d import _set_pg_timeout
        _set_pg_timeout(datetime.timedelta(seconds=args.timeout))
        state["timeout_set"] = True
    if args.checkpoint_dir is None or not (done == args.steps or args.checkpoint_every and
                                           done % args.checkpoint_every == 0):
        return
    extra = {"step": done, "rng": checkpoint.rng_state(), "sampler": {"seed": args.seed, "position": done},
             "flags": {f: getattr(args, f) for f in FLAGS}, "losses": state["losses"],
             "resumed_at": state["resumed_at"]}
    if getattr(opt, "scaler", None) is not None:
        extra["scaler"] = opt.scaler.state_dict()
    from torch.distributed.distributed_c10d import _set_pg_timeout
    _set_pg_timeout(datetime.timedelta(seconds=args.save_timeout))  # a slow writer is not a hung rank
    try:
        checkpoint.save(os.path.join(args.checkpoint_dir, f"step-{done:08d}"), model, opt, extra=extra)
    finally:
        _set_pg_timeout(datetime.timedelta(seconds=args.timeout))
    if dist.get_rank() == 0:
        prune(args.checkpoint_dir)


def prune(directory: str, keep: int = 2) -> None:
    """Delete all but the `keep` newest whole checkpoints, with what commits and saves cut short left (step-X.old,
    step-X.partial; a step-X.old is kept when it is step X's only copy). Each goes out of the checkpoints' names
    first (one rename), then is deleted: a crash while deleting leaves no half-deleted step-X to resume from."""
    kept = {step for _, step in whole(directory)[:keep]}
    for name in sorted(os.listdir(directory)):
        m = re.fullmatch(r"step-(\d{8})(\.old|\.partial)?", name)
        step_dir = m and os.path.join(directory, f"step-{m.group(1)}")
        stale = m and (int(m.group(1)) not in kept or m.group(2) == ".partial" or
                       m.group(2) == ".old" and os.path.isfile(os.path.join(step_dir, "metadata.json")))
        if stale:
            os.replace(os.path.join(directory, name), os.path.join(directory, f".deleting-{name}"))
            name = f".deleting-{name}"
        if name.startswith(".deleting-"):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def full_weights(model, strategy: str) -> dict:
    """The whole model's weights on every rank (collective for sharded strategies)."""
    from minidist.checkpoint.layout import unwrap
    if strategy in ("zero3", "fsdp"):
        from minidist.fsdp import full_state_dict
        return full_state_dict(model)
    if strategy == "tp":
        from minidist.tensor_parallel.plans import full_parameters
        return full_parameters(model)
    return unwrap(model).state_dict()


def digest(weights: dict) -> str:
    """SHA-256 of the weights' bytes, by name: equal digests, bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
