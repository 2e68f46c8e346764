"""Serving: the router (an exercise), the synthetic load, replicas in process, and the real HTTP endpoint started as a
subprocess on a free loopback port, with real requests, a real /metrics, and a clean shutdown."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import minidist.serving.batching as batching
from minidist.grading import implementation
from minidist.serving.balancer import RoundRobin, make_balancer, percentile, poisson_load, replay_in_steps, run_load
from minidist.serving.batching import Engine
from minidist.serving.cluster import Cluster, ClusterDown, RequestError
from minidist.serving.inference import generate
from minidist.serving.replica import build_model, check_tp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The router.

@pytest.mark.exercise("least_outstanding_tokens")
def test_least_outstanding_tokens_by_hand():
    pick = implementation("least_outstanding_tokens")
    assert pick([30, 12, 40]) == 1
    assert pick([7, 3, 3, 9]) == 1                                  # a tie: the lowest index
    assert pick([0]) == 0
    assert pick([5, 1, 2], healthy=[True, False, True]) == 2        # the unhealthy replica is skipped
    assert pick([5, 1, 5], healthy=[True, False, True]) == 0


@pytest.mark.exercise("least_outstanding_tokens")
def test_least_outstanding_tokens_refuses_when_nobody_can_serve():
    pick = implementation("least_outstanding_tokens")
    with pytest.raises(ValueError):
        pick([1, 2], healthy=[False, False])
    with pytest.raises(ValueError):
        pick([])


def test_round_robin_and_names():
    rr = RoundRobin()
    assert [rr.pick([9, 0, 0]) for _ in range(5)] == [0, 1, 2, 0, 1]  # whatever each replica holds
    assert make_balancer("least-tokens").pick([4, 2]) == 1
    with pytest.raises(ValueError, match="least-tokens"):
        make_balancer("random")


def test_poisson_load_has_the_rate_and_the_mix_it_is_asked_for():
    load = poisson_load(4000, rate=50.0, seed=3)
    assert load == poisson_load(4000, rate=50.0, seed=3) and load[0]["at"] == 0.0
    gaps = [b["at"] - a["at"] for a, b in zip(load, load[1:])]
    mean = sum(gaps) / len(gaps)                                   # exponential: mean 1/rate, std 1/rate
    assert abs(mean - 1 / 50) < 5 * (1 / 50) / len(gaps) ** 0.5
    long = sum(r["max_new_tokens"] == 40 for r in load) / len(load)  # 25% long requests
    assert abs(long - 0.25) < 5 * (0.25 * 0.75 / len(load)) ** 0.5
    assert all(4 <= len(r["input_ids"]) <= 12 for r in load)
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0 and percentile([1.0, 2.0], 99) == 2.0


def test_tensor_parallel_size_is_checked_before_any_rank_starts():
    check_tp("tiny-llama", 2)
    with pytest.raises(ValueError, match=r"\b3\b"):
        check_tp("tiny-llama", 3)                                  # 4 heads, 2 key-value heads


ALTERNATING = ((4, 0.5), (40, 0.5))  # short and long requests in turn: round-robin gives every long one to replica 1


def share_of_busiest(tokens: list[int]) -> float:
    return max(tokens) / sum(tokens)


@pytest.fixture
def one_thread():
    """One intra-op thread, as a rank has: two threads on a shared 2-core machine make the tiny model 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_balancers_in_engine_steps_compared_on_the_work_each_replica_did(one_thread):
    """Real engines on a clock of engine steps: no wall time, so every number is exact and the same on any machine."""
    model, _, vocab = build_model("tiny-gpt")
    load = poisson_load(24, rate=0.3, mix=ALTERNATING, seed=0, alternate=True)  # ~80% of 2 x 4 tokens per step
    runs = {b: replay_in_steps([Engine(model, 4, vocab) for _ in range(2)], load, b)
            for b in ("round-robin", "least-tokens")}
    rr, lot = runs["round-robin"], runs["least-tokens"]
    assert rr["tokens_per_replica"] == [12 * 4, 12 * 40] and rr["per_replica"] == [12, 12]
    assert lot["tokens"] == rr["tokens"] == 12 * 44
    assert share_of_busiest(lot["tokens_per_replica"]) < 0.6 < share_of_busiest(rr["tokens_per_replica"])
    assert lot["ticks"] < rr["ticks"] and lot["p99"] < rr["p99"]  # the overloaded replica finishes last
    assert rr == replay_in_steps([Engine(model, 4, vocab) for _ in range(2)], load, "round-robin")  # deterministic


def test_replicas_under_a_synthetic_load():
    """The same comparison on ranks, in seconds: requests arriving faster than one replica can serve the long ones,
    so that least-outstanding-tokens sees work left on the replicas when it routes."""
    load = poisson_load(16, rate=200.0, mix=ALTERNATING, seed=0, alternate=True)
    with Cluster("tiny-gpt", tp=1, replicas=2, slots=4) as cluster:
        runs = {b: run_load(cluster, load, b) for b in ("round-robin", "least-tokens")}
        assert cluster.outstanding == [0, 0] and cluster.queue_depth() == [0, 0]
    for run in runs.values():
        assert run["requests"] == 16 and run["tokens"] == sum(r["max_new_tokens"] for r in load) == 8 * 44
        assert 0 < run["p50"] <= run["p99"] and run["throughput"] > 0 and min(run["busy_seconds"]) > 0
        assert sum(run["tokens_per_replica"]) == run["tokens"]          # the replicas' step reports add up
    assert runs["round-robin"]["tokens_per_replica"] == [8 * 4, 8 * 40]
    assert share_of_busiest(runs["least-tokens"]["tokens_per_replica"]) < 0.75 < share_of_busiest(
        runs["round-robin"]["tokens_per_replica"])


def test_bench_serve_reports_what_it_measured():
    from minidist.bench import bench_serve, format_serve
    result = bench_serve(replicas=2, requests=12, slots=2, pattern="alternating", model="tiny-gpt", rate=150.0)
    load = poisson_load(12, 150.0, ALTERNATING, seed=0, alternate=True)      # the load it replayed, regenerated
    offered_rate = sum(r["max_new_tokens"] for r in load) / load[-1]["at"]
    assert result["capacity"] > 0 and abs(result["utilization"] * result["capacity"] - offered_rate) < 1e-6
    rr, lot = result["balancers"]["round-robin"], result["balancers"]["least-tokens"]
    assert rr["tokens_per_replica"] == [6 * 4, 6 * 40] and sum(lot["tokens_per_replica"]) == 6 * 44
    assert all(min(b["busy_seconds"]) > 0 and 0 < b["p50"] <= b["p99"] for b in (rr, lot))
    text = format_serve(result)
    assert "[24, 240]" in text and f"{result['utilization']:.0%} of it (target 90%)" in text


def test_a_failing_request_a_cancelled_one_and_a_dead_rank(monkeypatch):
    real = batching.sample_next

    def flaky(logits, temperatures, generators):  # patched before the fork: the rank runs it
        if 0.5 in temperatures:
            raise RuntimeError("boom")
        return real(logits, temperatures, generators)
    monkeypatch.setattr(batching, "sample_next", flaky)
    stops = []
    with Cluster("tiny-gpt", tp=1, replicas=1, slots=2, on_stop=stops.append) as cluster:
        with pytest.raises(RequestError, match="boom"):
            cluster.submit([1, 2], 3, temperature=0.5).result(timeout=60)
        assert cluster.submit([1, 2], 3).result(timeout=60).output == generate(
            build_model("tiny-gpt")[0], torch.tensor([[1, 2]]), 3)[0].tolist()   # the replica goes on
        for bad in (dict(temperature=1e-300), dict(seed=2 ** 64), dict(seed=-1)):
            with pytest.raises(ValueError):
                cluster.submit([1, 2], 3, **bad)
        cancelled = cluster.submit([1, 2, 3], 40)
        assert cancelled.cancel()                    # what asyncio.wrap_future does when its task is cancelled
        assert len(cluster.submit([4, 5], 3).result(timeout=60).output) == 3
        deadline = time.time() + 60
        while cluster.queue_depth() != [0] and time.time() < deadline:  # the cancelled one runs to its end
            time.sleep(0.05)
        assert cluster._reader.is_alive() and cluster.outstanding == [0] and cluster.queue_depth() == [0]
        waiting = cluster.submit([1, 2, 3], 60)
        os.kill(cluster.pids[0], signal.SIGKILL)
        with pytest.raises(ClusterDown):
            waiting.result(timeout=60)
        cluster._reader.join(30)
        assert not cluster.running and len(stops) == 1 and stops[0] is not None
        with pytest.raises(ClusterDown):
            cluster.submit([1, 2], 3)


# The HTTP endpoint, as a user starts it.

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, path: str, body=None):
    """(status, parsed JSON or text) of one real HTTP request to the server on the loopback interface."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def metrics(port: int) -> dict:
    """{(sample name, replica label or None): value} from GET /metrics."""
    status, text = call(port, "/metrics")
    assert status == 200
    return {(s.name, s.labels.get("replica")): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if not s.labels.get("le")}


def start_server(*args: str):
    """(port, process, /health) of `python -m minidist serve ARGS` on a free loopback port, once it answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "minidist", "serve", *args, "--port", str(port)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline, health = time.time() + 120, None
    while time.time() < deadline and proc.poll() is None:
        try:
            health = call(port, "/health")[1]
            break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    if health is None:
        proc.kill()
        pytest.fail(f"the server did not start: {proc.communicate()[1][-3000:]}")
    return port, proc, health


def running(pids: list[int]) -> list[int]:
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}")
            and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]


@pytest.fixture(scope="module")
def server():
    port, proc, health = start_server("--model", "tiny-llama", "--tp", "2", "--replicas", "2", "--slots", "4")
    yield port, proc, health
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_generate_answers_what_one_process_generates(server):
    port, _, health = server
    assert health["replicas"] == 2 and health["tp"] == 2 and len(health["rank_pids"]) == 4
    prompt = [17, 301, 5, 99, 260]
    status, body = call(port, "/generate", {"input_ids": prompt, "max_new_tokens": 8})
    assert status == 200, body
    dense, _, _ = build_model("tiny-llama")
    assert body["output_ids"] == generate(dense, torch.tensor([prompt]), 8)[0].tolist()  # tp = 2 vs one process
    assert isinstance(body["text"], str) and body["prompt_tokens"] == 5
    sampled = [call(port, "/generate", {"input_ids": prompt, "max_new_tokens": 6, "temperature": 0.9,
                                        "seed": s})[1]["output_ids"] for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2] and len(sampled[0]) == 6  # deterministic per seed
    assert sampled[0] == generate(dense, torch.tensor([prompt]), 6, 0.9, seed=1)[0].tolist()  # as one process


def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(server):
    port = server[0]
    rejected = metrics(port)[("minidist_rejected_requests_total", None)]
    cases = [({"prompt": "", "max_new_tokens": 4}, 400, "empty"),
             ({"input_ids": [], "max_new_tokens": 4}, 400, "empty"),
             ({"input_ids": [1, 2], "max_new_tokens": -3}, 400, "-3"),
             ({"input_ids": [1] * 120, "max_new_tokens": 10}, 400, "needs 129 positions"),
             ({"input_ids": [1, 600], "max_new_tokens": 4}, 400, "[0, 512)"),
             ({"input_ids": [1, 2], "max_new_tokens": 4, "temperature": -1}, 400, "temperature"),
             ({"input_ids": [1, 2], "max_new_tokens": 4, "temperature": 1e-300}, 400, "temperature"),
             ({"input_ids": [1, 2], "max_new_tokens": 4, "temperature": 1e400}, 400, "temperature"),
             ({"input_ids": [1, 2], "max_new_tokens": 4, "temperature": 0.5, "seed": 2 ** 64}, 400, "seed"),
             ({"input_ids": [1, 2], "max_new_tokens": 4, "temperature": 0.5, "seed": -1}, 400, "seed"),
             ({"prompt": "x", "input_ids": [1], "max_new_tokens": 4}, 400, "exactly one"),
             ({"max_new_tokens": 4}, 400, "exactly one"),
             ({"input_ids": [1, 2], "max_new_tokens": "four"}, 422, "max_new_tokens"),
             ({"input_ids": [1, 2], "max_new_tokens": 4, "temperature": "0.5"}, 422, "temperature")]
    for body, status, message in cases:
        got, answer = call(port, "/generate", body)
        assert got == status and message in json.dumps(answer), (body, got, answer)
    assert metrics(port)[("minidist_rejected_requests_total", None)] == rejected + len(cases)
    for body in ({"input_ids": [1] * 128, "max_new_tokens": 1}, {"input_ids": [1, 2, 3], "max_new_tokens": 3,
                                                                 "temperature": 1}):  # the context's edge; an int
        status, answer = call(port, "/generate", body)
        assert status == 200 and len(answer["output_ids"]) == body["max_new_tokens"], answer
    assert all(call(port, "/health")[0] == 200 for _ in range(2))


def batch_histogram(port: int) -> dict:
    """{replica: (engine steps observed, steps that gave a token to one sequence only)} from minidist_batch_size."""
    status, text = call(port, "/metrics")
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "minidist_batch_size_count":
                out.setdefault(s.labels["replica"], [0, 0])[0] = s.value
            if s.name == "minidist_batch_size_bucket" and s.labels["le"] == "1.0":
                out.setdefault(s.labels["replica"], [0, 0])[1] = s.value
    return out


def test_concurrent_requests_are_batched_routed_and_counted(server):
    port = server[0]
    before, steps_before = metrics(port), batch_histogram(port)
    answers = [None] * 8
    lengths = [30, 30, 30, 30, 3, 3, 30, 3]

    def ask(i):
        answers[i] = call(port, "/generate", {"input_ids": [i + 1, 7, 9], "max_new_tokens": lengths[i]})
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(status == 200 and len(body["output_ids"]) == n for (status, body), n in zip(answers, lengths))
    after, steps_after = metrics(port), batch_histogram(port)
    delta = {key: after[key] - before.get(key, 0) for key in after}
    served = [delta[("minidist_requests_total", k)] for k in "01"]
    assert sum(served) == 8 and min(served) > 0                       # both replicas worked
    assert [delta[("minidist_generated_tokens_total", k)] for k in "01"] == [
        sum(n for (_, body), n in zip(answers, lengths) if body["replica"] == k) for k in (0, 1)]
    assert sum(delta[("minidist_request_latency_seconds_count", k)] for k in "01") == 8
    assert [after[("minidist_queue_depth", k)] for k in "01"] == [0, 0]  # nothing left in flight
    steps = {k: steps_after[k][0] - steps_before[k][0] for k in "01"}
    single = {k: steps_after[k][1] - steps_before[k][1] for k in "01"}
    assert sum(steps.values()) < sum(lengths)                         # fewer steps than tokens: rows shared steps
    assert any(steps[k] > single[k] for k in "01"), (steps, single)   # some step gave tokens to 2+ sequences


def test_the_server_shuts_down_cleanly_and_leaves_no_rank(server):
    _, proc, health = server
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "minidist serve: stopped" in out
    time.sleep(0.5)
    assert running(health["rank_pids"]) == [], "ranks still running"


def test_the_server_exits_when_its_ranks_die():
    """One launch holds every rank: a rank that dies ends them all, and the server exits (code 1) for its
    supervisor to restart it, instead of answering 500 forever."""
    port, proc, health = start_server("--model", "tiny-gpt", "--replicas", "2", "--slots", "2")
    os.kill(health["rank_pids"][1], signal.SIGKILL)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "the ranks stopped" in err, err[-3000:]
    time.sleep(0.5)
    assert running(health["rank_pids"]) == []


def test_a_busy_port_is_reported_before_any_rank_starts():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "minidist", "serve", "--model", "tiny-gpt", "--port", str(port)],
                             cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                             timeout=120)
    assert out.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in out.stderr, out.stderr[-3000:]
    assert "ranks" not in out.stdout                                     # the banner lists the ranks it started


class FakeCluster:
    """Stands in for cluster.Cluster behind the FastAPI app: submit's future fails, never resolves, or the
    cluster is down."""
    name, replicas, tp, context, pids, error = "fake", 1, 1, 128, [], None

    def __init__(self, behaviour: str):
        self.behaviour, self.running, self.futures = behaviour, behaviour != "down", []

    def submit(self, ids, max_new_tokens, temperature, seed, arrived_at=None):
        if self.behaviour == "down":
            raise ClusterDown("the cluster is not running: a rank died")
        future = Future()
        if self.behaviour == "fails":
            future.set_exception(RequestError("the request failed on replica 0: RuntimeError: boom"))
        self.futures.append(future)
        return future


@pytest.mark.parametrize("behaviour, status, message", [("down", 503, "not running"), ("fails", 500, "boom"),
                                                        ("hangs", 504, "no answer within 0.2 s")])
def test_the_app_answers_failures_with_their_status(behaviour, status, message):
    from fastapi.testclient import TestClient
    from minidist.serving.app import Metrics, create_app
    cluster = FakeCluster(behaviour)
    client = TestClient(create_app(cluster, Metrics(1), tokenizer=None, request_timeout=0.2))
    answer = client.post("/generate", json={"input_ids": [1, 2], "max_new_tokens": 2})
    assert answer.status_code == status and message in answer.json()["detail"], answer.text
    health = client.get("/health")
    assert health.status_code == (503 if behaviour == "down" else 200)
    assert health.json()["status"] == ("down" if behaviour == "down" else "ok")
    if behaviour == "hangs":
        assert cluster.futures[0].cancelled()                   # wait_for cancels it: the cluster's reader skips it
