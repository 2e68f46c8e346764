"""Plausible wrong answers to chapter 13's exercises (mixture of experts): the grader must score each below full
marks."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from minidist import comm


def load_balancing_loss__probs_instead_of_counts(probs, chosen):
    """f taken from the probabilities (E * sum P_e^2): the gradient flows through f too, and the value is wrong."""
    n_experts = probs.shape[-1]
    p = probs.mean(0)
    return n_experts * (p * p).sum()


def load_balancing_loss__first_choice_only(probs, chosen):
    """f counts only each token's first choice (GShard's top-2 loss, not Mixtral's): 1, not k, when balanced."""
    n_experts = probs.shape[-1]
    f = F.one_hot(chosen[:, 0], n_experts).float().mean(0)
    return n_experts * (f * probs.mean(0)).sum()


def load_balancing_loss__no_expert_factor(probs, chosen):
    """Forgets the factor E: the loss's scale then changes with the number of experts (1/E of the right value)."""
    f = F.one_hot(chosen, probs.shape[-1]).sum(1).float().mean(0)
    return (f * probs.mean(0)).sum()


def keep_within_capacity__token_major(chosen, n_experts, cap):
    """Queues assignments token by token (a token's second choice before the next token's first choice)."""
    onehot = F.one_hot(chosen.reshape(-1), n_experts)
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1
    return (position < cap).view(chosen.shape)


def keep_within_capacity__off_by_one(chosen, n_experts, cap):
    """Keeps cap + 1 assignments per expert (positions counted from 1, compared with <=)."""
    onehot = F.one_hot(chosen.t().reshape(-1), n_experts)
    position = (onehot.cumsum(0) * onehot).sum(-1)
    return (position <= cap + 1).view(chosen.shape[1], chosen.shape[0]).t()


def keep_within_capacity__per_choice_capacity(chosen, n_experts, cap):
    """Counts each choice's queue separately: first and second choices each get cap places."""
    onehot = F.one_hot(chosen, n_experts)                       # (S, k, E)
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1          # a queue per choice
    return position < cap


def permute__unstable_sort(x, chosen, keep, n_experts):
    """Sorts by expert without stability (descending-token tie order): tokens of one expert come out of order."""
    k = chosen.shape[1]
    experts = chosen.reshape(-1)
    kept = keep.reshape(-1).nonzero().squeeze(1).flip(0)
    order = kept[torch.argsort(experts[kept], stable=True)]
    counts = torch.bincount(experts[kept], minlength=n_experts)
    return x[order // k], order, counts


def permute__token_index_for_order(x, chosen, keep, n_experts):
    """Returns the token index s instead of the assignment index s*k + j as `order`: unpermute cannot invert it."""
    k = chosen.shape[1]
    experts = chosen.reshape(-1)
    kept = keep.reshape(-1).nonzero().squeeze(1)
    order = kept[torch.argsort(experts[kept], stable=True)]
    counts = torch.bincount(experts[kept], minlength=n_experts)
    return x[order // k], order // k, counts


def permute__ignores_keep(x, chosen, keep, n_experts):
    """Dispatches every assignment, the dropped ones too (capacity never applied)."""
    k = chosen.shape[1]
    experts = chosen.reshape(-1)
    order = torch.argsort(experts, stable=True)
    return x[order // k], order, torch.bincount(experts, minlength=n_experts)


def exchange_counts__keeps_own_counts(counts, group=None):
    """Static split sizes: assumes every rank sends what this rank sends ("common mistakes": a static split size)."""
    n = comm.group_size(group)
    mine = counts.view(n, -1)[dist.get_rank(group)]
    return mine.expand(n, -1).clone()


def exchange_counts__sends_everything_to_everyone(counts, group=None):
    """All-gathers the whole count vectors and returns rank 0's block for every rank (the wrong slice)."""
    n = comm.group_size(group)
    every = comm.all_gather_cat(counts.view(1, -1), group)      # (N, E)
    return every[:, : counts.numel() // n].clone()


def exchange_counts__transposed(counts, group=None):
    """Returns this rank's own counts per destination rank (the send side), not what each rank sends here."""
    n = comm.group_size(group)
    return counts.view(n, -1).clone()
