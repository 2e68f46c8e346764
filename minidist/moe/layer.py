"""The mixture-of-experts layer on one process: routing, top-k, the load-balancing loss, capacity, the permutation.

A token x (d_model) is scored by a linear router (n_experts logits), the softmax turns the scores into probabilities,
the k largest are kept and renormalized to sum to 1 (Mixtral's rule: the output is a weighted *average* of the
chosen experts; `normalize=False` keeps the raw probabilities instead, Switch Transformer's rule), and

    y = sum_j  w_j * expert_{e_j}(x)          (j = 1..k; each expert a SwiGLU MLP, as in Mixtral)

So each token costs k experts' FLOPs while the layer holds n_experts experts' parameters.

Computing it: the (token, choice) pairs ("assignments") are sorted by expert (`permute`), so each expert runs one
matmul on a contiguous block of rows, and `unpermute` puts the outputs back and takes the weighted sum. With
capacity_factor c, an expert takes at most C = ceil(c * S * k / E) of a step's S tokens' assignments: the first
choices of all tokens before any second choice, each in token order (GShard); the rest are dropped (they add 0; the
residual connection around the layer carries the token on).

Load balance (Switch Transformer, Fedus et al. 2021; top-k as in Hugging Face's Mixtral): with f_e the fraction of
tokens that chose expert e among their k and P_e the mean router probability of e,

    aux_loss = E * sum_e f_e * P_e          (= k when routing is uniform; larger when it collapses)

(it equals k under uniform routing; it is not a minimum there: a confident router whose probability sits on the
experts that few tokens chose scores less). f is a count (no gradient); with f held fixed, the gradient reaches the
router through P and pushes probability down where f is high.

The router's gradient: with renormalized top-k, the task loss reaches only the k chosen logits (the weights are a
softmax over the chosen ones); the unchosen logits get gradient from the auxiliary loss alone. At k = 1 the weight is
always 1 and the task gives the router no gradient at all: MoE refuses top_k=1 unless normalize=False (Switch).

Host syncs per layer (a GPU waits for the CPU there): `nonzero` in permute and `bincount` (its output size), and one
`.tolist()` of the counts (split sizes are decided at run time); under expert parallelism the received counts travel
in that same `.tolist()`.
"""
import math
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F


class Expert(nn.Module):
    """One SwiGLU MLP (Mixtral's expert): down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def route(logits: torch.Tensor, top_k: int, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits (S, E) -> (probs (S, E) in fp32, weights (S, k), chosen (S, k) ids). The weights are the chosen
    probabilities renormalized to sum to 1 (Mixtral), or as they are with normalize=False (Switch)."""
    probs = logits.float().softmax(-1)
    top, chosen = probs.topk(top_k, dim=-1)
    return probs, top / top.sum(-1, keepdim=True) if normalize else top, chosen


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The Switch-Transformer auxiliary loss E * sum_e f_e * P_e for router probabilities `probs` (S, E) and the
    experts each token chose, `chosen` (S, k): f_e is the fraction of the S tokens that have e among their k choices
    (a count: no gradient flows through it), P_e the mean probability of e over the tokens. A scalar; k when every
    expert gets the same share. Graded: values against planted routings, its gradient (through P only)."""
    # <exercise load_balancing_loss points=1>
    # hint: f is a fraction of tokens, so it comes from `chosen`, not from `probs`; a token counts once for each
    #       of its k choices.
    n_experts = probs.shape[-1]
    f = F.one_hot(chosen, n_experts).sum(1).float().mean(0)   # (E,)
    p = probs.mean(0)                                          # (E,)
    return n_experts * (f * p).sum()
    # </exercise>


def capacity(tokens: int, top_k: int, n_experts: int, capacity_factor: float | None) -> int | None:
    """How many assignments an expert takes in a step of `tokens` tokens: ceil(c * tokens * k / E); None: all."""
    return None if capacity_factor is None else math.ceil(capacity_factor * tokens * top_k / n_experts)


def keep_within_capacity(chosen: torch.Tensor, n_experts: int, cap: int | None) -> torch.Tensor:
    """Which assignments (S, k) an expert of capacity `cap` keeps: for each expert, its first `cap` assignments, in
    priority order: every token's first choice before any second choice, tokens in order (GShard). Returns a bool
    (S, k) mask; all True when cap is None. Graded: planted routings (which ones are dropped), counts per expert."""
    if cap is None:
        return torch.ones_like(chosen, dtype=torch.bool)
    # <exercise keep_within_capacity points=2>
    # hint: the queue is choice-major: all first choices (in token order), then all second choices, ...
    onehot = F.one_hot(chosen.t().reshape(-1), n_experts)          # (k*S, E), choice-major
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1             # each assignment's place in its expert's queue
    return (position < cap).view(chosen.shape[1], chosen.shape[0]).t()
    # </exercise>


def permute(x: torch.Tensor, chosen: torch.Tensor, keep: torch.Tensor, n_experts: int):
    """Sort the kept assignments by expert: x (S, d), chosen and keep (S, k) -> (rows (M, d): the tokens, grouped by
    expert in expert order; order (M,): the flat index s*k + j of each row's assignment; counts (E,): rows per expert).
    Within an expert, rows are in token order (increasing s*k + j): a convention that makes the layout deterministic
    (unpermute would invert any order). The dispatch permutation; `unpermute` is its inverse. Graded: against planted
    routings, rows, order and counts."""
    # <exercise permute points=3>
    # hint: flat assignment a = s * k + j belongs to token a // k. Keep only the kept ones; the convention on the
    #       order within an expert decides which sort you need.
    k = chosen.shape[1]
    experts = chosen.reshape(-1)
    kept = keep.reshape(-1).nonzero().squeeze(1)
    order = kept[torch.argsort(experts[kept], stable=True)]
    counts = torch.bincount(experts[kept], minlength=n_experts)
    return x[order // k], order, counts
    # </exercise>


def unpermute(rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The inverse of `permute`, and the weighted sum: rows (M, d) are expert outputs in permuted order, weights (S, k);
    returns (S, d) with out[s] = sum_j weights[s, j] * the output of assignment (s, j) (0 if it was dropped)."""
    S, k = weights.shape
    per_assignment = rows.new_zeros(S * k, rows.shape[-1]).index_copy(0, order, rows)   # (S*k, d)
    return (per_assignment.view(S, k, rows.shape[-1]) * weights.unsqueeze(-1).to(rows.dtype)).sum(1)


def run_experts(experts, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Each expert on its block of rows (counts[i] rows for the i-th of `experts`, in order): one matmul per expert."""
    return torch.cat([expert(block) for expert, block in zip(experts, rows.split(counts))])


class Experts(nn.ModuleList):
    """The layer's experts: an nn.ModuleList (experts[i] is the i-th expert this rank holds, in global order; len and
    iteration as a list) whose entries are registered under their *global* expert ids, so that a sharded layer's
    state_dict keeps the global names: `experts.5.gate.weight` is expert 5 on whichever rank holds it, and a
    checkpoint reshards by name. The set is fixed once built: appending, inserting or deleting is refused."""

    def __init__(self, experts: dict[int, nn.Module]):
        super().__init__()
        for e, module in experts.items():
            self.add_module(str(e), module)

    def __getitem__(self, idx):
        modules = list(self._modules.values())
        return nn.ModuleList(modules[idx]) if isinstance(idx, slice) else modules[operator.index(idx)]

    def __setitem__(self, idx, module: nn.Module) -> None:
        setattr(self, list(self._modules)[operator.index(idx)], module)   # the same global name, a new module

    def _fixed(self, *args, **kwargs):
        raise TypeError("an MoE layer's experts are fixed once built (their names are global expert ids): build "
                        "the layer with n_experts, or shard it with expert_parallel")

    __delitem__ = insert = append = extend = pop = __iadd__ = _fixed


class MoE(nn.Module):
    """A mixture-of-experts layer, (B, T, d_model) -> (B, T, d_model): router, top-k, experts (`self.experts`, an
    nn.ModuleList, Experts, whose state_dict names are the global expert ids, so a sharded layer keeps them).

    After each forward: `aux_loss` (the load-balancing loss of that forward's tokens: add a multiple of it to the
    loss), `dropped` (assignments over capacity), `tokens_per_expert` (kept assignments per expert, (E,)).
    `expert_parallel(moe, group)` shards the experts; this module holds no parallelism itself: `dispatch`, when set,
    takes (rows, counts per global expert (E,) tensor) and returns the experts' outputs for those rows, wherever
    they ran.
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int = 2, *, capacity_factor=None,
                 normalize: bool = True):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("n_experts", n_experts), ("top_k", top_k)):
            _positive_int(name, value)
        if top_k > n_experts:
            raise ValueError(f"top_k {top_k} is more than the {n_experts} experts")
        if capacity_factor is not None and not (isinstance(capacity_factor, (int, float)) and capacity_factor > 0):
            raise ValueError(f"capacity_factor must be a positive number or None (dropless), got {capacity_factor!r}")
        if top_k == 1 and normalize:
            raise ValueError("top_k=1 with renormalized weights gives every token weight 1: the router would get no "
                             "gradient from the task; pass normalize=False (Switch: the raw probability)")
        self.d_model, self.n_experts, self.top_k, self.capacity_factor = d_model, n_experts, top_k, capacity_factor
        self.normalize = normalize
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = Experts({e: Expert(d_model, d_ff) for e in range(n_experts)})
        self.expert_ids = list(range(n_experts))
        self.dispatch = None
        self.aux_loss = self.tokens_per_expert = None
        self.dropped = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MoE takes (B, T, {self.d_model}) inputs, got {tuple(x.shape)}")
        flat = x.reshape(-1, self.d_model)                                   # (S, d)
        probs, weights, chosen = route(self.router(flat), self.top_k, self.normalize)   # (S, E), (S, k), (S, k)
        # a rank with no tokens this step (possible under EP) still joins the all-to-alls; its aux loss is 0, not NaN
        self.aux_loss = load_balancing_loss(probs, chosen) if flat.shape[0] else probs.sum() * 0
        keep = keep_within_capacity(chosen, self.n_experts,
                                    capacity(flat.shape[0], self.top_k, self.n_experts, self.capacity_factor))
        rows, order, counts = permute(flat, chosen, keep, self.n_experts)   # (M, d), (M,), (E,)
        self.tokens_per_expert, self.dropped = counts, chosen.numel() - rows.shape[0]
        out = (run_experts(self.experts, rows, counts.tolist()) if self.dispatch is None   # a host sync
               else self.dispatch(rows, counts))
        return unpermute(out, order, weights).view_as(x)
