"""Serving: the round-robin and least-outstanding-tokens balancers under the same synthetic load (chapter 12).

    python -m minidist bench serve --world-size 2 --requests 160 --utilization 0.9 --slots 4 --pattern alternating

starts `world-size` replicas of the tiny Llama (one rank each, continuous batching over `slots` KV-cache slots),
replays one Poisson load against each balancer in turn (`repeats` rounds, the order alternating), and reports each
balancer's generated tokens per second and median / 99th-percentile latency (medians over the rounds), and the work
each replica did in the last round (generated tokens: for round-robin the pattern decides it; busy seconds). The
"alternating" pattern sends short and long requests in turn, as two clients would (round-robin then gives every long
request to the same replica); "iid" draws each request's length at random (25% long).

The arrival rate is set from the capacity measured just before, with the load's own mix of lengths (a burst that
fills every slot of every replica: generated tokens per second), so that the load asks for `utilization` of it: on a
shared 2-core laptop the capacity changes from minute to minute, and a fixed rate would be an overload one minute and
a trickle the next. `rate` overrides it. What is reported as the utilization is measured, not the target: the tokens
the load asks for per second of its arrivals (its Poisson draw), over the capacity.

On one machine the replicas share its cores, unlike replicas on GPUs of their own: a replica working alone steps
faster than two at once, which favours round-robin's lopsided split, and the latencies can come out either way.
The work per replica does not depend on the machine; balancer.replay_in_steps compares the routers exactly.
"""
import statistics
import time

from ..serving.balancer import BALANCERS, MIX, poisson_load, run_load


def measure_capacity(cluster, mix, slots: int, bursts: int = 2) -> float:
    """Tokens per second the cluster generates with every slot busy, for requests of the lengths in `mix` (taken in
    turn, prompts as in the load): 4 requests per slot at once, routed by outstanding tokens; the best of `bursts`
    bursts, since other processes on the machine can only slow a burst down."""
    burst = poisson_load(4 * slots * cluster.replicas, 1e9, mix, seed=99, alternate=True)
    best = 0.0
    for _ in range(bursts):
        cluster.balancer = BALANCERS["least-tokens"]()
        start = time.time()
        futures = [cluster.submit(r["input_ids"], r["max_new_tokens"]) for r in burst]
        tokens = sum(len(f.result(timeout=120).output) for f in futures)
        best = max(best, tokens / (time.time() - start))
    return best


PATTERNS = {"iid": MIX, "alternating": ((4, 0.5), (40, 0.5))}


def bench_serve(replicas: int = 2, requests: int = 160, utilization: float = 0.9, slots: int = 4,
                pattern: str = "alternating", repeats: int = 1, model: str = "tiny-llama", seed: int = 0,
                rate: float | None = None) -> dict:
    from ..serving.cluster import Cluster
    if pattern not in PATTERNS:
        raise ValueError(f"unknown load pattern {pattern!r}; choose one of {sorted(PATTERNS)}")
    if repeats < 1 or not utilization > 0:
        raise ValueError(f"need repeats >= 1 and a positive utilization, got {repeats} and {utilization}")
    mix = PATTERNS[pattern]
    mean_tokens = sum(n * p for n, p in mix) / sum(p for _, p in mix)
    runs = {name: [] for name in BALANCERS}
    with Cluster(model, tp=1, replicas=replicas, slots=slots) as cluster:
        run_load(cluster, poisson_load(8, 50.0, seed=seed + 1), "round-robin")  # warm-up: first steps are slow
        capacity = measure_capacity(cluster, mix, slots)
        rate = rate or utilization * capacity / mean_tokens
        load = poisson_load(requests, rate, mix, seed=seed, alternate=pattern == "alternating")
        for k in range(repeats):
            for name in (list(BALANCERS) if k % 2 == 0 else list(BALANCERS)[::-1]):
                runs[name].append(run_load(cluster, load, name))
    offered = sum(r["max_new_tokens"] for r in load)
    span = load[-1]["at"] - load[0]["at"]
    med = lambda name, key: statistics.median(r[key] for r in runs[name])  # noqa: E731
    return {"replicas": replicas, "requests": requests, "rate": rate, "capacity": capacity,
            "target_utilization": utilization, "utilization": offered / span / capacity if span > 0 else float("inf"),
            "slots": slots, "pattern": pattern, "repeats": repeats, "model": model, "offered_tokens": offered,
            "balancers": {name: {"throughput": med(name, "throughput"), "p50": med(name, "p50"),
                                 "p99": med(name, "p99"), **{key: runs[name][-1][key] for key in (
                                     "per_replica", "tokens_per_replica", "busy_seconds", "latencies")}}
                          for name in runs}}


def format_serve(result: dict) -> str:
    lines = [f"{result['replicas']} replicas of {result['model']}, {result['slots']} KV-cache slots each; "
             f"{result['requests']} requests ({result['pattern']} lengths, {result['offered_tokens']} tokens), "
             f"Poisson arrivals at {result['rate']:.0f}/s; capacity measured {result['capacity']:,.0f} tokens/s; "
             f"the load asks for {result['utilization']:.0%} of it (target {result['target_utilization']:.0%}); "
             f"medians of {result['repeats']} round(s)",
             f"{'balancer':<14}{'tokens/s':>9}{'p50 ms':>8}{'p99 ms':>8}  {'tokens per replica':<20}"
             f"{'busy s per replica':<20}requests per replica"]
    for name, b in result["balancers"].items():
        busy = "[" + ", ".join(f"{s:.2f}" for s in b["busy_seconds"]) + "]"
        lines.append(f"{name:<14}{b['throughput']:>9,.0f}{1e3 * b['p50']:>8.1f}{1e3 * b['p99']:>8.1f}  "
                     f"{str(b['tokens_per_replica']):<20}{busy:<20}{b['per_replica']}")
    return "\n".join(lines)
