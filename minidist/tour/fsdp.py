"""Tour checks for chapter 06 (FSDP): per-block units against FSDP2 (fp32 and bf16 mixed precision), the bytes and
memory of a step, one unit gathered at a time (plus the prefetched one), all-gathers prefetched ahead of compute,
and training under activation checkpointing (forward hooks re-run in backward).
"""
import copy
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .. import comm
from ..fsdp import full_state_dict, fully_shard
from ..launch import device, launch
from ..memory import checkpoint_blocks
from ..mesh import Mesh
from ..models import GPT, GPTConfig, lm_loss
from ..testing import on_device, to_device
from .data_parallel import BATCHES, BF16_TOL, CFG, SGD_TOL
from .rows import covers, make_row
from .zero import NAMES, states_and_bytes_rows

PEAK_CFG = GPTConfig(n_layer=4, n_embd=64, block_size=32)  # four blocks: "one at a time" shows


def per_block(model, **options):
    """FSDP's usual wrapping: each block a unit, then the root (embeddings, final LayerNorm, tied output layer)."""
    for block in model.blocks:
        fully_shard(block, **options)
    return fully_shard(model, **options)


@on_device
def against_fsdp2(dtypes=(None, torch.bfloat16), batches=BATCHES) -> dict:
    """minidist's fully_shard and torch's (FSDP2, on a DeviceMesh over the same ranks) side by side, per-block
    units, SGD on the same slices: {param_dtype: largest difference of the full weights}."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp import fully_shard as torch_fully_shard
    rank, n = dist.get_rank(), dist.get_world_size()
    mesh = Mesh.build(dp=n).device_mesh(axes=("dp",))
    out = {}
    for dtype in dtypes:
        torch.manual_seed(0)
        ours = GPT(CFG)
        theirs = copy.deepcopy(ours)
        per_block(ours, param_dtype=dtype)
        policy = MixedPrecisionPolicy(param_dtype=dtype)
        for block in theirs.blocks:
            torch_fully_shard(block, mesh=mesh, mp_policy=policy)
        torch_fully_shard(theirs, mesh=mesh, mp_policy=policy)
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
        for x, y in map(to_device, batches):
            for model, opt in zip((ours, theirs), opts):
                lm_loss(model(x.chunk(n)[rank]).float(), y.chunk(n)[rank]).backward()
                opt.step()
                opt.zero_grad()
        mine, full = full_state_dict(ours), {k: v.full_tensor() for k, v in theirs.state_dict().items()}
        out[dtype] = max((mine[k] - v).abs().max().item() for k, v in full.items())
    return out


@on_device
def timeline(cfg=PEAK_CFG, link=None, steps: int = 3, batch: int = 4, reshard_after_forward: bool = True) -> dict:
    """Per-block FSDP training steps in fp32 (with a simulated link: communication takes visible time on one machine).

    Returns the last step's events (what, start, end in seconds since it began), the most bytes of gathered
    parameters held at once (measured at every all-gather), and each unit's gathered bytes.
    """
    torch.manual_seed(0)
    model = per_block(GPT(cfg), reshard_after_forward=reshard_after_forward)
    root = model.fsdp_unit
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(cfg.vocab_size, (batch, cfg.block_size), generator=torch.Generator().manual_seed(dist.get_rank()),
                      device="cpu").to(device())
    with comm.ring_backend(link=link):
        for _ in range(steps):  # the first step records the order of the units; later steps prefetch
            root.events.clear()
            root.peak, start = 0, time.perf_counter()
            lm_loss(model(x), x).backward()
            opt.step()
            opt.zero_grad()
    units = {u.name: u.full_flat.numel() * u.full_flat.element_size() for u in root.order_pre}
    return {"events": [(what, s - start, e - start) for what, s, e in root.events], "peak": root.peak,
            "units": units}


class Checkpointed(nn.Module):
    """A block whose whole call (its fully_shard hooks included) torch.utils.checkpoint recomputes in backward."""

    def __init__(self, block, reentrant):
        super().__init__()
        self.block, self.reentrant = block, reentrant

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=self.reentrant)


def recomputed_against_one_process(how: str) -> dict:
    """Per-block units whose blocks are recomputed in backward (torch's checkpoint either way, or minidist's
    checkpoint_blocks), 3 SGD steps, against one process running the same recomputation; also what is left gathered."""
    torch.manual_seed(0)
    model = GPT(CFG)
    if how == "minidist":
        checkpoint_blocks(model)
    else:
        model.blocks = nn.ModuleList(Checkpointed(b, how == "reentrant") for b in model.blocks)
    reference, start = copy.deepcopy(model), copy.deepcopy(model).state_dict()
    for block in model.blocks:
        fully_shard(block.block if how != "minidist" else block)
    fully_shard(model)
    n, rank = dist.get_world_size(), dist.get_rank()
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(reference.parameters(), lr=0.1)
    for x, y in BATCHES[:3]:
        for m, o, xb, yb in ((model, opt, x.chunk(n)[rank], y.chunk(n)[rank]), (reference, ref_opt, x, y)):
            lm_loss(m(xb), yb).backward()
            o.step()
            o.zero_grad()
    held = sum(m.fsdp_unit.full_flat.untyped_storage().nbytes() for m in model.modules()
               if getattr(m, "fsdp_unit", None) is not None)
    full = full_state_dict(model)
    return {"diff": max((full[k] - v).abs().max().item() for k, v in reference.state_dict().items()),
            "block 0 moved": max((full[k] - v).abs().max().item() for k, v in start.items() if ".0." in k),
            "held": held}


def late_prefetches(events) -> int:
    """Units whose all-gather was not issued before the unit computing just before them started (in forward and in
    backward): 0 when every block's weights were prefetched."""
    gathers = [(w.split(" ", 1)[1], s) for w, s, _ in events if w.startswith("all-gather")]
    late = 0
    for phase in ("forward", "backward"):
        computes = sorted(((w.split(" ", 1)[1], s) for w, s, _ in events if w.startswith(phase)), key=lambda c: c[1])
        for (_, previous), (unit, start) in zip(computes, computes[1:]):
            issued = max(s for u, s in gathers if u == unit and s <= start)  # this phase's all-gather of `unit`
            late += issued >= previous
    return late


def gathered_over_time(events, units: dict[str, int]) -> list[tuple[float, int]]:
    """(time, bytes of gathered parameters held) through a step, read off its events: a unit holds its gathered
    bytes from the moment its all-gather is issued to the end of the compute that uses them (it reshards after
    forward and after backward)."""
    changes = []
    for what, issued, _ in (e for e in events if e[0].startswith("all-gather")):
        unit = what.split(" ", 1)[1]
        ends = [e for w, s, e in events if w in (f"forward {unit}", f"backward {unit}") and e > issued]
        changes += [(issued, units[unit]), (min(ends), -units[unit])]
    points, held = [(0.0, 0)], 0
    for t, change in sorted(changes):
        held += change
        points.append((t, held))
    return points


def _timed(fn, world_size, *args):
    start = time.perf_counter()
    return launch(fn, world_size, *args), time.perf_counter() - start


@covers("FSDP (a unit per block), fp32, SGD", "FSDP (a unit per block), bf16, SGD")
def check_fsdp2(world_size: int) -> list[dict]:
    per_rank, seconds = _timed(against_fsdp2, world_size)
    return [make_row(f"FSDP (a unit per block), {name}, SGD", f"torch FSDP2{policy}",
                     max_abs_diff=max(r[dtype] for r in per_rank), tolerance=tol, seconds=seconds)
            for dtype, name, policy, tol in ((None, "fp32", "", SGD_TOL),
                                             (torch.bfloat16, "bf16", ", MixedPrecision bf16", BF16_TOL))]


@covers("FSDP peak gathered parameters", "FSDP prefetch (late all-gathers)")
def check_peak_and_prefetch(world_size: int) -> list[dict]:
    per_rank, seconds = _timed(timeline, world_size)
    r = per_rank[0]
    block = max(v for k, v in r["units"].items() if k.startswith("blocks"))
    expected = r["units"]["root"] + 2 * block  # the root's weights + the computing block + the prefetched one
    return [make_row("FSDP peak gathered parameters", "root + 2 blocks (1 prefetched)",
                     max_abs_diff=max(abs(p["peak"] - expected) for p in per_rank), tolerance=0, seconds=seconds)
            | {"peak_bytes": r["peak"], "peak_bytes_theory": expected},
            make_row("FSDP prefetch (late all-gathers)", "none, forward and backward",
                     max_abs_diff=max(late_prefetches(p["events"]) for p in per_rank), tolerance=0,
                     seconds=seconds)]


@covers(*[f"{NAMES[s]}, bf16: bytes, states" for s in ("fsdp", "fsdp-keep")])
def check_states_and_bytes(world_size: int) -> list[dict]:
    return states_and_bytes_rows(("fsdp", "fsdp-keep"), world_size)


CHECKS = [check_fsdp2, check_states_and_bytes, check_peak_and_prefetch]
