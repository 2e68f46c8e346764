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
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import checkpoint, checkpoint_format
from ..data import random_batches
from ..data_parallel import DataParallel
from ..fsdp import full_state_dict
from ..launch import launch
from ..mixed_precision import LossScaler, MixedPrecisionOptimizer
from ..models import GPT, GPTConfig, lm_loss
from ..testing import on_device, replica_divergence, to_device
from ..zero import ZeroOptimizer
from .fsdp import per_block
from .handover import full_state, load_full_weights, seed_optimizer
from .rows import covers, make_row
from .zero import frozen_gpt

DP_CFG = GPTConfig(n_layer=2, n_embd=32, block_size=12, dropout=0.1)  # 3 divides none of its sizes: padding
TP_CFG = GPTConfig(vocab_size=509, n_layer=4, n_embd=48, n_head=12, block_size=12, dropout=0.1)  # heads split by
# 2, 3 and 4; a vocabulary of 509 is padded at every N; 4 blocks: up to 4 pipeline stages
BATCHES = random_batches(torch.randint(509, (4000,), generator=torch.Generator().manual_seed(11)), 12, 12, steps=5)
K, LR = 3, 1e-3  # steps before the checkpoint (the others come after it), AdamW's learning rate
NAMES = {"ddp": "DDP (fp16, loss scaler)", "zero2": "ZeRO-2", "fsdp": "FSDP", "tp": "TP", "pp": "pipeline (GPipe)",
         "dense": "one dense process"}
RESUMED = ("ddp", "zero2", "fsdp", "tp")


@dataclass
class Run:
    strategy: str
    model: torch.nn.Module        # what checkpoint.save and load are given
    opt: object
    scaler: LossScaler | None = None
    whole: torch.nn.Module | None = None  # pipeline: the whole model every rank built
    pipe: object = None


def build(strategy: str, seed: int = 0, weights: dict | None = None) -> Run:
    """A fresh run of `strategy` on the default group (weights: a full state dict to start from instead)."""
    torch.manual_seed(seed)
    if strategy == "ddp":
        model = GPT(DP_CFG).half()
        dp = DataParallel(model)
        scaler = LossScaler(init_scale=2.0 ** 8, growth_interval=2)  # the scale changes every 2 steps: it must resume
        return Run(strategy, dp, MixedPrecisionOptimizer(model, torch.optim.AdamW, scaler, lr=LR), scaler)
    if strategy in ("zero2", "fsdp"):
        model = frozen_gpt(DP_CFG)
        if weights is not None:
            load_full_weights(model, weights)
        if strategy == "zero2":  # small buckets: parameters cut across buckets and ranks
            return Run(strategy, model, ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage=2, lr=LR,
                                                      bucket_cap_mb=0.01))
        return Run(strategy, per_block(model), torch.optim.AdamW(model.parameters(), lr=LR))
    model = GPT(TP_CFG)
    if weights is not None:
        load_full_weights(model, weights)
    if strategy == "pp":
        from ..pipeline.runtime import PipelineRuntime
        from ..pipeline.schedule import build as schedule
        from ..pipeline.stages import rank_stages
        p = dist.get_world_size()
        stages = rank_stages(model, p, dist.get_rank())
        pipe = PipelineRuntime(stages, schedule("gpipe", p, 2), TP_CFG.n_embd, track_memory=False)
        return Run(strategy, stages[0], torch.optim.AdamW(pipe.parameters(), lr=LR), whole=model, pipe=pipe)
    if strategy == "tp":
        from ..tp_plans import GPT_PLAN, parallelize
        parallelize(model, None, GPT_PLAN)
    return Run(strategy, model, torch.optim.AdamW(model.parameters(), lr=LR))


def step(run: Run, x, y) -> None:
    """One AdamW step on this global batch: data parallel strategies take their rank's slice of it."""
    if run.strategy in ("ddp", "zero2", "fsdp"):
        n, rank = dist.get_world_size(), dist.get_rank()
        x, y = x.chunk(n)[rank], y.chunk(n)[rank]
    x, y = to_device((x, y))
    if run.pipe is not None:
        run.pipe.step(x, y)
    else:
        if run.strategy == "tp":
            from ..tensor_parallel import vocab_parallel_cross_entropy
            loss = vocab_parallel_cross_entropy(run.model(x), y)
        else:
            loss = lm_loss(run.model(x).float(), y)
        (run.scaler.scale_loss(loss) if run.scaler else loss).backward()
    run.opt.step()
    run.opt.zero_grad()


def extra_of(run: Run, steps_done: int) -> dict:
    """What resuming needs besides tensors: the step, this rank's RNG states, the loss scaler."""
    return {"step": steps_done, "rng": checkpoint.rng_state(),
            "scaler": run.scaler.state_dict() if run.scaler else None}


def restore(run: Run, extra: dict) -> None:
    checkpoint.set_rng_state(extra["rng"])
    if run.scaler is not None:
        run.scaler.load_state_dict(extra["scaler"])


def max_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over the tensors (or dicts of tensors) of two states with the same keys; inf if keys differ."""
    if a.keys() != b.keys():
        return float("inf")
    return max([max_diff(a[k], b[k]) if isinstance(a[k], dict) else (a[k].float() - b[k].float()).abs().max().item()
                for k in a] or [0.0])


@on_device
def resume_before(path: str, strategies=RESUMED) -> dict:
    """The uninterrupted runs: K steps, save (extra: step, RNG, scaler), the other steps. {strategy: weights}."""
    out = {}
    for s in strategies:
        run = build(s)
        for x, y in BATCHES[:K]:
            step(run, x, y)
        checkpoint.save(os.path.join(path, s), run.model, run.opt, extra=extra_of(run, K))
        for x, y in BATCHES[K:]:
            step(run, x, y)
        out[s] = full_state(run)[0]
    return out


@on_device
def resume_after(path: str, strategies=RESUMED, restore_extra: bool = True) -> dict:
    """Fresh processes: build (from another seed), load, restore extra, train the steps after the checkpoint.
    {strategy: (weights, replica divergence)}. restore_extra=False: forget the RNG and scaler (the mistake)."""
    out = {}
    for s in strategies:
        run = build(s, seed=1)
        extra = checkpoint.load(os.path.join(path, s), run.model, run.opt)
        if restore_extra:
            restore(run, extra)
        for x, y in BATCHES[extra["step"]:]:
            step(run, x, y)
        out[s] = (full_state(run)[0], replica_divergence(run.model) if s == "ddp" else 0.0)
    return out


@on_device
def reshard_save(path: str, strategies=("zero2", "fsdp", "tp", "pp")) -> dict:
    """K steps, save; {strategy: (full weights, full AdamW states)} gathered by each technique's own code."""
    out = {}
    for s in strategies:
        run = build(s)
        for x, y in BATCHES[:K]:
            step(run, x, y)
        checkpoint.save(os.path.join(path, s), run.model, run.opt, extra=extra_of(run, K))
        out[s] = full_state(run)
    return out


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
        out[f"{s} -> DCP"] = max_diff(target, expected)
    dcp.save(expected, checkpoint_id=os.path.join(path, "dcp"))
    run = build("fsdp", seed=1)
    checkpoint.load(os.path.join(path, "dcp"), run.model)
    out["DCP -> FSDP"] = max_diff(full_state_dict(run.model), expected)
    return out


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
    return [make_row(f"resume {NAMES[s]} after {K} of {len(BATCHES)} steps", "uninterrupted run",
                     max_abs_diff=max(max_diff(a[s][0], b[s]) for a, b in zip(after, before)), tolerance=0.0,
                     seconds=t1 + t2, replica_divergence=_worst(after, s, 1) if s == "ddp" else None)
            for s in RESUMED]


def reshard_targets(world_size: int) -> list[int]:
    return [m for m in (2, 3, 4) if m != world_size][:2]


@covers("resharding", "ZeRO-2", "FSDP", "TP", "pipeline")
def check_resharding(world_size: int) -> list[dict]:
    import tempfile
    rows = []
    with tempfile.TemporaryDirectory() as path:
        saved, seconds = _timed(reshard_save, world_size, path)
        saved = saved[0]  # the same full state on every rank
        loads = [(m, [("zero2", "zero2"), ("fsdp", "fsdp")]) for m in reshard_targets(world_size)]
        for m, pairs in loads + [(1, [("tp", "dense"), ("pp", "dense")])]:
            results, t = _timed(reshard_load, m, path, pairs, saved)
            for src, dst in pairs:
                rows.append(make_row(f"resharding {NAMES[src]} saved on {world_size} ranks, loaded into "
                                     f"{NAMES[dst] if m == 1 else f'{m} ranks'}: state, then {len(BATCHES) - K} steps",
                                     "saved state; in-memory handover",
                                     max_abs_diff=max(max(r[(src, dst)]) for r in results), tolerance=0.0,
                                     seconds=seconds + t))
    return rows


@covers("save interrupted", "DCP")
def check_failures(world_size: int) -> list[dict]:
    import tempfile
    with tempfile.TemporaryDirectory() as path:
        crash, t1 = _timed(crash_during_save, world_size, os.path.join(path, "ckpt"))
        interop, t2 = _timed(dcp_interop, world_size, path)
    failed = all(m is not None for m, _, _ in crash) and not any(left for _, left, _ in crash)
    rows = [make_row("save interrupted by a raising rank: previous checkpoint loads", "the checkpoint before",
                     max_abs_diff=max(d for _, _, d in crash) if failed else float("inf"), tolerance=0.0,
                     seconds=t1)]
    rows += [make_row(f"checkpoint interop: {k}", "the saved weights", max_abs_diff=_worst(interop, k), tolerance=0.0,
                      seconds=t2) for k in interop[0]]
    return rows


CHECKS = [check_resume, check_resharding, check_failures]
