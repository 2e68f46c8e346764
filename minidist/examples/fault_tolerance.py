"""Checkpoints and failures for the example script: --checkpoint-dir, --checkpoint-every, --fail-at-step,
--hang-at-step, --timeout.

    torchrun --standalone --nproc_per_node=2 --max-restarts=3 -m minidist.examples.train --strategy fsdp \\
             --steps 40 --checkpoint-dir ckpt --checkpoint-every 10 --fail-at-step 25

Every --checkpoint-every steps the ranks save ckpt/step-SSSSSSSS with minidist.checkpoint (each rank its own shards;
the two newest are kept). At step K of --fail-at-step one rank kills itself with SIGKILL, once: a marker file in the
checkpoint directory remembers it across restarts. torchrun sees a rank die, ends the others and starts them all
again (up to --max-restarts times); they load the newest whole checkpoint and continue from it. The final weights
are bit-identical to those of a run that never failed (the script prints their SHA-256, to compare). With
--hang-at-step K one rank instead sleeps, once: the others wait in their next collective until --timeout seconds
pass, raise, and torchrun restarts everyone: a hang becomes a restart. (--timeout counts from an attempt's second
step on; setting up, ranks wait up to 120 s for each other.)

What resuming needs besides the tensors travels in each rank's `extra`: the step, the RNG states (torch's, Python's,
the accelerator's; dropout draws from them), the sampler's seed and position, the loss history and the steps at
which the run resumed so far.

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

STEP_DIR = re.compile(r"^step-(\d{8})(\.old)?$")
UNSUPPORTED = {"none": "its replicas differ, a checkpoint holds one model",
               "torch-fsdp": "its DTensor parameters are torch.distributed.checkpoint's to save",
               "3d": "its loop (examples/parallel3d.py) does not checkpoint yet"}


def add_arguments(p) -> None:
    p.add_argument("--checkpoint-dir", default=None, help="save here; resume from the newest checkpoint in it")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, help="steps between checkpoints")
    p.add_argument("--fail-at-step", type=nonnegative_int, default=None,
                   help="a rank SIGKILLs itself at this step, once (needs --checkpoint-dir)")
    p.add_argument("--hang-at-step", type=nonnegative_int, default=None,
                   help="a rank sleeps at this step, once, until --timeout ends the others (needs --checkpoint-dir)")
    p.add_argument("--timeout", type=positive_float, default=120.0,
                   help="seconds a collective waits for its peers, from the second step of an attempt on")


def check(args) -> str | None:
    """Why these flags cannot run together (None: they can), said before any rank starts."""
    wanted = [f for f in ("checkpoint_every", "fail_at_step", "hang_at_step") if getattr(args, f) is not None]
    if wanted and args.checkpoint_dir is None:
        return f"--{wanted[0].replace('_', '-')} needs --checkpoint-dir (checkpoints and the fault's marker live there)"
    if args.checkpoint_dir is not None and args.strategy in UNSUPPORTED:
        return f"--checkpoint-dir does not support --strategy {args.strategy}: {UNSUPPORTED[args.strategy]}"
    return None


def join_attempt() -> None:
    """Under torchrun, start the process group of this attempt in a store namespace of its own (call it before
    run_under_torchrun, which then finds the group up).

    torchrun shares its rendezvous TCPStore with the workers and keeps it across restarts, so a restarted worker can
    read the address a peer published in the attempt before: a dead process, "Connection refused", and the restart
    fails too (pytorch issue 135712; seen here in about one restart in three). Prefixing the keys with the restart
    count gives every attempt fresh ones. (One node: the agent's restart count is the same for all its workers.)"""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return
    from minidist.launch import DEFAULT_TIMEOUT, default_backend
    timeout, world = datetime.timedelta(seconds=DEFAULT_TIMEOUT), int(env["WORLD_SIZE"])
    store = dist.PrefixStore(f"minidist-attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                             dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False,
                                           timeout=timeout))
    backend = default_backend(int(env.get("LOCAL_WORLD_SIZE", world)))
    if backend == "nccl":
        torch.accelerator.set_device_index(int(env.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, store=store, rank=int(env["RANK"]), world_size=world, timeout=timeout)


def latest(directory: str) -> tuple[str, int] | None:
    """(path, step) of the newest whole checkpoint in `directory` (a commit cut short counts: see checkpoint.resolve)."""
    steps = sorted({int(m.group(1)) for m in map(STEP_DIR.match, os.listdir(directory)) if m}, reverse=True)
    for step in steps:
        path = os.path.join(directory, f"step-{step:08d}")
        try:
            checkpoint.resolve(path)
            return path, step
        except FileNotFoundError:
            continue
    return None


def resume(args, model, opt) -> dict:
    """Load the newest checkpoint, if any, and restore this rank's RNG: {"step", "losses", "resumed_at"}."""
    state = {"step": 0, "losses": [], "resumed_at": []}
    if args.checkpoint_dir is None:
        return state
    os.makedirs(args.checkpoint_dir, exist_ok=True)
    found = latest(args.checkpoint_dir)
    if found is None:
        return state
    extra = checkpoint.load(found[0], model, opt)
    if extra["sampler"]["seed"] != args.seed:
        raise ValueError(f"{found[0]} was saved by a run with --seed {extra['sampler']['seed']}, not {args.seed}: "
                         f"its data order differs")
    checkpoint.set_rng_state(extra["rng"])
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
             "losses": state["losses"], "resumed_at": state["resumed_at"]}
    checkpoint.save(os.path.join(args.checkpoint_dir, f"step-{done:08d}"), model, opt, extra=extra)
    if dist.get_rank() == 0:
        for name in sorted(n for n in os.listdir(args.checkpoint_dir) if re.fullmatch(r"step-\d{8}", n))[:-2]:
            for suffix in ("", ".old", ".partial"):
                shutil.rmtree(os.path.join(args.checkpoint_dir, name + suffix), ignore_errors=True)


def full_weights(model, strategy: str) -> dict:
    """The whole model's weights on every rank (collective for sharded strategies)."""
    from minidist.checkpoint_layout import unwrap
    if strategy in ("zero3", "fsdp"):
        from minidist.fsdp import full_state_dict
        return full_state_dict(model)
    if strategy == "tp":
        from minidist.tp_plans import full_parameters
        return full_parameters(model)
    return unwrap(model).state_dict()


def digest(weights: dict) -> str:
    """SHA-256 of the weights' bytes, by name: equal digests, bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
