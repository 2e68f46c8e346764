"""A real HTTP endpoint: `python -m minidist serve --model tiny-llama --tp 2 --replicas 2 --port 8000`.

    POST /generate   {"prompt": "To be", "max_new_tokens": 16, "temperature": 0.8, "seed": 1}   (or "input_ids")
                     -> {"output_ids": [...generated tokens only...], "text": "...", "replica": 1, ...}
    GET  /metrics    Prometheus text format: requests, tokens, latency and time-to-first-token histograms,
                     queue depth and batch size, per replica
    GET  /health     {"status": "ok", "replicas": R, "tp": N, "rank_pids": [...]}

FastAPI on uvicorn in this process; the model on R * tp ranks behind it (cluster.py: R replicas routed by a balancer,
each tensor-parallel over tp ranks and batching continuously). A request is checked before it is routed: an empty
prompt, a negative max_new_tokens, a prompt that with its new tokens does not fit the context, token ids outside the
vocabulary, both or neither of prompt and input_ids get a 400 with a message saying what is wrong (a malformed body:
422), and the server goes on serving. A request's tokens depend only on it (its seed, its own generator): the same
request gives the same tokens (in the same batch; see inference.py on batch sizes and the last bits of a matmul).

Ctrl-C or SIGTERM stops uvicorn (it lets requests in flight finish, at most 5 s), then the ranks: no process is left.
Prometheus counters, histograms and gauges are kept in this process; every rank's numbers reach it with the results.
"""
import argparse
import asyncio
import signal
import sys

from .args import positive_int

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The Prometheus metrics of one server, in a registry of its own (not the process-wide default)."""

    def __init__(self, replicas: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        per = dict(labelnames=["replica"], registry=r)
        self.requests = Counter("minidist_requests", "Requests answered", **per)
        self.rejected = Counter("minidist_rejected_requests", "Requests refused with a 4xx status", registry=r)
        self.prompt_tokens = Counter("minidist_prompt_tokens", "Prompt tokens of answered requests", **per)
        self.generated = Counter("minidist_generated_tokens", "Tokens generated", **per)
        self.latency = Histogram("minidist_request_latency_seconds", "From routing to the last token",
                                 buckets=LATENCY_BUCKETS, **per)
        self.ttft = Histogram("minidist_time_to_first_token_seconds", "From routing to the first token",
                              buckets=LATENCY_BUCKETS, **per)
        self.queue = Gauge("minidist_queue_depth", "Requests routed to the replica and not finished", **per)
        self.batch = Gauge("minidist_batch_size", "Sequences in the replica's last decoding step", **per)
        self.waiting = Gauge("minidist_waiting_requests", "Requests waiting for a KV-cache slot", **per)
        for k in map(str, range(replicas)):  # every series exists from the start, at 0
            for metric in (self.requests, self.prompt_tokens, self.generated, self.latency, self.ttft, self.queue,
                           self.batch, self.waiting):
                metric.labels(replica=k)

    def submitted(self, replica: int, prompt_tokens: int) -> None:
        self.queue.labels(replica=str(replica)).inc()

    def finished(self, result) -> None:
        k = str(result.replica)
        self.queue.labels(replica=k).dec()
        self.requests.labels(replica=k).inc()
        self.prompt_tokens.labels(replica=k).inc(result.prompt_tokens)
        self.generated.labels(replica=k).inc(len(result.output))
        self.latency.labels(replica=k).observe(result.finished_at - result.submitted_at)
        self.ttft.labels(replica=k).observe(max(0.0, result.first_token_at - result.submitted_at))

    def step(self, replica: int, batch: int, waiting: int) -> None:
        self.batch.labels(replica=str(replica)).set(batch)
        self.waiting.labels(replica=str(replica)).set(waiting)


def create_app(cluster, metrics: Metrics, tokenizer):
    """The FastAPI application over a running cluster.Cluster."""
    from fastapi import FastAPI, HTTPException, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from pydantic import BaseModel, ConfigDict, StrictInt

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt: str | None = None
        input_ids: list[StrictInt] | None = None
        max_new_tokens: StrictInt = 16
        temperature: float = 0.0
        seed: StrictInt = 0

    app = FastAPI(title="minidist serve", description=__doc__)

    def refuse(message: str):
        metrics.rejected.inc()
        raise HTTPException(status_code=400, detail=message)

    @app.post("/generate")
    async def generate(req: GenerateRequest):
        if (req.prompt is None) == (req.input_ids is None):
            refuse("give exactly one of 'prompt' (text) and 'input_ids' (a list of token ids)")
        ids = tokenizer.encode(req.prompt).ids if req.prompt is not None else req.input_ids
        try:
            future = cluster.submit(ids, req.max_new_tokens, req.temperature, req.seed)
        except ValueError as e:
            refuse(str(e))
        result = await asyncio.wrap_future(future)
        return {"output_ids": result.output, "text": tokenizer.decode(result.output), "replica": result.replica,
                "prompt_tokens": len(ids), "latency_s": result.finished_at - result.submitted_at}

    @app.get("/metrics")
    def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": cluster.name, "replicas": cluster.replicas, "tp": cluster.tp,
                "context": cluster.context, "rank_pids": sorted(cluster.pids)}

    return app


def serve(args) -> int:
    import uvicorn
    from .cluster import Cluster
    from .data import tokenizer
    metrics = Metrics(args.replicas)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the ranks inherit this: Ctrl-C stops the server, which stops them
    cluster = Cluster(args.model, args.tp, args.replicas, args.slots, args.balancer, listener=metrics)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the handler it found: make
    # that a KeyboardInterrupt for both, so that the ranks are stopped below instead of the process simply dying.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        app = create_app(cluster, metrics, tokenizer())
        print(f"minidist serve: http://{args.host}:{args.port}  {args.model}, {args.replicas} replica(s) x tp "
              f"{args.tp}, {args.balancer} balancer; ranks {sorted(cluster.pids)}", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                    timeout_graceful_shutdown=5)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.close()
    print("minidist serve: stopped", flush=True)
    return 0


def port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1-65535)")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP: POST /generate, GET /metrics (Prometheus)")
    p.add_argument("--model", choices=["tiny-gpt", "tiny-llama"], default="tiny-llama")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel ranks per replica")
    p.add_argument("--replicas", type=positive_int, default=1, help="data-parallel replicas behind the balancer")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--slots", type=positive_int, default=8, help="KV-cache slots (running sequences) per replica")
    p.add_argument("--balancer", choices=["least-tokens", "round-robin"], default="least-tokens")
    p.set_defaults(run=serve)

