"""Tour checks for chapter 09 (activation checkpointing and offload).

Checkpointed and offloaded training runs next to plain training on the same ranks, the same batches and the same
dropout masks: the weights must be bit-identical. Saved activations, recomputed FLOPs and bytes per storage tier are
measured and compared with their formulas. The tests call these same rank functions.
"""
import copy
import time

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint as torch_checkpoint
from torch.utils.flop_counter import FlopCounterMode

from .. import comm
from ..data_parallel import DataParallel
from ..launch import launch
from ..memory import SavedActivations
from ..memory.offload import DiskTier, bytes_by_location, offload_activations, offload_optimizer, optimizer_tensors
from ..memory.recompute import checkpoint_blocks, saved_bytes_per_layer
from ..mixed_precision import LossScaler, MixedPrecisionOptimizer
from ..models import GPT, GPTConfig, lm_loss
from ..testing import on_device, replica_divergence, to_device
from .data_parallel import BATCHES
from .rows import covers, make_row
from .tensor_parallel import layernorm_stat_bytes
from .zero import ZCFG, setup

CFG = GPTConfig(n_layer=2, n_embd=32, block_size=16, dropout=0.1)  # dropout on: recomputation must replay masks
NO_DROPOUT = GPTConfig(n_layer=2, n_embd=32, block_size=16)         # for activation bytes (chapter 00's fp32 count)
POLICIES = ("none", "selective", "full")


def torch_checkpointed(model):
    """Every block through torch.utils.checkpoint (non-reentrant), the reference."""
    for block in model.blocks:
        block.forward = (lambda f: lambda x: torch_checkpoint(f, x, use_reentrant=False))(block.forward)
    return model


TRANSFORMS = {"none": lambda m: m, "full": lambda m: checkpoint_blocks(m, "full"),
              "selective": lambda m: checkpoint_blocks(m, "selective"), "torch": torch_checkpointed}


@on_device
def train(transform: str = "none", offload: str | None = None, steps: int = len(BATCHES)) -> dict:
    """DataParallel on the tiny GPT with dropout, `transform` applied to it ("none", "full", "selective", "torch")
    and, with offload="activations", every saved tensor sent to a disk tier. SGD; the dropout seed is reset before
    every step, so every variant draws the same masks. Returns the weights, the replica divergence, the bytes counted
    in the last step's backward, and the bytes held for backward per location at the end of the last forward."""
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = TRANSFORMS[transform](GPT(CFG))
    dp = DataParallel(model, bucket_cap_mb=0.02)
    opt = torch.optim.SGD(dp.parameters(), lr=0.1)
    tier, held = DiskTier() if offload else None, None
    with comm.ring_backend():
        for step, (x, y) in enumerate(map(to_device, BATCHES[:steps])):
            torch.manual_seed(100 + step)
            with comm.ByteLedger() as ledger:
                hooks = offload_activations(tier, keep=model) if offload == "activations" else None
                with hooks or torch.enable_grad():
                    loss = lm_loss(dp(x.chunk(n)[rank]), y.chunk(n)[rank])
                if hooks:
                    held = bytes_by_location(hooks.held(), x.device) | {"files": tier.bytes_on_disk()}
                loss.backward()
            opt.step()
            opt.zero_grad()
    return {"weights": [p.detach().clone() for p in model.parameters()], "divergence": replica_divergence(dp),
            "bytes": ledger.total_bytes(), "counted": ledger.counted, "held": held,
            "psi": sum(p.numel() for p in model.parameters())}


@on_device
def against_plain(variants: list[tuple[str, str | None]]) -> dict:
    """Each (transform, offload) variant trained next to plain training on this rank: the largest weight
    difference, the replica divergence, counted bytes and bytes held per tier."""
    plain, out = train(), {}
    for transform, offload in variants:
        run = train(transform, offload)
        diff = max((a - b).abs().max().item() for a, b in zip(run["weights"], plain["weights"]))
        out[(transform, offload)] = run | {"diff": diff, "weights": None}
    return out


def saved_per_layer(policy: str, batch: int = 12, seq: int = NO_DROPOUT.block_size) -> dict:
    """Bytes one block of the tiny GPT (fp32, no dropout, sequences of `seq` tokens) keeps for backward under
    `policy`, measured with SavedActivations, next to the formula and the LayerNorm statistics it leaves out."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_embd=NO_DROPOUT.n_embd, block_size=seq))
    if policy != "none":
        checkpoint_blocks(model, policy)
    cfg, block = model.cfg, model.blocks[0]
    h = torch.randn(batch, cfg.block_size, cfg.n_embd, requires_grad=True)
    with SavedActivations(exclude=block) as saved:
        block(h)
    formula = saved_bytes_per_layer(policy, cfg.block_size, batch, cfg.n_embd, cfg.n_head, 4, dropout=False)
    stats = layernorm_stat_bytes(batch * cfg.block_size) if policy != "full" else 0  # LayerNorms recomputed in full
    return {"bytes": saved.bytes, "formula": formula, "layernorm_stats": stats}


def recompute_flops(policy: str, batch: int = 12, cfg: GPTConfig = NO_DROPOUT) -> dict:
    """FLOPs of one training step (forward + backward, FlopCounterMode) with and without `policy`, and the FLOPs
    of what it should recompute: every block's forward (full), every core attention's two matmuls (selective)."""
    torch.manual_seed(0)
    plain = GPT(cfg)
    cfg = plain.cfg
    x = torch.randint(cfg.vocab_size, (batch, cfg.block_size))

    def step_flops(model):
        with FlopCounterMode(display=False) as counter:
            lm_loss(model(x), x).backward()
        return counter.get_total_flops()
    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            h = plain.wte(x) + plain.wpe(torch.arange(cfg.block_size))
            for block in plain.blocks:
                h = block(h)
    expected = forward.get_total_flops() if policy == "full" else \
        cfg.n_layer * 4 * batch * cfg.block_size ** 2 * cfg.n_embd  # q k^T and att v: 2 x 2 b s^2 h FLOPs
    base = step_flops(plain)
    return {"plain": base, "checkpointed": step_flops(checkpoint_blocks(copy.deepcopy(plain), policy)),
            "expected_extra": expected}


def recompute_seconds(policies=POLICIES, repeats: int = 5, batch: int = 8,
                      cfg: GPTConfig = GPTConfig(n_layer=4, n_embd=128, n_head=4, block_size=128)) -> dict:
    """Median seconds of one forward + backward of a GPT under each policy (steps interleaved across policies, so a
    busy machine slows them alike; one warm-up round)."""
    import statistics
    torch.manual_seed(0)
    plain = GPT(cfg)
    models = {p: plain if p == "none" else checkpoint_blocks(copy.deepcopy(plain), p) for p in policies}
    x = torch.randint(cfg.vocab_size, (batch, cfg.block_size))
    times = {p: [] for p in policies}
    for _ in range(repeats + 1):
        for p, model in models.items():
            start = time.perf_counter()
            lm_loss(model(x), x).backward()
            times[p].append(time.perf_counter() - start)
            model.zero_grad()
    return {p: statistics.median(t[1:]) for p, t in times.items()}


def offloaded_layer_bytes(batch: int = 12) -> dict:
    """One block's forward under offload_activations to a disk tier: bytes autograd holds per location, the bytes
    the file system reports, and the formula (chapter 00's, plus LayerNorm statistics)."""
    torch.manual_seed(0)
    model, tier = GPT(NO_DROPOUT), DiskTier()
    cfg, block = model.cfg, model.blocks[0]
    h = torch.randn(batch, cfg.block_size, cfg.n_embd, requires_grad=True)
    with offload_activations(tier, keep=block) as hooks:
        out = block(h)
    held, files = bytes_by_location(hooks.held(), h.device), tier.bytes_on_disk()
    del out
    return {"held": held, "files": files, "files_after_free": tier.bytes_on_disk(),
            "formula": saved_bytes_per_layer("none", cfg.block_size, batch, cfg.n_embd, cfg.n_head, 4, False)
            + layernorm_stat_bytes(batch * cfg.block_size)}


@on_device
def optimizer_offload(offload: bool, steps: int = 3) -> dict:
    """fp16 GPT (ZeRO's test sizes), data parallel, MixedPrecisionOptimizer(Adam) with its masters and moments on a
    disk tier (or not): the weights, the replica divergence, and the bytes of the model states per location just
    before the last step (16-bit weights and gradients present) and after it."""
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    dp = DataParallel(GPT(ZCFG).half(), bucket_cap_mb=0.02)
    opt = MixedPrecisionOptimizer(dp.module, torch.optim.Adam, LossScaler(2.0 ** 10), lr=1e-3)
    if offload:
        offload_optimizer(opt, DiskTier())
    for step, (x, y) in enumerate(map(to_device, BATCHES[:steps])):
        opt.scaler.scale_loss(lm_loss(dp(x.chunk(n)[rank]).float(), y.chunk(n)[rank])).backward()
        before = bytes_by_location(optimizer_tensors(dp.module, opt), x.device)
        opt.step()
        opt.zero_grad()
    return {"weights": [p.detach().clone() for p in dp.module.parameters()], "divergence": replica_divergence(dp),
            "before_step": before, "after_step": bytes_by_location(optimizer_tensors(dp.module, opt), x.device),
            "psi": sum(p.numel() for p in dp.module.parameters()), "skipped": opt.skipped}


@on_device
def optimizer_offload_against_plain() -> dict:
    plain, offloaded = optimizer_offload(False), optimizer_offload(True)
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(plain["weights"], offloaded["weights"]))
    return offloaded | {"diff": diff, "weights": None}


@on_device
def zero_offload(stage: int, steps: int = 3) -> dict:
    """ZeRO-Offload: a bf16 GPT (sizes N <= 4 divides: no padding) with ZeroOptimizer(AdamW, stage) trained with and
    without its master chunks and moments on a disk tier. Returns the largest weight difference, the replica
    divergence and, for the offloaded run, the model-state bytes per location after the last backward."""
    rank, n = dist.get_rank(), dist.get_world_size()
    runs = []
    for offload in (False, True):
        torch.manual_seed(0)
        model, opt = setup(f"zero{stage}", GPT(ZCFG), mixed=True)
        if offload:
            offload_optimizer(opt, DiskTier())
        for x, y in map(to_device, BATCHES[:steps]):
            lm_loss(model(x.chunk(n)[rank]).float(), y.chunk(n)[rank]).backward()
            held = bytes_by_location(optimizer_tensors(model, opt), x.device)
            opt.step()
            opt.zero_grad()
        runs.append([p.detach().float().clone() for p in model.parameters()])
    return {"diff": max((a - b).abs().max().item() for a, b in zip(*runs)), "divergence": replica_divergence(model),
            "held": held, "psi": sum(p.numel() for p in model.parameters())}


def offload_rows(n: int) -> list[dict]:
    """Optimizer-state offload to disk: data parallel with MixedPrecisionOptimizer, ZeRO-1 and ZeRO-2."""
    rows, disk_error = [], 0
    start = time.perf_counter()
    dp = launch(optimizer_offload_against_plain, n)
    psi = dp[0]["psi"]
    rows.append(make_row("optimizer-state offload to disk, DP (fp16 Adam)", "no offload (bitwise)",
                         max_abs_diff=max(o["diff"] for o in dp), tolerance=0.0,
                         replica_divergence=max(o["divergence"] for o in dp), seconds=time.perf_counter() - start,
                         state_bytes_per_rank=max(o["before_step"]["fast"] for o in dp),
                         state_bytes_per_rank_theory=4 * psi))
    disk_error += max(abs(o["before_step"]["disk"] - 12 * psi) for o in dp)
    for stage in (1, 2):
        start = time.perf_counter()
        zero = launch(zero_offload, n, stage)
        psi = zero[0]["psi"]
        rows.append(make_row(f"optimizer-state offload to disk, ZeRO-{stage} (bf16 AdamW)", "no offload (bitwise)",
                             max_abs_diff=max(z["diff"] for z in zero), tolerance=0.0,
                             replica_divergence=max(z["divergence"] for z in zero),
                             state_bytes_per_rank=max(z["held"]["fast"] for z in zero),
                             state_bytes_per_rank_theory=2 * psi + (2 * psi if stage == 1 else 2 * psi // n),
                             seconds=time.perf_counter() - start))
        disk_error += max(abs(z["held"]["disk"] - 12 * psi // n) for z in zero)
    rows.append(make_row("offload: fp32 masters + moments on disk", "12Ψ (DP), 12Ψ/N (ZeRO-1, ZeRO-2)",
                         max_abs_diff=disk_error, tolerance=0))
    return rows


def _mean_bytes(per_rank: list[dict]):
    return sum(r["bytes"] for r in per_rank) / len(per_rank) if all(r["counted"] for r in per_rank) else None


@covers("activation checkpointing", "torch.utils.checkpoint", "saved by one layer", "recomputed FLOPs", "offload")
def check_checkpointing(world_size: int) -> list[dict]:
    n, rows, start = world_size, [], time.perf_counter()
    variants = [("full", None), ("selective", None), ("torch", None), ("none", "activations")]
    per_rank = launch(against_plain, n, variants)
    seconds = time.perf_counter() - start
    names = {("full", None): ("activation checkpointing, full", "no checkpointing, same masks (SGD)"),
             ("selective", None): ("activation checkpointing, selective", "no checkpointing, same masks (SGD)"),
             ("torch", None): ("torch.utils.checkpoint, every block", "no checkpointing, same masks (SGD)"),
             ("none", "activations"): ("activation offload to disk", "no offload, same masks (SGD)")}
    for key, (name, reference) in names.items():
        runs = [r[key] for r in per_rank]
        rows.append(make_row(name, reference, max_abs_diff=max(r["diff"] for r in runs), tolerance=0.0,
                             replica_divergence=max(r["divergence"] for r in runs), comm_bytes=_mean_bytes(runs),
                             comm_bytes_theory=comm.ring_bytes("all_reduce", 4 * runs[0]["psi"], n),
                             seconds=seconds))
    for policy in POLICIES:
        m = saved_per_layer(policy)
        rows.append(make_row(f"saved by one layer, {policy}: {m['bytes']:,} B", "Korthikanti et al. + LN statistics",
                             max_abs_diff=abs(m["bytes"] - m["formula"] - m["layernorm_stats"]), tolerance=0))
    for policy in ("full", "selective"):
        f = recompute_flops(policy)
        rows.append(make_row(f"recomputed FLOPs, {policy}: x{f['checkpointed'] / f['plain']:.3f} per step",
                             "one more forward" if policy == "full" else "4 b s^2 h per layer",
                             max_abs_diff=abs(f["checkpointed"] - f["plain"] - f["expected_extra"]), tolerance=0))
    layer = offloaded_layer_bytes()
    rows.append(make_row(f"offload: one layer's activations on disk ({layer['files']:,} B)",
                         "chapter 00 formula + LN statistics", tolerance=0,
                         max_abs_diff=abs(layer["files"] - layer["formula"]) + layer["held"]["fast"]
                         + layer["files_after_free"]))
    return rows + offload_rows(n)


CHECKS = [check_checkpointing]
