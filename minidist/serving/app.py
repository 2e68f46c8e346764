"""A real HTTP endpoint: `python -m minidist serve --model tiny-llama --tp 2 --replicas 2 --port 8000`.

    POST /generate   {"prompt": "To be", "max_new_tokens": 16, "temperature": 0.8, "seed": 1}   (or "input_ids")
                     -> {"output_ids": [...generated tokens only...], "text": "...", "replica": 1, ...}
    GET  /metrics    Prometheus text format: requests, tokens, latency and time-to-first-token histograms,
                     queue depth, batch sizes and failures, per replica
    GET  /health     200 {"status": "ok", "replicas": R, "tp": N, "rank_pids": [...]}; 503 {"status": "down", ...}
                     once the ranks have stopped

FastAPI on uvicorn in this process; the model on R * tp ranks behind it (cluster.py: R replicas routed by a balancer,
each tensor-parallel over tp ranks and batching continuously). A request is checked before it is routed: an empty
prompt, a negative max_new_tokens, a prompt that with its new tokens does not fit the context, token ids outside the
vocabulary, a temperature that is negative, not finite or between 0 and 1e-4, a seed outside [0, 2**63), both or
neither of prompt and input_ids get a 400 with a message saying what is wrong (a malformed body, such as a string
where a number goes: 422), and the server goes on serving. Before any of that (serve_limits.py): a body over
--max-body-bytes gets a 413, one slower than --body-timeout a 408, a prompt too long in bytes to fit the context a
400 without being tokenized; tokenizing runs in a worker thread, never on the event loop. When every replica holds
--slots + --max-waiting requests, a new one gets a 429 (Retry-After: 1) instead of an unbounded queue. A request
that fails on a replica of one rank gets a 500 with the error; one not answered within --request-timeout seconds a
504, and its generation is cancelled on its replica. A request's tokens depend only on it (its seed, its own
generator): the same request gives the same tokens (in the same batch; see inference.py on batch sizes).

Latency is measured from the request's arrival (the middleware stamps it), so /metrics counts the time a request
spent waiting for the event loop, a replica and a KV-cache slot, as its client does; its buckets reach 60 s.

Failures. The port is bound before any rank starts (a busy port ends the command at once). If a rank dies, the
replicas share its fate (one launch): requests in flight and new ones get a 503, /health answers 503, and the server
exits with code 1, so that whatever supervises it (systemd, Kubernetes, a shell loop) starts a fresh one. An error
on one rank of a tensor-parallel replica is such a failure too (batching.py: its peers may wait inside a collective):
a 503 and a restart, not a 500 for one request and a replica left in a collective. Restarting
a replica in place would need one launch per replica and a router that skips dead ones (the balancer's `healthy`
argument is there for it): simpler, and no less correct, to let the supervisor restart the whole server.

Ctrl-C or SIGTERM stops uvicorn (requests in flight may finish for 5 s, then get a 503), then the ranks: none is left;
Ctrl-C while the ranks start stops them too. Prometheus counters, histograms and gauges are kept in this process.
"""
import argparse
import asyncio
import signal
import socket
import sys
import time

from ..args import nonnegative_int, positive_float, positive_int

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """The Prometheus metrics of one server, in a registry of its own (not the process-wide default)."""

    def __init__(self, replicas: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        per = dict(labelnames=["replica"], registry=r)
        self.requests = Counter("minidist_requests", "Requests answered", **per)
        self.rejected = Counter("minidist_rejected_requests", "Requests refused with a 400, 408, 413 or 422",
                                registry=r)
        self.busy = Counter("minidist_busy_requests", "Requests refused with a 429: every replica full", registry=r)
        self.cancelled_requests = Counter("minidist_cancelled_requests", "Requests answered 504, their generation "
                                          "cancelled", **per)
        self.failed = Counter("minidist_failed_requests", "Requests that failed after routing (500, 503)", **per)
        self.prompt_tokens = Counter("minidist_prompt_tokens", "Prompt tokens of answered requests", **per)
        self.generated = Counter("minidist_generated_tokens", "Tokens generated", **per)
        self.latency = Histogram("minidist_request_latency_seconds", "From arrival to the last token",
                                 buckets=LATENCY_BUCKETS, **per)
        self.ttft = Histogram("minidist_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=LATENCY_BUCKETS, **per)
        self.queue = Gauge("minidist_queue_depth", "Requests routed to the replica and not finished", **per)
        self.batch = Histogram("minidist_batch_size", "Sequences given a token in an engine step (prefills included)",
                               buckets=BATCH_BUCKETS, **per)
        self.waiting = Gauge("minidist_waiting_requests", "Requests waiting for a KV-cache slot", **per)
        for k in map(str, range(replicas)):  # every series exists from the start, at 0
            for metric in (self.requests, self.failed, self.prompt_tokens, self.generated, self.latency, self.ttft,
                           self.queue, self.batch, self.waiting, self.cancelled_requests):
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
        if result.output:  # no first token without a token
            self.ttft.labels(replica=k).observe(max(0.0, result.first_token_at - result.submitted_at))

    def failed_request(self, replica: int) -> None:
        self.queue.labels(replica=str(replica)).dec()
        self.failed.labels(replica=str(replica)).inc()

    def cancelled(self, replica: int) -> None:
        self.queue.labels(replica=str(replica)).dec()
        self.cancelled_requests.labels(replica=str(replica)).inc()

    def step(self, replica: int, batch: int, waiting: int) -> None:
        self.batch.labels(replica=str(replica)).observe(batch)
        self.waiting.labels(replica=str(replica)).set(waiting)


def create_app(cluster, metrics: Metrics, tokenizer, request_timeout: float = 60.0, max_body_bytes: int = 65536,
               body_timeout: float = 10.0):
    """The FastAPI application over a running cluster.Cluster, behind serve_limits.RequestGuard."""
    from fastapi import FastAPI, HTTPException, Request, Response
    from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .cluster import ClusterBusy, ClusterDown, RequestError
    from .limits import RequestGuard, longest_token_bytes, prompt_problem

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt: str | None = None
        input_ids: list[StrictInt] | None = None
        max_new_tokens: StrictInt = 16
        temperature: StrictFloat = 0.0   # a JSON number (1 is fine), not a string
        seed: StrictInt = 0

    app = FastAPI(title="minidist serve", description=__doc__)
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes, body_timeout=body_timeout,
                       refused=lambda status: metrics.rejected.inc())
    longest = longest_token_bytes(tokenizer) if tokenizer is not None else None

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError):
        metrics.rejected.inc()  # a 422 is a refusal too
        return await request_validation_exception_handler(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException):
        metrics.rejected.inc(exc.status_code == 400)  # ours (refuse) and FastAPI's ("error parsing the body")
        return await http_exception_handler(request, exc)

    def refuse(message: str):
        raise HTTPException(status_code=400, detail=message)

    @app.post("/generate")
    async def generate(req: GenerateRequest, request: Request):
        arrived = request.scope.get("state", {}).get("arrived") or time.time()  # RequestGuard's stamp
        if (req.prompt is None) == (req.input_ids is None):
            refuse("give exactly one of 'prompt' (text) and 'input_ids' (a list of token ids)")
        if req.prompt is not None and longest and (problem := prompt_problem(req.prompt, cluster.context, longest)):
            refuse(problem)  # before tokenizing: no prompt can take the server's time beyond its size in bytes
        ids = req.input_ids
        if req.prompt is not None:
            try:  # in a worker thread: the event loop goes on answering others meanwhile
                ids = (await asyncio.to_thread(tokenizer.encode, req.prompt)).ids
            except Exception as e:  # noqa: BLE001  (a lone surrogate: "TextInputSequence must be str")
                refuse(f"the prompt cannot be tokenized ({type(e).__name__}: {e})")
        try:
            future = cluster.submit(ids, req.max_new_tokens, req.temperature, req.seed, arrived_at=arrived)
        except ValueError as e:
            refuse(str(e))
        except ClusterBusy as e:
            metrics.busy.inc()
            raise HTTPException(status_code=429, detail=str(e), headers={"Retry-After": "1"}) from None
        except ClusterDown as e:
            raise HTTPException(status_code=503, detail=str(e)) from None
        try:  # on a timeout wait_for cancels the future: the cluster cancels the request on its replica
            result = await asyncio.wait_for(asyncio.wrap_future(future), timeout=request_timeout)
        except asyncio.TimeoutError:
            raise HTTPException(status_code=504, detail=f"no answer within {request_timeout:g} s") from None
        except asyncio.CancelledError:  # uvicorn's shutdown, its 5 s of grace over: say so rather than a bare 500
            raise HTTPException(status_code=503, detail="the server is shutting down") from None
        except ClusterDown as e:
            raise HTTPException(status_code=503, detail=str(e)) from None
        except RequestError as e:
            raise HTTPException(status_code=500, detail=str(e)) from None
        return {"output_ids": result.output, "text": tokenizer.decode(result.output), "replica": result.replica,
                "prompt_tokens": len(ids), "latency_s": result.finished_at - result.submitted_at}

    @app.get("/metrics")
    def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    def health():
        up = cluster.running
        body = {"status": "ok" if up else "down", "model": cluster.name, "replicas": cluster.replicas,
                "tp": cluster.tp, "context": cluster.context, "rank_pids": sorted(cluster.pids)}
        if not up:
            body["error"] = str(cluster.error or "the ranks have stopped")
        return JSONResponse(body, status_code=200 if up else 503)

    return app


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound before any rank starts: a busy port is reported at once (SystemExit)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"minidist serve: cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(args) -> int:
    import uvicorn
    from .cluster import Cluster, ClusterDown
    from ..data import tokenizer
    sock = bind(args.host, args.port)
    state = {"server": None, "down": False, "error": None}

    def on_stop(error):  # the ranks stopped: if nobody asked them to, this server can serve nothing any more
        state["down"], state["error"] = not state.get("stopping"), error
        if state["server"] is not None:
            state["server"].should_exit = True

    # Ctrl-C and SIGTERM raise KeyboardInterrupt here, during the ranks' start too (they block SIGINT and reset
    # SIGTERM); uvicorn handles both while it runs, then raises the signal again: KeyboardInterrupt below.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    metrics, cluster = Metrics(args.replicas), None
    try:
        cluster = Cluster(args.model, args.tp, args.replicas, args.slots, args.balancer, listener=metrics,
                          on_stop=on_stop, close_in_ranks=(sock.fileno(),), max_waiting=args.max_waiting)
        app = create_app(cluster, metrics, tokenizer(), args.request_timeout, args.max_body_bytes, args.body_timeout)
        state["server"] = server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                                 timeout_graceful_shutdown=5))
        print(f"minidist serve: http://{args.host}:{args.port}  {args.model}, {args.replicas} replica(s) x tp "
              f"{args.tp}, {args.balancer} balancer; ranks {sorted(cluster.pids)}", flush=True)
        if not state["down"]:
            server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    except ClusterDown as e:  # the ranks did not start
        state["down"], state["error"] = True, e
    finally:
        state["stopping"] = True
        if cluster is not None:
            cluster.close()
        sock.close()
    if state["down"]:
        print(f"minidist serve: the ranks stopped ({state['error']}); exiting", file=sys.stderr, flush=True)
        return 1
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
    p.add_argument("--request-timeout", type=positive_float, default=60.0,
                   help="seconds a request may take before it is answered 504 (and its generation cancelled)")
    p.add_argument("--max-waiting", type=nonnegative_int, default=32,
                   help="requests a replica holds beyond its --slots before new ones get a 429")
    p.add_argument("--max-body-bytes", type=positive_int, default=65536, help="larger request bodies get a 413")
    p.add_argument("--body-timeout", type=positive_float, default=10.0,
                   help="seconds a request body may take to arrive before a 408")
    p.set_defaults(run=serve)

