"""Inference and serving (chapter 12): generation with a KV cache, one process or tensor-parallel, served over HTTP
by replicas behind a balancer. (Pipeline-parallel generation is minidist.pipeline.generate.)

    inference.py  generate(model, input_ids, max_new_tokens): the KV cache, prefill and decode, sampling
    batching.py   continuous batching: requests join and leave the running batch at every decoding step
    balancer.py   round-robin and least-outstanding-tokens routing; Poisson load; a replay in engine steps
    cluster.py    replicas x tensor-parallel ranks behind a router, fed through queues
    replica.py    the loop each rank of a replica runs
    app.py        the HTTP endpoint (FastAPI, uvicorn): POST /generate, GET /metrics, GET /health
"""
from .app import create_app, serve
from .balancer import LeastOutstandingTokens, RoundRobin, make_balancer, poisson_load, replay_in_steps, run_load
from .batching import Engine, Request
from .cluster import Cluster, ClusterDown, RequestError
from .inference import KVCache, generate, kv_bytes_per_token, sample_next

__all__ = ["generate", "KVCache", "kv_bytes_per_token", "sample_next", "Engine", "Request", "RoundRobin",
           "LeastOutstandingTokens", "make_balancer", "poisson_load", "run_load", "replay_in_steps", "Cluster",
           "ClusterDown", "RequestError", "create_app", "serve"]
