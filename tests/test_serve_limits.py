"""The HTTP server under hostile requests: oversized, malformed and slow requests and more requests than the replicas
may hold, against a live server on the loopback interface while /health keeps answering within a second
(serve_limits.py, cluster.py's bounds); a cancelled request stops generating; an error on one tensor-parallel rank
fails the replica, not the request; latency counts from arrival. Every loop here is bounded in count and in time."""
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future

import pytest
import torch.distributed as dist
from prometheus_client.parser import text_string_to_metric_families

import minidist.serving.batching as batching
from minidist.serving.cluster import Cluster, ClusterBusy, ClusterDown, Result
from tests.test_serve import call, start_server

LIMIT = 16384  # --max-body-bytes of the server under load


def raw(port: int, head: bytes, body=b"", pause: float = 0.0, timeout: float = 10.0):
    """(status, seconds until the status line, response text) of one request written by hand: `head` (request line
    and headers), then each piece of `body` (bytes, or a list of pieces sent `pause` seconds apart)."""
    start = time.time()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        for piece in body if isinstance(body, list) else [body]:
            try:
                s.sendall(piece)
            except OSError:  # the server answered and closed: read what it said
                break
            time.sleep(pause)
        data = b""
        try:
            while not _complete(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, time.time() - start, data.decode(errors="replace")


def _complete(data: bytes) -> bool:
    """Whether `data` holds a whole response: its headers and Content-Length bytes of body."""
    head, sep, body = data.partition(b"\r\n\r\n")
    length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    return bool(sep) and len(body) >= (length[0] if length else 1 << 30)


def post_head(length: int | None, content_type: bytes = b"application/json") -> bytes:
    size = b"Transfer-Encoding: chunked\r\n" if length is None else b"Content-Length: %d\r\n" % length
    return b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: " + content_type + b"\r\n" + size + b"\r\n"


def generate(port: int, body: dict, timeout: float = 60):
    """(status, headers, JSON) of POST /generate."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def samples(port: int) -> dict:
    """{(name, replica label or None, le or None): value} from GET /metrics."""
    status, text = call(port, "/metrics")
    return {(s.name, s.labels.get("replica"), s.labels.get("le")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_hostile_requests_are_refused_fast_while_health_answers():
    port, proc, _ = start_server("--model", "tiny-gpt", "--slots", "1", "--max-waiting", "1", "--max-body-bytes",
                                 str(LIMIT), "--body-timeout", "1", "--request-timeout", "30")
    health, results, stop = [], {}, threading.Event()

    def poll():  # /health every 50 ms until the attacks are over (at most 60 s)
        deadline = time.time() + 60
        while not stop.is_set() and time.time() < deadline:
            start = time.time()
            try:
                status = call(port, "/health")[0]
            except OSError as e:
                status = repr(e)
            health.append((time.time() - start, status))
            time.sleep(0.05)

    def attack(name, fn):
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001  (reported by the assertions below, by name)
            results[name] = e

    big = b'{"prompt": "' + b"x" * (8 << 20) + b'"}'  # 8 MB: the prompt that stalled the server for 13.7 s
    flood = [{"input_ids": [1 + i, 2, 3], "max_new_tokens": 60} for i in range(16)]  # tiny-gpt's context: 64
    attacks = {
        "declared 8 MB": lambda: raw(port, post_head(len(big))),
        "sent 8 MB": lambda: raw(port, post_head(len(big)), [big[i:i + 65536] for i in range(0, len(big), 65536)]),
        "expect 8 MB": lambda: raw(port, post_head(len(big))[:-2] + b"Expect: 100-continue\r\n\r\n"),
        "chunked 8 MB": lambda: raw(port, post_head(None), [b"%x\r\n" % 4096 + b"x" * 4096 + b"\r\n"] * 8),
        "long prompt": lambda: generate(port, {"prompt": "to be or not " * 1000, "max_new_tokens": 4}),
        "bad surrogate": lambda: generate(port, {"prompt": "\ud800 x", "max_new_tokens": 4}),
        "not JSON": lambda: raw(port, post_head(9), b"{not json"),
        "not UTF-8": lambda: raw(port, post_head(4), b"\xff\xfe\xfd\xfc"),
        "nested": lambda: raw(port, post_head(12000), b"[" * 6000 + b"]" * 6000),
        "bad length": lambda: raw(port, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 12x\r\n\r\n"),
        "trickle": lambda: raw(port, post_head(200), [b"{"] * 20, pause=0.2),
        "silent": lambda: raw(port, post_head(50)),
        **{f"flood {i}": (lambda body=body: generate(port, body)) for i, body in enumerate(flood)},
    }
    half_headers = socket.create_connection(("127.0.0.1", port))
    half_headers.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")  # and nothing more
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        threads = [threading.Thread(target=attack, args=item) for item in attacks.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        time.sleep(0.3)
        status, _, after = generate(port, {"input_ids": [5, 6, 7], "max_new_tokens": 4})  # still serving
    finally:
        stop.set()
        poller.join()
        half_headers.close()
        metrics = samples(port)
        proc.kill()
        proc.wait()
    assert status == 200 and len(after["output_ids"]) == 4, after
    assert all(s == 200 for _, s in health) and len(health) >= 10, health
    slowest = max(t for t, _ in health)
    assert slowest < 1.0, f"/health took {slowest:.3f} s"
    print(f"\n/health: {len(health)} calls during the attacks, slowest {slowest * 1000:.0f} ms")

    s, seconds, text = results["declared 8 MB"]
    assert s == 413 and f"{len(big)} bytes is over the limit of 16384 bytes" in text and seconds < 1.0, (s, text)
    print(f"declared 8 MB body: 413 after {seconds * 1000:.0f} ms")
    for name in ("sent 8 MB", "expect 8 MB"):  # a client that sends the body anyway reads the 413 all the same
        assert results[name][0] == 413 and results[name][1] < 1.0 and "100 Continue" not in results[name][2], \
            results[name]
    assert results["chunked 8 MB"][0] == 413 and "over the limit of 16384 bytes" in results["chunked 8 MB"][2]
    s, _, answer = results["long prompt"]
    assert s == 400 and "the prompt has 13000 bytes: at most" in answer["detail"], answer
    assert results["bad surrogate"][0] == 400 and "cannot be tokenized" in results["bad surrogate"][2]["detail"]
    for name in ("not JSON", "not UTF-8", "nested"):
        assert results[name][0] in (400, 422), (name, results[name])
    assert results["bad length"][0] == 400, results["bad length"]
    for name in ("trickle", "silent"):
        s, seconds, text = results[name]
        assert s == 408 and "did not arrive within 1 s" in text and 0.9 < seconds < 5, (name, s, seconds, text)
    flooded = [results[f"flood {i}"] for i in range(len(flood))]
    assert all(not isinstance(r, Exception) and r[0] in (200, 429) for r in flooded), flooded
    busy = [r for r in flooded if r[0] == 429]
    assert busy and all("try again later" in r[2]["detail"] and r[1]["retry-after"] == "1" for r in busy)
    assert 2 <= sum(r[0] == 200 for r in flooded) and all(len(r[2]["output_ids"]) == 60 for r in flooded
                                                          if r[0] == 200)
    assert metrics[("minidist_busy_requests_total", None, None)] == len(busy)
    # 413 x 4, 408 x 2, the long prompt, the surrogate, the three malformed bodies; the bad Content-Length is
    # answered by uvicorn's HTTP parser before the application sees it
    assert metrics[("minidist_rejected_requests_total", None, None)] == 11
    assert metrics[("minidist_queue_depth", "0", None)] == 0


def test_a_cancelled_request_stops_generating_and_a_full_cluster_refuses(monkeypatch):
    real = batching.sample_next

    def slow(logits, temperatures, generators):  # 10 ms a token (patched before the fork): requests overlap
        time.sleep(0.01)
        return real(logits, temperatures, generators)
    monkeypatch.setattr(batching, "sample_next", slow)
    with Cluster("tiny-gpt", replicas=2, slots=1, max_waiting=0, balancer="round-robin") as cluster:
        cancelled = cluster.submit([1, 2, 3], 60)    # replica 0 (tiny-gpt's context: 64)
        assert cancelled.cancel()                    # what asyncio.wait_for does on a timeout
        deadline = time.time() + 60
        while cluster.queue_depth() != [0, 0] and time.time() < deadline:
            time.sleep(0.02)
        assert cluster.tokens[0] < 60 and cluster.held == [0, 0] and cluster.outstanding == [0, 0]
        late = cluster.submit([1, 2], 2, arrived_at=time.time() - 5).result(timeout=60)  # arrived 5 s ago
        assert late.finished_at - late.submitted_at >= 5                # its latency counts from its arrival
        short = cluster.submit([1, 2, 3], 10)       # replica 0 (round robin), then replica 1 runs a long one
        long = cluster.submit([4, 5, 6], 60)
        with pytest.raises(ClusterBusy, match="every replica holds 1 requests"):
            cluster.submit([7, 8], 3)
        assert short.result(timeout=60).replica == 0
        rerouted = cluster.submit([7, 8], 3)        # round robin picks replica 1, full: the one with room
        assert rerouted.result(timeout=60).replica == 0 and not long.done()
        assert len(long.result(timeout=60).output) == 60


def test_an_error_on_one_tensor_parallel_rank_fails_the_replica_not_the_request(monkeypatch):
    """Its peer is inside the same step's collectives: a request error would leave the two ranks apart."""
    real = batching.sample_next

    def flaky(logits, temperatures, generators):
        if 0.5 in temperatures and dist.get_rank() == 1:
            raise RuntimeError("rank 1 alone fails")
        return real(logits, temperatures, generators)
    monkeypatch.setattr(batching, "sample_next", flaky)
    stops = []
    with Cluster("tiny-gpt", tp=2, replicas=1, slots=2, on_stop=stops.append) as cluster:
        assert len(cluster.submit([1, 2], 3).result(timeout=60).output) == 3
        with pytest.raises(ClusterDown, match="rank 1 alone fails"):
            cluster.submit([1, 2], 3, temperature=0.5).result(timeout=60)
        cluster._reader.join(30)
        assert not cluster.running and len(stops) == 1 and "rank 1 alone fails" in str(stops[0])


class SlowTokenizer:
    """Stands in for the tokenizer: 0.3 s a prompt, the time a request spends before it reaches a replica."""

    def encode(self, text):
        time.sleep(0.3)
        return type("Encoding", (), {"ids": [1, 2]})()

    def decode(self, ids):
        return ""

    def get_vocab(self):
        return {"a": 0, "bc": 1}


class InstantCluster:
    """Answers at once, and reports to its listener as cluster.Cluster does (from the time it is given)."""
    name, replicas, tp, context, pids, error, running = "instant", 1, 1, 128, [], None, True

    def __init__(self, listener):
        self.listener = listener

    def submit(self, ids, max_new_tokens, temperature, seed, arrived_at=None):
        now = time.time()
        future, result = Future(), Result(0, [3, 4], 0, len(ids), arrived_at or now, now, now)
        self.listener.submitted(0, len(ids))
        self.listener.finished(result)
        future.set_result(result)
        return future


def test_latency_counts_from_arrival_and_its_buckets_reach_past_a_minute():
    from fastapi.testclient import TestClient
    from minidist.serving.app import Metrics, create_app
    metrics = Metrics(1)
    client = TestClient(create_app(InstantCluster(metrics), metrics, SlowTokenizer()))
    answer = client.post("/generate", json={"prompt": "ab", "max_new_tokens": 2})
    assert answer.status_code == 200 and answer.json()["latency_s"] >= 0.3, answer.text
    histogram = {s.labels["le"]: s.value for family in metrics.registry.collect() for s in family.samples
                 if s.name == "minidist_request_latency_seconds_bucket"}
    assert histogram["0.25"] == 0 and histogram["0.5"] == 1  # the tokenizer's 0.3 s is the request's too
    assert max(float(le) for le in histogram if le != "+Inf") >= 60
    too_long = client.post("/generate", json={"prompt": "abc" * 100, "max_new_tokens": 2})  # 300 > 128 x 2 bytes
    assert too_long.status_code == 400 and "at most 256 can fit" in too_long.json()["detail"]
