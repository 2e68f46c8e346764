"""Figures for chapter 12 (matplotlib), each drawn from what was measured: the KV cache of a running batch, requests
over decoding steps, latency distributions per balancer, and every rank's steps with their communication."""
import math

import matplotlib.pyplot as plt


def kv_cache(held: list[tuple[int, int, int]], slots: int, max_len: int, heads: int, tp: int):
    """Each rank's KV cache: a row per slot, a column per position, coloured by the request holding it.

    held: (slot, request id, tokens in the cache). Every rank holds every position of every slot, but only the keys
    and values of its heads [r H/tp, (r+1) H/tp): the picture is the same on each rank, each row 1/tp as deep.
    """
    grid = [[math.nan] * max_len for _ in range(slots)]
    for slot, rid, length in held:
        grid[slot][:length] = [rid % 10] * length
    fig, axes = plt.subplots(1, tp, figsize=(5.5 * tp, 2.4), squeeze=False)
    per = heads // tp
    for r, ax in enumerate(axes[0]):
        ax.imshow(grid, cmap="tab10", vmin=0, vmax=9, aspect="auto", interpolation="nearest")
        for slot, rid, length in held:
            ax.text(length, slot, f" request {rid}: {length} token{'s' if length > 1 else ''}", ha="left",
                    va="center", fontsize=8)
        ax.set(title=f"rank {r}: keys and values of heads {r * per}..{(r + 1) * per - 1} of {heads}",
               xlabel="position in the sequence", ylabel="KV-cache slot", yticks=range(slots))
    fig.tight_layout()
    return fig


def request_timeline(requests, batch_sizes: list[int], ax=None):
    """Each request from its prefill to its last token (decoding steps), and the decoding batch size per step."""
    ax = ax or plt.subplots(figsize=(9, 3.2))[1]
    for i, r in enumerate(sorted(requests, key=lambda r: r.rid)):
        if r.admitted_step is None:  # nothing to generate: never took a slot
            continue
        ax.barh(i, r.finished_step - r.admitted_step + 1, left=r.admitted_step - 0.5, height=0.6, color=f"C{i % 10}")
        ax.text(r.finished_step + 0.7, i, f"{r.max_new_tokens} token{'s' if r.max_new_tokens > 1 else ''}",
                va="center", fontsize=8)
    ax.set(xlabel="engine step", ylabel="request", yticks=range(len(requests)), xlim=(-1, len(batch_sizes) + 3),
           title="continuous batching: requests join and leave the running batch")
    twin = ax.twinx()
    twin.step(range(len(batch_sizes)), batch_sizes, where="mid", color="black", lw=1)
    twin.set_ylabel("rows decoded together")
    return ax


def latency_cdfs(result: dict):
    """Latency distributions (one curve per balancer) and the throughput, from bench.serve.bench_serve."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [2, 1]})
    for name, b in result["balancers"].items():
        ms = sorted(1e3 * t for t in b["latencies"])
        left.step(ms, [(k + 1) / len(ms) for k in range(len(ms))], where="post", label=name)
        for q in ("p50", "p99"):
            left.plot(1e3 * b[q], float(q[1:]) / 100, "o", color=left.lines[-1].get_color())
    left.set(xscale="log", xlabel="latency, arrival to last token (ms)", ylabel="share of requests",
             title=f"{result['pattern']} lengths at {result['utilization']:.0%} of capacity (dots: p50, p99)")
    left.legend()
    names = list(result["balancers"])
    right.bar(names, [result["balancers"][n]["throughput"] for n in names], color=["C0", "C1"])
    right.set(ylabel="generated tokens / s", title="throughput")
    fig.tight_layout()
    return fig


def rank_timeline(records: list[dict], ax=None):
    """Every rank's steps (light) and the time its communication was in flight (dark), on one clock."""
    ax = ax or plt.subplots(figsize=(10, 2.8))[1]
    origin = min(r["start"] for r in records)
    for r in records:
        ax.barh(r["rank"], r["seconds"] * 1e3, left=(r["start"] - origin) * 1e3, height=0.7, color="C0", alpha=0.3,
                edgecolor="C0")
        for _, t0, t1, _, _ in r["events"]:
            ax.barh(r["rank"], (t1 - t0) * 1e3, left=(t0 - origin) * 1e3, height=0.4, color="C3")
    ranks = sorted({r["rank"] for r in records})
    ax.set(xlabel="ms", yticks=ranks, yticklabels=[f"rank {r}" for r in ranks],
           title="steps (light) and communication in flight (red)")
    ax.invert_yaxis()
    return ax


def replica_work(runs: dict):
    """Per balancer (runs: name -> balancer.replay_in_steps result): latency distributions in engine steps, and
    the tokens each replica generated."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw={"width_ratios": [2, 1]})
    for name, run in runs.items():
        steps = sorted(run["latencies"])
        left.step(steps, [(k + 1) / len(steps) for k in range(len(steps))], where="post", label=name)
        for q in ("p50", "p99"):
            left.plot(run[q], float(q[1:]) / 100, "o", color=left.lines[-1].get_color())
    left.set(xscale="log", xlabel="latency, arrival to last token (engine steps)", ylabel="share of requests",
             title="latency (dots: p50, p99)")
    left.legend()
    width, names = 0.38, list(runs)
    for k in range(len(runs[names[0]]["tokens_per_replica"])):
        right.bar([i + (k - 0.5) * width for i in range(len(names))],
                  [runs[n]["tokens_per_replica"][k] for n in names], width, label=f"replica {k}")
    right.set(xticks=range(len(names)), xticklabels=names, ylabel="generated tokens", title="work per replica")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig
