"""Serving: the round-robin and least-outstanding-tokens balancers under the same synthetic load (chapter 12).

    python -m minidist bench serve --world-size 2 --requests 160 --utilization 0.9 --slots 4 --pattern alternating

starts `world-size` replicas of the tiny Llama (one rank each, continuous batching over `slots` KV-cache slots),
replays one Poisson load against each balancer in turn (`repeats` rounds, the order alternating), and reports each
balancer's generated tokens per second and median / 99th-percentile latency (medians over the rounds). The
"alternating" pattern sends short and long requests in turn, as two clients would (round-robin then gives every long
request to the same replica); "iid" draws each request's length at random (25% long).

The arrival rate is set from the machine's measured capacity (every slot of every replica busy with long requests:
tokens per second), so that the load asks for `utilization` of it: on a shared 2-core laptop the capacity changes
from minute to minute, and a fixed rate would be an overload one minute and a trickle the next. `rate` overrides it.
"""
import statistics
import time

from ..balancer import BALANCERS, MIX, poisson_load, run_load


def measure_capacity(cluster, slots: int, new_tokens: int = 100, bursts: int = 3) -> float:
    """Tokens per second the cluster generates with all its slots busy (replicas x slots requests at once): the
    best of `bursts` bursts, since other processes on the machine can only slow a burst down."""
    best = 0.0
    for _ in range(bursts):
        cluster.balancer = BALANCERS["round-robin"]()
        start = time.time()
        futures = [cluster.submit([1, 2, 3, 4], new_tokens) for _ in range(cluster.replicas * slots)]
        tokens = sum(len(f.result(timeout=120).output) for f in futures)
        best = max(best, tokens / (time.time() - start))
    return best

PATTERNS = {"iid": MIX, "alternating": ((4, 0.5), (40, 0.5))}


def bench_serve(replicas: int = 2, requests: int = 160, utilization: float = 0.9, slots: int = 4,
                pattern: str = "alternating", repeats: int = 1, model: str = "tiny-llama", seed: int = 0,
                rate: float | None = None) -> dict:
    from ..cluster import Cluster
    if pattern not in PATTERNS:
        raise ValueError(f"unknown load pattern {pattern!r}; choose one of {sorted(PATTERNS)}")
    if repeats < 1 or not utilization > 0:
        raise ValueError(f"need repeats >= 1 and a positive utilization, got {repeats} and {utilization}")
    mix = PATTERNS[pattern]
    mean_tokens = sum(n * p for n, p in mix) / sum(p for _, p in mix)
    runs = {name: [] for name in BALANCERS}
    with Cluster(model, tp=1, replicas=replicas, slots=slots) as cluster:
        run_load(cluster, poisson_load(8, 50.0, seed=seed + 1), "round-robin")  # warm-up: first steps are slow
        capacity = measure_capacity(cluster, slots)
        rate = rate or utilization * capacity / mean_tokens
        load = poisson_load(requests, rate, mix, seed=seed, alternate=pattern == "alternating")
        for k in range(repeats):
            for name in (list(BALANCERS) if k % 2 == 0 else list(BALANCERS)[::-1]):
                runs[name].append(run_load(cluster, load, name))
    med = lambda name, key: statistics.median(r[key] for r in runs[name])  # noqa: E731
    return {"replicas": replicas, "requests": requests, "rate": rate, "capacity": capacity,
            "utilization": rate * mean_tokens / capacity, "slots": slots, "pattern": pattern,
            "repeats": repeats, "model": model, "offered_tokens": sum(r["max_new_tokens"] for r in load),
            "balancers": {name: {"throughput": med(name, "throughput"), "p50": med(name, "p50"),
                                 "p99": med(name, "p99"), "per_replica": runs[name][-1]["per_replica"],
                                 "latencies": runs[name][-1]["latencies"]} for name in runs}}


def format_serve(result: dict) -> str:
    lines = [f"{result['replicas']} replicas of {result['model']}, {result['slots']} KV-cache slots each; "
             f"{result['requests']} requests ({result['pattern']} lengths, {result['offered_tokens']} tokens), "
             f"Poisson arrivals at {result['rate']:.0f}/s: {result['utilization']:.0%} of the measured capacity, "
             f"{result['capacity']:,.0f} tokens/s; medians of {result['repeats']} round(s)",
             f"{'balancer':<16}{'tokens/s':>10}{'p50 ms':>9}{'p99 ms':>9}  requests per replica"]
    for name, b in result["balancers"].items():
        lines.append(f"{name:<16}{b['throughput']:>10,.0f}{1e3 * b['p50']:>9.1f}{1e3 * b['p99']:>9.1f}  "
                     f"{b['per_replica']}")
    return "\n".join(lines)
