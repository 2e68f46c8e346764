"""Vocabulary-parallel cross-entropy: the loss of a language model whose logits are split by vocabulary.

Rank r holds the logits of its vocabulary slice, columns [r V/N, (r+1) V/N) of the (M, V) logits of M tokens (the
output of a column-parallel lm_head, tensor_parallel.py). Gathering them would cost M x V values per rank, the largest
activation of a small-vocabulary model's step and far larger than the hidden states for a 128k vocabulary. Cross-
entropy needs only three numbers per token, each combined over ranks:

    m    = max_v logits[v]                    (all-gather of each rank's maximum: M values per rank)
    Z    = sum_v exp(logits[v] - m)           (all-reduce, stacked with the next one: 2M values)
    t    = logits[target] - m                 (only the rank that owns the target contributes; the others add 0)
    loss = log Z - t

and its gradient, softmax - onehot(target), is local: each rank computes its own columns, with no communication.
Subtracting the global max keeps exp from overflowing (a rank-local max would not, as ranks would disagree on Z).
This is Megatron-LM's vocab_parallel_cross_entropy; PyTorch's DTensor does the same under `loss_parallel()`.
"""
import torch
import torch.distributed as dist

from . import comm


def vocab_parallel_ce_forward(local_logits: torch.Tensor, targets: torch.Tensor, group=None):
    """Per-token cross-entropy from this rank's slice of the logits, without gathering them.

    local_logits: (M, V/N) float, rank r's columns [r V/N, (r+1) V/N) of the (M, V) logits (padding columns are
    -inf); targets: (M,) token ids in [0, V). Returns (loss, softmax): loss (M,), the same on every rank, equal to
    log(sum_v exp(logits[v])) - logits[target]; softmax (M, V/N), this rank's columns of softmax(logits). Graded:
    both against the full-vocabulary computation, at logits large enough that exp overflows without subtracting
    the maximum (use the maximum over the whole vocabulary), for targets on every rank's slice.
    """
    # <exercise vocab_parallel_loss points=3>
    # hint: comm has no max all-reduce, but you can all-gather each rank's per-token maximum.
    # hint: each rank knows which targets fall in its columns; the others contribute 0 to a sum.
    # hint: one all-reduce can carry two per-token sums stacked together.
    rank = dist.get_rank(group)
    v_local = local_logits.shape[-1]
    start = rank * v_local
    local_max = local_logits.max(dim=-1).values                        # (M,)
    top = comm.all_gather_cat(local_max.unsqueeze(0), group).max(dim=0).values  # (M,) max over the vocabulary
    exp = (local_logits - top.unsqueeze(-1)).exp()                     # (M, V/N)
    mine = (targets >= start) & (targets < start + v_local)
    target_logit = local_logits.gather(-1, (targets - start).clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    sums = comm.all_reduce_sum(torch.stack([exp.sum(-1), torch.where(mine, target_logit - top, 0.0)]), group)
    return sums[0].log() - sums[1], exp / sums[0].unsqueeze(-1)
    # </exercise>


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_logits, targets, group, ignore_index):
        flat, tgt = local_logits.reshape(-1, local_logits.shape[-1]).float(), targets.reshape(-1)
        keep = tgt != ignore_index
        loss, softmax = vocab_parallel_ce_forward(flat, torch.where(keep, tgt, 0), group)
        count = keep.sum().clamp(min=1)
        ctx.save_for_backward(softmax, tgt, keep, count)
        ctx.shape, ctx.dtype, ctx.group = local_logits.shape, local_logits.dtype, group
        return (loss * keep).sum() / count

    @staticmethod
    def backward(ctx, grad):
        # d loss_i / d logit_v = softmax_v - [v == target_i]: the gradient needs no communication at all.
        softmax, tgt, keep, count = ctx.saved_tensors
        start = dist.get_rank(ctx.group) * softmax.shape[-1]
        local = (tgt - start).clamp(0, softmax.shape[-1] - 1)
        mine = keep & (tgt >= start) & (tgt < start + softmax.shape[-1])
        g = softmax.clone()
        g[torch.arange(len(tgt), device=tgt.device)[mine], local[mine]] -= 1.0
        g = g * (keep * grad / count).unsqueeze(-1)
        return g.to(ctx.dtype).view(ctx.shape), None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, group=None, *,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens whose target is not ignore_index, from this rank's vocabulary
    slice of the logits (..., V/N); replicated on every rank. Costs one all-gather of M values and one all-reduce of
    2M (M tokens), instead of gathering M x V logits."""
    return _VocabParallelCrossEntropy.apply(local_logits, targets, group, ignore_index)
