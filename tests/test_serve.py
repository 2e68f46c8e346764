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

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from minidist.balancer import RoundRobin, make_balancer, percentile, poisson_load, run_load
from minidist.cluster import Cluster, build_model, check_tp
from minidist.grading import implementation
from minidist.inference import generate

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


def test_replicas_under_a_synthetic_load():
    load = poisson_load(16, rate=40.0, seed=0)
    with Cluster("tiny-gpt", tp=1, replicas=2, slots=4) as cluster:
        runs = {b: run_load(cluster, load, b) for b in ("round-robin", "least-tokens")}
        assert cluster.outstanding == [0, 0] and cluster.queue_depth() == [0, 0]
    for run in runs.values():
        assert run["requests"] == 16 and run["tokens"] == sum(r["max_new_tokens"] for r in load)
        assert 0 < run["p50"] <= run["p99"] and run["throughput"] > 0
    assert runs["round-robin"]["per_replica"] == [8, 8]


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


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "minidist", "serve", "--model", "tiny-llama", "--tp", "2",
                             "--replicas", "2", "--port", str(port), "--slots", "4"], cwd=ROOT,
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
    sampled = [call(port, "/generate", {"prompt": "To be, or not to be", "max_new_tokens": 6, "temperature": 0.9,
                                        "seed": s})[1]["output_ids"] for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2] and len(sampled[0]) == 6  # deterministic per seed


def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(server):
    port = server[0]
    rejected = metrics(port)[("minidist_rejected_requests_total", None)]
    cases = [({"prompt": "", "max_new_tokens": 4}, 400, "empty"),
             ({"input_ids": [], "max_new_tokens": 4}, 400, "empty"),
             ({"input_ids": [1, 2], "max_new_tokens": -3}, 400, "-3"),
             ({"input_ids": [1] * 120, "max_new_tokens": 9}, 400, "129 is longer than the model's context of 128"),
             ({"input_ids": [1, 600], "max_new_tokens": 4}, 400, "[0, 512)"),
             ({"input_ids": [1, 2], "max_new_tokens": 4, "temperature": -1}, 400, "temperature"),
             ({"prompt": "x", "input_ids": [1], "max_new_tokens": 4}, 400, "exactly one"),
             ({"max_new_tokens": 4}, 400, "exactly one"),
             ({"input_ids": [1, 2], "max_new_tokens": "four"}, 422, "max_new_tokens")]
    for body, status, message in cases:
        got, answer = call(port, "/generate", body)
        assert got == status and message in json.dumps(answer), (body, got, answer)
    assert metrics(port)[("minidist_rejected_requests_total", None)] == rejected + 8  # the 4xx the server decided
    status, body = call(port, "/generate", {"input_ids": [1, 2, 3], "max_new_tokens": 3})
    assert status == 200 and len(body["output_ids"]) == 3


def test_concurrent_requests_are_batched_routed_and_counted(server):
    port = server[0]
    before = metrics(port)
    answers = [None] * 8
    lengths = [30, 3, 3, 30, 3, 3, 3, 3]

    def ask(i):
        answers[i] = call(port, "/generate", {"input_ids": [i + 1, 7, 9], "max_new_tokens": lengths[i]})
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(status == 200 and len(body["output_ids"]) == n for (status, body), n in zip(answers, lengths))
    after = metrics(port)
    delta = {key: after[key] - before.get(key, 0) for key in after}
    served = [delta[("minidist_requests_total", k)] for k in "01"]
    assert sum(served) == 8 and min(served) > 0                       # both replicas worked
    assert [delta[("minidist_generated_tokens_total", k)] for k in "01"] == [
        sum(n for (_, body), n in zip(answers, lengths) if body["replica"] == k) for k in (0, 1)]
    assert sum(delta[("minidist_request_latency_seconds_count", k)] for k in "01") == 8
    assert [after[("minidist_queue_depth", k)] for k in "01"] == [0, 0]  # nothing left in flight


def test_the_server_shuts_down_cleanly_and_leaves_no_rank(server):
    _, proc, health = server
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "minidist serve: stopped" in out
    time.sleep(0.5)
    left = [pid for pid in health["rank_pids"] if os.path.exists(f"/proc/{pid}")
            and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
    assert left == [], f"ranks still running: {left}"
