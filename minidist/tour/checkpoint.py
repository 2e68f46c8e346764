"""Tour checks for chapter 11 (sharded checkpoints, resharding, a failed save): rank functions, and rows.

    resume      train K steps, save, train on (the uninterrupted run); fresh processes load and train on: the same
                weights, bit for bit, for DDP (fp16 with a loss scaler), ZeRO-2, FSDP and tensor parallelism
    resharding  saved on N ranks, loaded on M: the full state (weights and AdamW moments) equal to what was saved,
                and the next steps equal to a run handed the same state in memory (tour/handover.py), bit for bit
    failures    a save in which one rank raises leaves the previous checkpoint whole; DCP reads minidist's files
                and minidist reads DCP's

Every run trains with dropout, so the RNG state must travel in `extra` too. The tests call the same functions.
"""
import os
import time

import torch
import torch.distributed as dist

from .. import checkpoint
from ..checkpoint import file_format as checkpoint_format
from ..checkpoint.layout import optimizer_entries
from ..fsdp import full_state_dict
from ..launch import launch
from ..testing import on_device, replica_divergence
from .checkpoint_runs import (BATCHES, DP_CFG, K, NAMES, RESUMED, build, extra_of, max_diff, restore,  # noqa: F401
                              step)
from .handover import full_state, seed_optimizer
from .rows import covers, make_row
from .zero import frozen_gpt


def saved_after_k_steps(path: str, strategy: str):
    """A fresh run of `strategy` trained K steps and saved in path/strategy (extra: step, RNG, scaler)."""
    run = build(strategy)
    for x, y in BATCHES[:K]:
        step(run, x, y)
    checkpoint.save(os.path.join(path, strategy), run.model, run.opt, extra=extra_of(run, K))
    return run


@on_device
def resume_before(path: str, strategies=RESUMED) -> dict:
    """The uninterrupted runs: K steps, save (extra: step, RNG, scaler), the other steps. {strategy: weights}."""
    out = {}
    for s in strategies:
        run = saved_after_k_steps(path, s)
        for x, y in BATCHES[K:]:
            step(run, x, y)
        out[s] = full_state(run)[0]
    return out


@on_device
def resume_after(path: str, strategies=RESUMED, forget=()) -> dict:
    """Fresh processes: build (from another seed), load, restore extra, train the steps after the checkpoint.
    {strategy: (weights, replica divergence)}. `forget` (the mistake): what of extra to leave out, of "rng", "scaler"
    and "position" (the data then starts again at batch 0, for as many steps)."""
    out = {}
    for s in strategies:
        run = build(s, seed=1)
        extra = checkpoint.load(os.path.join(path, s), run.model, run.opt)
        restore(run, extra, forget)
        start = 0 if "position" in forget else extra["step"]
        for x, y in BATCHES[start:start + len(BATCHES) - extra["step"]]:
            step(run, x, y)
        out[s] = (full_state(run)[0], replica_divergence(run.model) if s == "ddp" else 0.0)
    return out


@on_device
def forgetting(path: str, strategies, forgets) -> dict:
    """{forget: resume_after(path, strategies, forget)} for each tuple in `forgets`, in one launch."""
    return {f: resume_after.__wrapped__(path, strategies, f) for f in forgets}


@on_device
def reshard_save(path: str, strategies=("zero2", "fsdp", "tp", "pp")) -> dict:
    """K steps, save; {strategy: (full weights, full AdamW states)} gathered by each technique's own code."""
    return {s: full_state(saved_after_k_steps(path, s)) for s in strategies}


@on_device
def reshard_load(path: str, pairs, saved: dict) -> dict:
    """For each (saved strategy, strategy to load it into) on this world size: load; the full state against the
    saved one; then the steps after the checkpoint, against a run handed `saved` in memory.
    {(src, dst): (max |state - saved state|, max |weights - handover run's weights|)}."""
    out = {}
    for src, dst in pairs:
        run = build(dst, seed=1)
        extra = checkpoint.load(os.path.join(path, src), run.model, run.opt)
        restore(run, extra)
        state = full_state(run)
        for x, y in BATCHES[K:]:
            step(run, x, y)
        reference = build(dst, seed=1, weights=saved[src][0])
        seed_optimizer(reference, saved[src][1])
        restore(reference, extra)
        for x, y in BATCHES[K:]:
            step(reference, x, y)
        out[(src, dst)] = (max(max_diff(state[0], saved[src][0]), max_diff(state[1], saved[src][1])),
                           max_diff(full_state(run)[0], full_state(reference)[0]))
    return out


@on_device
def into_pipeline(path: str, src: str) -> tuple[dict, torch.Tensor]:
    """Load path/src into a pipeline, a stage per rank, then train one step. Returns ({name: AdamW states} of this
    rank's optimizer, named as the whole model names the parameters; the tied embedding as this rank holds it after
    the step: the first stage's wte, the last stage's lm_head, the same tensor)."""
    run = build("pp", seed=1)
    restore(run, checkpoint.load(os.path.join(path, src), run.model, run.opt))
    states = {e.name: {k: v.clone() for k, v in e.states.get(e.key, {}).items()}
              for e in optimizer_entries(run.model, run.opt)}
    step(run, *BATCHES[K])
    return states, run.whole.wte.weight.detach().clone()


@on_device
def crash_during_save(path: str, strategy: str = "fsdp") -> tuple:
    """Save after one step; after another, save to the same path while the last rank fails right after writing its
    first file. Returns (this rank's error message, whether path.partial is left, max |loaded - first save|)."""
    run = build(strategy)
    step(run, *BATCHES[0])
    checkpoint.save(path, run.model, run.opt)
    first = full_state(run)
    step(run, *BATCHES[1])
    original = checkpoint_format._write_file

    def write_then_fail(filename, chunks):
        original(filename, chunks)
        raise OSError(f"disk full (injected, after writing {os.path.basename(filename)})")
    if dist.get_rank() == dist.get_world_size() - 1:
        checkpoint_format._write_file = write_then_fail
    try:
        checkpoint.save(path, run.model, run.opt)
        message = None
    except RuntimeError as e:
        message = str(e)
    finally:
        checkpoint_format._write_file = original
    fresh = build(strategy, seed=1)
    checkpoint.load(path, fresh.model, fresh.opt)
    loaded = full_state(fresh)
    return message, os.path.exists(path + ".partial"), max(max_diff(loaded[0], first[0]), max_diff(loaded[1], first[1]))


@on_device
def dcp_interop(path: str) -> dict:
    """minidist -> DCP: checkpoints of a replicated (ZeRO-2) and of an FSDP model, read by dcp.load through DCP's
    HuggingFaceStorageReader into a plain model's state_dict. DCP -> minidist: dcp.save of a full state dict (DCP's
    own format), loaded by minidist into an FSDP model. {direction: max |loaded - saved|}."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    out = {}
    for s in ("zero2", "fsdp"):
        run = build(s)
        step(run, *BATCHES[0])
        checkpoint.save(os.path.join(path, s), run.model, run.opt)
        expected = full_state(run)[0]
        torch.manual_seed(1)
        target = frozen_gpt(DP_CFG).state_dict()
        dcp.load(target, storage_reader=HuggingFaceStorageReader(os.path.join(path, s)))
        out[f"minidist {NAMES[s]} checkpoint -> dcp.load"] = max_diff(target, expected)
    dcp.save(expected, checkpoint_id=os.path.join(path, "dcp"))
    run = build("fsdp", seed=1)
    checkpoint.load(os.path.join(path, "dcp"), run.model)
    out["dcp.save -> minidist load (FSDP)"] = max_diff(full_state_dict(run.model), expected)
    return out


@on_device
def what_rank_holds() -> dict:
    """FSDP on this world size: {name: (shape of this rank's state_dict entry, shape of the full tensor)}: what a
    save of `model.state_dict()` from rank 0 would write."""
    run, full = build("fsdp"), frozen_gpt(DP_CFG).state_dict()
    return {k: (tuple(v.shape), tuple(full[k].shape)) for k, v in run.model.state_dict().items()}


@on_device
def read_plans(path: str, strategy: str = "fsdp") -> list[dict]:
    """The reads this rank would do to load path/strategy into a fresh `strategy` run (plan_load, without the
    tensors to fill)."""
    run = build(strategy, seed=1)
    return [{k: v for k, v in r.items() if k != "dst"}
            for r in checkpoint.plan_load(os.path.join(path, strategy), run.model, run.opt)]


def _timed(fn, world_size, *args):
    start = time.perf_counter()
    return launch(fn, world_size, *args), time.perf_counter() - start


def _worst(results, key, index=None) -> float:
    return max(r[key] if index is None else r[key][index] for r in results)


@covers(*[f"resume {NAMES[s]}" for s in RESUMED])
def check_resume(world_size: int) -> list[dict]:
    import tempfile
    with tempfile.TemporaryDirectory() as path:
        before, t1 = _timed(resume_before, world_size, path)
        after, t2 = _timed(resume_after, world_size, path)
    return [make_row(f"resume {NAMES[s]}, {K}+{len(BATCHES) - K} steps", "uninterrupted run",
                     max_abs_diff=max(max_diff(a[s][0], b[s]) for a, b in zip(after, before)), tolerance=0.0,
                     seconds=t1 + t2, replica_divergence=_worst(after, s, 1) if s == "ddp" else None)
            for s in RESUMED]


SHORT = {"zero2": "ZeRO-2", "fsdp": "FSDP", "tp": "TP", "pp": "pipeline"}


def reshard_target(world_size: int) -> int:
    """The other world size the tour loads a checkpoint at (the tests do 4 -> 2 and 3)."""
    return world_size + 1 if world_size < 3 else world_size - 1


@covers("reshard ZeRO-2 FSDP TP pipeline")
def check_resharding(world_size: int) -> list[dict]:
    import tempfile
    rows = []
    with tempfile.TemporaryDirectory() as path:
        saved, seconds = _timed(reshard_save, world_size, path)
        saved = saved[0]  # the same full state on every rank
        loads = [(reshard_target(world_size), [("zero2", "zero2"), ("fsdp", "fsdp")]),
                 (1, [("tp", "dense"), ("pp", "dense")])]
        for m, pairs in loads:
            results, t = _timed(reshard_load, m, path, pairs, saved)
            for src, dst in pairs:
                into = "one process" if m == 1 else f"{m} ranks"
                rows.append(make_row(f"reshard {SHORT[src]} on {world_size} ranks -> {into}, +{len(BATCHES) - K} steps",
                                     "saved state; in-memory handover",
                                     max_abs_diff=max(max(r[(src, dst)]) for r in results), tolerance=0.0,
                                     seconds=seconds + t))
    return rows


@covers("save interrupted", "interop")
def check_failures(world_size: int) -> list[dict]:
    import tempfile
    with tempfile.TemporaryDirectory() as path:
        crash, t1 = _timed(crash_during_save, world_size, os.path.join(path, "ckpt"))
        interop, t2 = _timed(dcp_interop, world_size, path)
    failed = all(m is not None for m, _, _ in crash) and not any(left for _, left, _ in crash)
    rows = [make_row("save interrupted (a rank raised): previous loads", "the checkpoint before",
                     max_abs_diff=max(d for _, _, d in crash) if failed else float("inf"), tolerance=0.0,
                     seconds=t1)]
    rows += [make_row(f"interop: {k}", "the saved weights", max_abs_diff=_worst(interop, k), tolerance=0.0,
                      seconds=t2) for k in interop[0]]
    return rows


CHECKS = [check_resume, check_resharding, check_failures]
