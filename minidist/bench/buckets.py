"""Bucket sizes over a simulated network: chapter 02's overlap, measured next to chapter 01's cost model."""
import statistics
import time

import torch
import torch.distributed as dist

from .. import comm
from ..data import random_batches, token_ids
from ..data_parallel import DataParallel
from ..launch import launch
from ..models import GPT, lm_loss

def _median_seconds(fn, steps: int, warmup: int) -> float:
    times = []
    for k in range(steps + warmup):
        dist.barrier()
        start = time.perf_counter()
        fn()
        if k >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bucket_sweep(caps_mb: list[float], alpha: float, bandwidth: float, steps: int = 6, warmup: int = 2,
                 batch_size: int = 8) -> dict:
    """On every rank: calibrate the cost model over a simulated link, then time one overlapped data-parallel step per
    bucket size and predict it (data_parallel.predict_step_seconds)."""
    from ..comm.ring import AlphaBeta, ring_step_time
    from ..data_parallel import predict_step_seconds
    n, rank = dist.get_world_size(), dist.get_rank()
    link = comm.SimulatedLink(alpha, bandwidth)
    torch.manual_seed(0)
    x, y = random_batches(token_ids(), batch_size * n, GPT().cfg.block_size, 1)[0]
    x, y = x.chunk(n)[rank], y.chunk(n)[rank]
    with comm.ring_backend(link=link):  # calibration: chapter 01's fit, on this link
        samples = [("send", b, n, ring_step_time(b, repeats=3)) for b in (1 << 10, 1 << 16, 1 << 19)]
        for b in (1 << 10, 1 << 16, 1 << 19):
            t = torch.zeros(b // 4)
            samples.append(("all_reduce", b, n, _median_seconds(lambda: comm.all_reduce_sum(t), 3, 1)))
    cost = AlphaBeta.fit(samples)
    model = GPT()
    out = model(x)
    forward_s = _median_seconds(lambda: lm_loss(model(x), y), steps, warmup)

    def forward_backward():
        lm_loss(model(x), y).backward()
    backward_s = _median_seconds(forward_backward, steps, warmup) - forward_s
    rows = []
    for cap in caps_mb:
        torch.manual_seed(0)
        dp = DataParallel(GPT(), bucket_cap_mb=cap, overlap=True)
        sizes = [(b.stop - b.start) * 4 for b in dp.buckets]
        with comm.ring_backend(link=link):
            measured = _median_seconds(lambda: lm_loss(dp(x), y).backward(), steps, warmup)
        rows.append({"bucket_cap_mb": cap, "buckets": len(sizes), "measured_s": measured,
                     "predicted_s": predict_step_seconds(sizes, n, cost, forward_s, backward_s)})
        dp.remove()
    del out
    return {"alpha": cost.alpha, "beta": cost.beta, "gamma": cost.gamma, "forward_s": forward_s,
            "backward_s": backward_s, "rows": rows}


def bench_buckets(world_size: int = 2, caps_mb=(0.01, 0.03, 0.1, 0.25, 1.0), alpha: float = 1e-3,
                  bandwidth: float = 50e6, steps: int = 6) -> dict:
    """Measured vs predicted step time across bucket sizes over a simulated link (slowest rank's figures)."""
    if world_size < 2 or steps < 1 or not caps_mb or min(caps_mb) <= 0:
        raise ValueError(f"need world_size >= 2, steps >= 1 and positive bucket sizes, got world_size={world_size}, "
                         f"steps={steps}, caps={list(caps_mb)}")
    comm.SimulatedLink(alpha, bandwidth)  # checks the link before starting any rank
    per_rank = launch(bucket_sweep, world_size, list(caps_mb), alpha, bandwidth, steps)
    rows = [dict(r, measured_s=max(p["rows"][k]["measured_s"] for p in per_rank))
            for k, r in enumerate(per_rank[0]["rows"])]
    best = lambda key: min(rows, key=lambda r: r[key])["bucket_cap_mb"]  # noqa: E731
    return {"world_size": world_size, "link_alpha_s": alpha, "link_bandwidth_Bps": bandwidth,
            "fitted": {k: per_rank[0][k] for k in ("alpha", "beta", "gamma", "forward_s", "backward_s")},
            "rows": rows, "best_measured_mb": best("measured_s"), "best_predicted_mb": best("predicted_s"),
            "max_relative_error": max(abs(r["predicted_s"] / r["measured_s"] - 1) for r in rows)}


def format_buckets(result: dict) -> str:
    f = result["fitted"]
    lines = [f"tiny GPT, {result['world_size']} ranks, overlapped DataParallel over a simulated link "
             f"(alpha {result['link_alpha_s'] * 1e3:g} ms, {result['link_bandwidth_Bps'] / 1e6:g} MB/s)",
             f"fitted: alpha {f['alpha'] * 1e3:.2f} ms, 1/beta {1 / max(f['beta'], 1e-30) / 1e6:.1f} MB/s; "
             f"forward {f['forward_s'] * 1e3:.1f} ms, backward {f['backward_s'] * 1e3:.1f} ms",
             f"{'bucket MiB':>11}{'buckets':>9}{'measured ms':>13}{'predicted ms':>14}{'error':>8}"]
    for r in result["rows"]:
        lines.append(f"{r['bucket_cap_mb']:>11g}{r['buckets']:>9}{r['measured_s'] * 1e3:>13.1f}"
                     f"{r['predicted_s'] * 1e3:>14.1f}{r['predicted_s'] / r['measured_s'] - 1:>+8.0%}")
    lines.append(f"best bucket: measured {result['best_measured_mb']:g} MiB, predicted {result['best_predicted_mb']:g} "
                 f"MiB; largest error {result['max_relative_error']:.0%} (goal: within 20%)")
    return "\n".join(lines)
