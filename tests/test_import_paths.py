"""The import paths that outlive the layout (issue 20): notebooks, handouts and scripts outside this repository use
them, so a move inside the package must keep every one of them working."""
import importlib

import pytest

PATHS = [  # (module, names it must give)
    ("minidist", ["launch", "device", "RankError", "Mesh", "run_under_torchrun"]),
    ("minidist.launch", ["launch", "device", "RankError"]),
    ("minidist.comm", ["ring_backend", "ByteLedger", "all_reduce_sum", "broadcast", "all_gather_cat", "identity",
                       "SimulatedLink", "send", "recv", "batch_isend_irecv", "ring_bytes", "flight_recorder"]),
    ("minidist.data_parallel", ["DataParallel", "global_mean_loss"]),
    ("minidist.zero", ["ZeroOptimizer"]),
    ("minidist.fsdp", ["fully_shard", "full_state_dict"]),
    ("minidist.tensor_parallel", ["ColumnParallelLinear", "RowParallelLinear", "vocab_parallel_cross_entropy",
                                  "parallelize", "GPT_PLAN", "LLAMA_PLAN"]),
    ("minidist.checkpoint", ["save", "load"]),
    ("minidist.pipeline.schedule", ["Action", "one_f_one_b", "zero_bubble_v", "dualpipe_v"]),  # issue 26's names
    ("minidist.context_parallel", ["ring_attention", "ulysses_attention"]),
    ("minidist.moe", ["MoE", "expert_parallel"]),                                             # issue 25's names
    ("minidist.memory", ["measure_state_bytes", "zero_state_bytes"]),
    ("minidist.testing", ["replica_divergence"]),
    ("minidist.samplers", ["DistributedSampler", "TokenBudgetBatchSampler"]),
    ("minidist.models", ["GPT", "GPTConfig"]),
    ("minidist.exercises", ["registry"]),
]


@pytest.mark.parametrize("module, names", PATHS, ids=[m for m, _ in PATHS])
def test_the_public_import_paths_still_work(module, names):
    imported = importlib.import_module(module)
    missing = [n for n in names if not hasattr(imported, n)]
    assert not missing, f"{module} no longer gives {missing}"


def test_a_package_gives_the_objects_its_modules_define():
    from minidist.comm import all_reduce_sum, ring_backend
    from minidist.comm.backend import ring_backend as defined
    from minidist.comm.collectives import all_reduce_sum as collective
    from minidist.tensor_parallel import GPT_PLAN, parallelize
    from minidist.tensor_parallel.plans import GPT_PLAN as plan, parallelize as apply
    assert (ring_backend, all_reduce_sum, GPT_PLAN, parallelize) == (defined, collective, plan, apply)
    from minidist import launch
    assert callable(launch) and launch.__module__ == "minidist.launch"   # the function, as before
