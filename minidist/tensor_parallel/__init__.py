"""Tensor parallelism (chapter 04): every weight matrix split across the ranks of a group (Megatron-LM), with
sequence parallelism outside the column/row pairs and the vocabulary split too.

    layers.py     column- and row-parallel linear layers, f and g (enter / leave a parallel region), the
                  sequence-parallel boundaries (shards re-gathered in backward)
    vocab.py      the vocabulary-parallel embedding and the cross-entropy over a split vocabulary (no full logits)
    plans.py      parallelize(model, group, plan, sequence_parallel): a module-name -> style plan applied from
                  outside the model; GPT_PLAN, LLAMA_PLAN

Plans use layers; layers never import plans.
"""
from .layers import (ColumnParallelLinear, RowParallelLinear, enter_parallel_region, leave_parallel_region,
                     padded_size, prepare_input, shard_output_features)
from .plans import (GPT_PLAN, LLAMA_PLAN, check_sizes, full_parameters, local_shard, match_plan, parallelize,
                    sharded_parameters)
from .vocab import VocabParallelEmbedding, vocab_parallel_ce_forward, vocab_parallel_cross_entropy

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "enter_parallel_region", "leave_parallel_region",
           "prepare_input", "shard_output_features", "padded_size", "VocabParallelEmbedding",
           "vocab_parallel_cross_entropy", "vocab_parallel_ce_forward", "parallelize", "GPT_PLAN", "LLAMA_PLAN",
           "match_plan", "check_sizes", "sharded_parameters", "full_parameters", "local_shard"]
