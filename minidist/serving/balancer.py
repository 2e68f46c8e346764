"""Routing requests across data-parallel replicas, and a synthetic load to compare routers with.

Every replica holds the whole model (tensor-parallel inside, perhaps); the router picks one for each request:

    round-robin               replica k, k+1, k+2, ... in turn: blind to how much work each request is
    least-outstanding-tokens  the replica with the fewest tokens still to process (prompt + tokens to generate of the
                              requests it holds), ties to the lowest index

Round-robin balances the *number* of requests. With mixed lengths a replica that drew a few long requests is busy
for hundreds of steps while its short requests queue behind them for KV-cache slots and share its slower steps, and
the other replica idles; least-outstanding-tokens balances the *work*. (Least outstanding requests, what many HTTP
load balancers do, sits in between.) The cost of a request is known up front from its prompt and max_new_tokens;
it is added to its replica when routed, and taken off as the replica reports the tokens it generates at each step
(the prompt when the request finishes).

`poisson_load` makes the synthetic load: arrivals with exponential gaps (a Poisson process of `rate` requests per
unit of time) and lengths mixed from a small table. Two ways to replay it:

    replay_in_steps  real continuous-batching Engines (batching.py) in this process, one per replica, on a clock that
                     counts engine steps: the load's times are steps, every replica runs one step per tick. Nothing
                     depends on the machine's speed or its other jobs: the same load gives the same numbers, exactly.
                     A step costs one tick whatever its batch (decoding is memory-bound: nearly so on a GPU).
    run_load         a real cluster.Cluster on ranks, in seconds: each request's latency (arrival to last token), the
                     throughput and the latency percentiles, with the noise of a shared machine.

Both report the work each replica did (generated tokens, busy steps or seconds): deterministic for round-robin (the
pattern decides it), the quantity least-outstanding-tokens evens out. Percentiles are by the nearest-rank method: the
p-th percentile of n latencies is the ceil(p n / 100)-th smallest, an observed value (p99 of 100 is the 99th
smallest: the second-worst request).
"""
import math
import time

import torch

from .batching import Request


def least_outstanding_tokens(outstanding: list[int], healthy: list[bool] | None = None) -> int:
    """The index of the replica with the fewest outstanding tokens among the healthy ones (all, when `healthy` is
    None); ties go to the lowest index. Graded: the choice, the ties, the replicas marked unhealthy skipped, and a
    ValueError when no replica is healthy (or there is none at all)."""
    # <exercise least_outstanding_tokens points=2>
    # hint: which replicas may be chosen at all? Among them, think about what makes the lowest index win a tie.
    best = None
    for i, tokens in enumerate(outstanding):
        if (healthy is None or healthy[i]) and (best is None or tokens < outstanding[best]):
            best = i
    if best is None:
        raise ValueError(f"no healthy replica to route to ({len(outstanding)} replicas)")
    return best
    # </exercise>


class RoundRobin:
    name = "round-robin"

    def __init__(self):
        self.next = 0

    def pick(self, outstanding: list[int]) -> int:
        choice = self.next % len(outstanding)
        self.next = choice + 1
        return choice


class LeastOutstandingTokens:
    name = "least-tokens"

    def pick(self, outstanding: list[int]) -> int:
        return least_outstanding_tokens(outstanding)


BALANCERS = {"round-robin": RoundRobin, "least-tokens": LeastOutstandingTokens}


def make_balancer(name: str):
    if name not in BALANCERS:
        raise ValueError(f"unknown balancer {name!r}; choose one of {sorted(BALANCERS)}")
    return BALANCERS[name]()


MIX = ((4, 0.75), (40, 0.25))  # (max_new_tokens, probability): many short answers, a few long ones


def poisson_load(n: int, rate: float, mix=MIX, prompt_tokens: tuple[int, int] = (4, 12), vocab: int = 512,
                 seed: int = 0, alternate: bool = False) -> list[dict]:
    """n requests: {"at": seconds after the start, "input_ids", "max_new_tokens"}, arrivals a Poisson process of
    `rate` per second, lengths drawn from `mix` (alternate: its lengths in turn, whatever their probabilities: two
    clients taking turns, the case that defeats round-robin), prompts of uniformly random length in
    `prompt_tokens`."""
    if n < 1 or not rate > 0:
        raise ValueError(f"need n >= 1 requests and a positive rate, got n={n}, rate={rate}")
    g = torch.Generator().manual_seed(seed)
    lengths, weights = zip(*mix)
    picks = torch.multinomial(torch.tensor(weights, dtype=torch.float), n, replacement=True, generator=g)
    if alternate:
        picks = torch.arange(n) % len(mix)
    gaps = -torch.log(1 - torch.rand(n, generator=g, dtype=torch.float64)) / rate  # exponential, mean 1/rate
    at = torch.cumsum(gaps, 0) - gaps[0]
    sizes = torch.randint(prompt_tokens[0], prompt_tokens[1] + 1, (n,), generator=g)
    return [{"at": float(at[i]), "max_new_tokens": lengths[picks[i]],
             "input_ids": torch.randint(vocab, (int(sizes[i]),), generator=g).tolist()} for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by the nearest-rank method: an observed value, never an interpolation."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def run_load(cluster, load: list[dict], balancer: str) -> dict:
    """Replay `load` (its times in seconds) against `cluster` (a cluster.Cluster) routed by `balancer`: latencies,
    throughput (generated tokens from the first arrival to the last answer), and per replica the requests, the
    generated tokens and the seconds its engine spent in steps."""
    cluster.balancer = make_balancer(balancer)
    with cluster.lock:
        tokens0, busy0 = list(cluster.tokens), list(cluster.busy_seconds)
    start, futures = time.time(), []
    for req in load:
        time.sleep(max(0.0, start + req["at"] - time.time()))
        futures.append((time.time(), cluster.submit(req["input_ids"], req["max_new_tokens"])))
    results = [(submitted, f.result(timeout=120)) for submitted, f in futures]
    latencies = [r.finished_at - submitted for submitted, r in results]
    end = max(r.finished_at for _, r in results)
    tokens = sum(len(r.output) for _, r in results)
    with cluster.lock:  # a replica reports a step before the requests it finished: the counts are complete
        work = [t - t0 for t, t0 in zip(cluster.tokens, tokens0)]
        busy = [b - b0 for b, b0 in zip(cluster.busy_seconds, busy0)]
    return {"balancer": balancer, "requests": len(results), "tokens": tokens, "seconds": end - start,
            "throughput": tokens / (end - start), "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "latencies": latencies, "per_replica": [sum(1 for _, r in results if r.replica == k)
                                                    for k in range(cluster.replicas)],
            "tokens_per_replica": work, "busy_seconds": busy}


def replay_in_steps(engines: list, load: list[dict], balancer: str) -> dict:
    """Replay `load` (its times in engine steps) on `engines` (idle batching.Engines, one per replica): at tick t,
    the requests with at <= t are routed by `balancer` (outstanding tokens kept as cluster.py keeps them), then every
    replica with work runs one step. Latency: ticks from arrival to the end of the step that finished the request."""
    router, outstanding = make_balancer(balancer), [0] * len(engines)
    tokens, busy, per_replica = [0] * len(engines), [0] * len(engines), [0] * len(engines)
    arrived, latency, t, i = {}, {}, 0, 0
    while i < len(load) or not all(e.idle() for e in engines):
        while i < len(load) and load[i]["at"] <= t:
            req, k = load[i], router.pick(outstanding)
            outstanding[k] += len(req["input_ids"]) + req["max_new_tokens"]
            engines[k].add(Request(i, list(req["input_ids"]), req["max_new_tokens"]))
            arrived[i], per_replica[k], i = t, per_replica[k] + 1, i + 1
        for k, engine in enumerate(engines):
            if engine.idle():
                continue
            for r in engine.step():
                outstanding[k] -= len(r.prompt)           # its tokens were taken off step by step
                latency[r.rid] = t + 1 - arrived[r.rid]
            busy[k], tokens[k] = busy[k] + 1, tokens[k] + engine.tokens_last_step
            outstanding[k] -= engine.tokens_last_step
        t += 1
    latencies = [latency[j] for j in range(len(load))]
    return {"balancer": balancer, "requests": len(load), "ticks": t, "tokens": sum(tokens),
            "p50": percentile(latencies, 50), "p99": percentile(latencies, 99), "latencies": latencies,
            "per_replica": per_replica, "tokens_per_replica": tokens, "busy_steps": busy}
