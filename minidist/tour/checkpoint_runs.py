"""The training runs chapter 11's checks save, load and compare: one builder per strategy, one step, the `extra`.

Strategies: ddp (an fp16 model, DataParallel, fp32 master weights with a dynamic loss scaler), zero2 (ZeroOptimizer
stage 2 with small buckets, parameters cut across buckets), fsdp (a unit per block, then the root), tp (parallelize
with GPT_PLAN), pp (GPipe over one stage per rank), dense (one process). ddp, zero2 and fsdp train the 32-wide GPT
with a frozen position embedding; tp, pp and dense a 48-wide one whose 12 heads split over 2, 3 and 4 ranks and
whose vocabulary of 509 is padded. Everything trains with dropout: the RNG state has to travel too.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import checkpoint
from ..data import random_batches
from ..data_parallel import DataParallel
from ..mixed_precision import LossScaler, MixedPrecisionOptimizer
from ..models import GPT, GPTConfig, lm_loss
from ..testing import to_device
from ..zero import ZeroOptimizer
from .fsdp import per_block
from .handover import load_full_weights
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
        from ..tensor_parallel.plans import GPT_PLAN, parallelize
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


def restore(run: Run, extra: dict, forget=()) -> None:
    """Restore the RNG and the loss scaler from `extra`, but what `forget` names ("rng", "scaler")."""
    if "rng" not in forget:
        checkpoint.set_rng_state(extra["rng"])
    if run.scaler is not None and "scaler" not in forget:
        run.scaler.load_state_dict(extra["scaler"])


def max_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over the tensors (or dicts of tensors) of two states with the same keys; inf if keys or shapes
    differ, or where either holds a NaN (Python's max() would skip a NaN: max([0.0, nan]) is 0.0)."""
    if a.keys() != b.keys():
        return float("inf")
    return max([max_diff(a[k], b[k]) if isinstance(a[k], dict) else _diff(a[k], b[k]) for k in a] or [0.0])


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    d = (a.float() - b.float()).abs()
    return float("inf") if d.isnan().any() else d.max().item() if d.numel() else 0.0
