"""Tour checks for chapters 02 (data parallel) and 03 (distributed data loading).

The rank functions here train a small GPT next to its references; the tests call the same functions and assert on
their results, so the tour and the test suite check one piece of code.
"""
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import comm
from ..data import random_batches
from ..data_parallel import DataParallel
from ..launch import launch
from ..mixed_precision import LossScaler, MixedPrecisionOptimizer
from ..models import GPT, GPTConfig, lm_loss
from ..samplers import DistributedSampler, TokenBudgetBatchSampler, padding_waste
from ..testing import compare_with_reference, on_device, replica_divergence, sgd, to_device
from .rows import covers, make_row

CFG = GPTConfig(n_layer=2, n_embd=32, block_size=16)
BATCHES = random_batches(torch.randint(512, (5000,), generator=torch.Generator().manual_seed(0)), 12, 16, steps=4)
STAGES = {"naive": dict(bucket_cap_mb=None, overlap=False), "bucketed": dict(bucket_cap_mb=0.02, overlap=False),
          "overlapped": dict(bucket_cap_mb=0.02, overlap=True)}
SGD_TOL = 1e-6    # SGD, 4 steps: gradient sums in another order than one process's (README tolerance policy)
ADAM_LR = 1e-3
ADAM_TOL = 0.01 * ADAM_LR * len(BATCHES)  # 1% of the most Adam can move a weight: its direction on a near-zero
                                          # gradient is decided by rounding noise, which Adam's normalization amplifies
FP16_TOL = 1e-4   # fp16 gradients differ in their last bits (eps 9.8e-4) x lr 0.1 x 4 steps
BF16_TOL = 1e-3   # bf16 matmuls (eps 7.8e-3) over half the batch round differently


@on_device
def stage_against_one_process(stage: str, optimizer=sgd(0.1)) -> dict:
    """Train DataParallel(stage) next to one process on the global batch; the bytes this rank really sent in the last
    step's backward (counted: the collectives run on minidist's own ring)."""
    kept, ledger = {}, comm.ByteLedger()

    def wrap(model):
        kept["dp"] = DataParallel(model, **STAGES[stage])
        return kept["dp"]

    def step(module, opt, batch):
        ledger.records.clear()
        with ledger:
            loss = lm_loss(module(batch[0]), batch[1])
            loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()
    with comm.ring_backend():
        result = compare_with_reference(lambda: GPT(CFG), wrap, BATCHES, optimizer=optimizer, step=step)
    psi = sum(p.numel() for p in kept["dp"].module.parameters() if p.requires_grad)
    return {"diff": result.max_abs_diff, "divergence": replica_divergence(kept["dp"]), "bytes": ledger.total_bytes(),
            "counted": ledger.counted, "collectives": ledger.count(), "buckets": len(kept["dp"].buckets), "psi": psi}


@on_device
def side_by_side_with_ddp(optimizer=sgd(0.1)) -> float:
    """Largest weight difference between minidist's DataParallel and torch DDP trained on the same slices."""
    torch.manual_seed(0)
    ours = DataParallel(GPT(CFG), bucket_cap_mb=0.02)
    torch.manual_seed(0)
    theirs = DDP(GPT(CFG), bucket_cap_mb=0.02)
    opts = optimizer(ours.parameters()), optimizer(theirs.parameters())
    rank, n = dist.get_rank(), dist.get_world_size()
    for x, y in map(to_device, BATCHES):
        for model, opt in zip((ours, theirs), opts):
            lm_loss(model(x.chunk(n)[rank]), y.chunk(n)[rank]).backward()
            opt.step()
            opt.zero_grad()
    return max((a - b).abs().max().item() for a, b in zip(ours.module.parameters(), theirs.module.parameters()))


@on_device
def accumulation(micro_steps: int = 2) -> tuple[float, int, float]:
    """Micro-steps under no_sync + one synchronized step vs one backward on the whole batch.

    Returns (largest gradient difference, collectives inside no_sync, bytes counted in the synchronized backward).
    """
    torch.manual_seed(0)
    reference, dp = GPT(CFG), DataParallel(GPT(CFG))
    dp.module.load_state_dict(reference.state_dict())
    rank, n = dist.get_rank(), dist.get_world_size()
    x, y = to_device((torch.cat([b[0] for b in BATCHES]), torch.cat([b[1] for b in BATCHES])))  # 48 rows
    if len(x) % (n * micro_steps):
        raise ValueError(f"{len(x)} rows do not split into {n} ranks x {micro_steps} equal micro-batches")
    lm_loss(reference(x), y).backward()
    xs, ys = x.chunk(n)[rank].chunk(micro_steps), y.chunk(n)[rank].chunk(micro_steps)
    with comm.ByteLedger() as quiet, dp.no_sync():
        for xm, ym in zip(xs[:-1], ys[:-1]):
            (lm_loss(dp(xm), ym) / micro_steps).backward()
    with comm.ring_backend(), comm.ByteLedger() as synced:
        (lm_loss(dp(xs[-1]), ys[-1]) / micro_steps).backward()
    diff = max((p.grad - q.grad).abs().max().item() for p, q in zip(dp.module.parameters(), reference.parameters()))
    return diff, quiet.count(), synced.total_bytes() if synced.counted else None


@on_device
def fp16_side_by_side(init_scale: float = 2.0 ** 16) -> tuple:
    """fp16 model + loss scaler + fp32 masters, data parallel vs one process.

    Returns (diff, steps skipped, steps one process skipped, the scale after every step, the same for one process,
    replica divergence): the scale sequences must match step for step, not only the number of skips."""
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    reference = GPT(CFG).half()
    torch.manual_seed(0)
    dp = DataParallel(GPT(CFG).half())
    ref_opt = MixedPrecisionOptimizer(reference, torch.optim.SGD, LossScaler(init_scale), lr=0.1)
    opt = MixedPrecisionOptimizer(dp.module, torch.optim.SGD, LossScaler(init_scale), lr=0.1)
    scales = {id(opt): [], id(ref_opt): []}
    for x, y in map(to_device, BATCHES):
        for model, o, (xb, yb) in ((reference, ref_opt, (x, y)), (dp, opt, (x.chunk(n)[rank], y.chunk(n)[rank]))):
            o.scaler.scale_loss(lm_loss(model(xb).float(), yb)).backward()
            o.step()
            o.zero_grad()
            scales[id(o)].append(o.scaler.scale)
    diff = max((a - b).abs().max().item() for a, b in zip(ref_opt.master, opt.master))
    return diff, opt.skipped, ref_opt.skipped, scales[id(opt)], scales[id(ref_opt)], replica_divergence(dp)


@on_device
def bf16_side_by_side() -> float:
    """bf16 autocast, data parallel vs one process (SGD): (largest weight difference, replica divergence)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    reference = GPT(CFG)
    torch.manual_seed(0)
    dp = DataParallel(GPT(CFG))
    ref_opt, opt = torch.optim.SGD(reference.parameters(), lr=0.1), torch.optim.SGD(dp.parameters(), lr=0.1)
    for x, y in map(to_device, BATCHES):
        for model, o, (xb, yb) in ((reference, ref_opt, (x, y)), (dp, opt, (x.chunk(n)[rank], y.chunk(n)[rank]))):
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                loss = lm_loss(model(xb), yb)
            loss.backward()
            o.step()
            o.zero_grad()
    diff = max((a - b).abs().max().item() for a, b in zip(reference.parameters(), dp.module.parameters()))
    return diff, replica_divergence(dp)


@on_device
def unequal_batches(sizes: list[int], normalize: str = "global", micro_steps: int = 1) -> dict:
    """Gradients of DataParallel when ranks hold different numbers of sequences, against one process on their union.

    sizes[r]: sequences on rank r (split into `micro_steps` unequal micro-batches under no_sync). normalize="global":
    the loss is data_parallel.global_mean_loss(sum of token losses, this rank's token count); "per-rank": each rank's
    own mean (what averaging per-rank mean losses gives). Returns the largest gradient difference, the relative error
    |g - g_true| / |g_true| over all parameters, and the replica divergence of the gradients.
    """
    import torch.nn.functional as F
    from ..data_parallel import global_mean_loss
    n, rank = dist.get_world_size(), dist.get_rank()
    x, y = to_device((torch.cat([b[0] for b in BATCHES]), torch.cat([b[1] for b in BATCHES])))
    if len(sizes) != n or sum(sizes) > len(x):
        raise ValueError(f"need one size per rank ({n}) and at most {len(x)} sequences in all, got {sizes}")

    def loss_sum(model, xb, yb):
        logits = model(xb)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), yb.reshape(-1), reduction="sum")
    torch.manual_seed(0)
    reference, dp = GPT(CFG), DataParallel(GPT(CFG))
    dp.module.load_state_dict(reference.state_dict())
    (loss_sum(reference, x[:sum(sizes)], y[:sum(sizes)]) / (sum(sizes) * x.shape[1])).backward()
    mine = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    count = sizes[rank] * x.shape[1]  # tokens on this rank in the whole step
    for k, (xm, ym) in enumerate(zip(x[mine].tensor_split(micro_steps), y[mine].tensor_split(micro_steps))):
        with dp.no_sync() if k < micro_steps - 1 else torch.enable_grad():
            loss = loss_sum(dp, xm, ym)
            (global_mean_loss(loss, count) if normalize == "global" else loss / count).backward()
    grads = [(p.grad, q.grad) for p, q in zip(dp.module.parameters(), reference.parameters())]
    error = torch.cat([(g - t).flatten() for g, t in grads]).norm() / torch.cat([t.flatten() for _, t in grads]).norm()
    spread = max((g - comm.broadcast(g, 0)).abs().max().item() for g, _ in grads)
    return {"diff": max((g - t).abs().max().item() for g, t in grads), "relative_error": error.item(),
            "divergence": spread}


def counted_mean(per_rank: list[dict]):
    """The mean over ranks of the bytes each really sent (exact, a Fraction), or None if any were only modelled.

    With N not dividing a bucket, ranks send different amounts (their chunks differ by an element); summed over the
    ranks, a ring all-reduce sends exactly 2(N-1) x S, so the mean is the formula's per-rank figure exactly.
    """
    if not all(p["counted"] for p in per_rank):
        return None
    return sum(p["bytes"] for p in per_rank) / len(per_rank)


def _timed(fn, world_size, *args):
    start = time.perf_counter()
    return launch(fn, world_size, *args), time.perf_counter() - start


@covers("data parallel naive bucketed overlapped", "gradient accumulation no_sync", "loss normalization",
        "fp16 loss scaler", "bf16 autocast")
def check_data_parallel(world_size: int) -> list[dict]:
    n, rows = world_size, []
    for stage in STAGES:
        per_rank, seconds = _timed(stage_against_one_process, n, stage)
        r = per_rank[0]
        rows.append(make_row(
            f"data parallel, {stage} ({r['collectives']} all-reduces/step)", "one process, global batch (SGD)",
            max_abs_diff=max(p["diff"] for p in per_rank), tolerance=SGD_TOL,
            replica_divergence=max(p["divergence"] for p in per_rank),
            comm_bytes=counted_mean(per_rank), comm_bytes_theory=comm.ring_bytes("all_reduce", 4 * r["psi"], n),
            seconds=seconds))
    ddp, seconds = _timed(side_by_side_with_ddp, n)
    rows.append(make_row("data parallel, overlapped", "torch DDP (SGD)", max_abs_diff=max(ddp), tolerance=SGD_TOL,
                         seconds=seconds))
    acc, seconds = _timed(accumulation, n)
    psi = sum(p.numel() for p in GPT(CFG).parameters())
    rows.append(make_row("gradient accumulation, no_sync (2 micro-steps)", "one backward on the whole batch",
                         max_abs_diff=max(a[0] for a in acc) + sum(a[1] for a in acc), tolerance=SGD_TOL,
                         comm_bytes=counted_mean([{"bytes": a[2], "counted": a[2] is not None} for a in acc]),
                         comm_bytes_theory=comm.ring_bytes("all_reduce", 4 * psi, n), seconds=seconds))
    sizes = [3, 23, 10, 5][:n] if n > 1 else [26]
    unequal, seconds = _timed(unequal_batches, n, sizes, "global", 2)
    rows.append(make_row(f"loss normalization, unequal batches {sizes}, no_sync", "one process on their union",
                         max_abs_diff=max(u["diff"] for u in unequal), tolerance=SGD_TOL,
                         replica_divergence=max(u["divergence"] for u in unequal), seconds=seconds))
    fp16, seconds = _timed(fp16_side_by_side, n)
    rows.append(make_row("fp16 + loss scaler + fp32 master weights", "one process, same precision",
                         max_abs_diff=max(f[0] for f in fp16) + sum(f[3] != f[4] for f in fp16), tolerance=FP16_TOL,
                         replica_divergence=max(f[5] for f in fp16), seconds=seconds))
    bf16, seconds = _timed(bf16_side_by_side, n)
    rows.append(make_row("bf16 autocast", "one process, same precision",
                         max_abs_diff=max(d for d, _ in bf16), tolerance=BF16_TOL,
                         replica_divergence=max(v for _, v in bf16), seconds=seconds))
    return rows


@covers("DistributedSampler", "token-budget batches")
def check_samplers(world_size: int) -> list[dict]:
    """Index-for-index against torch's DistributedSampler; token budgets: coverage, equal counts, budget kept."""
    from torch.utils.data import DistributedSampler as TorchSampler
    start, n, mismatches, compared = time.perf_counter(), world_size, 0, 0
    for size in (10, 97, 1000):
        for drop_last in (False, True):
            for r in range(n):
                ours = DistributedSampler(range(size), n, r, seed=3, drop_last=drop_last)
                mismatches += list(ours) != list(TorchSampler(range(size), n, r, seed=3, drop_last=drop_last))
                compared += 1
    lengths = torch.randint(1, 200, (997,), generator=torch.Generator().manual_seed(0)).tolist()
    per_rank = [list(TokenBudgetBatchSampler(lengths, 1024, n, r, seed=1)) for r in range(n)]
    batches = [b for bs in per_rank for b in bs]
    violations = (len({len(bs) for bs in per_rank}) - 1                                  # unequal batch counts
                  + len(set(range(len(lengths))) - {i for b in batches for i in b})      # samples never read
                  + sum(len(b) * max(lengths[i] for i in b) > 1024 and len(b) > 1 for b in batches))  # over budget
    waste = padding_waste(batches, lengths)
    return [make_row(f"DistributedSampler ({compared} index lists)", "torch DistributedSampler",
                     max_abs_diff=mismatches,
                     tolerance=0, seconds=time.perf_counter() - start),
            make_row(f"token-budget batches ({waste:.1%} padding)", "budget, coverage, equal counts",
                     max_abs_diff=violations, tolerance=0, seconds=time.perf_counter() - start)]


CHECKS = [check_data_parallel, check_samplers]
