"""Mixture of experts and expert parallelism (chapter 13).

    layer.py      MoE: router, top-k renormalized (Mixtral), SwiGLU experts, the load-balancing loss, capacity and
                  dropping, the dispatch permutation and its inverse
    parallel.py   expert_parallel: experts sharded over a group, tokens moved by all-to-all with run-time split
                  sizes (counts first, then rows); reduce_gradients (which gradients need which reduction); bytes
    reference.py  the references: a Hugging Face MixtralSparseMoeBlock loaded into MoE, DeepSpeed's MoE layer
"""
from .layer import (Expert, Experts, MoE, capacity, keep_within_capacity, load_balancing_loss, permute, route,
                    run_experts, unpermute)
from .parallel import (ExpertDispatch, alltoall_bytes, exchange_counts, expert_parallel, layout_costs,
                       reduce_gradients)

__all__ = ["MoE", "Expert", "route", "load_balancing_loss", "capacity", "keep_within_capacity", "permute",
           "unpermute", "run_experts", "expert_parallel", "exchange_counts", "ExpertDispatch", "reduce_gradients",
           "alltoall_bytes", "layout_costs"]
