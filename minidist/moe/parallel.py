"""Expert parallelism: the experts sharded over a group, tokens sent to their experts' ranks by all-to-all.

Rank r of N holds experts [r*L, (r+1)*L), L = E / N; the router is replicated. Each step, on every rank:

    1. route its own tokens and sort the assignments by expert (layer.permute): rows (M, d), counts per expert (E,)
    2. exchange the counts (a small all-to-all): rank r learns how many rows each rank sends to each of its experts
    3. all-to-all the rows, with the split sizes just learned (uneven, decided at run time)
    4. run its L experts on what arrived (grouped by expert)
    5. all-to-all the outputs back (the reverse splits), and undo the permutation (layer.unpermute)

Bytes per rank and step, forward: (its rows for other ranks' experts + the rows other ranks sent it, returned as
outputs) * d * element size, plus the counts (L int64 to each of the N-1 others); the backward moves as many rows again,
without a count exchange (the counts are known). Summed over ranks: 4 * (assignments to another rank's expert) * d * b.

Gradients (data parallel's semantics: each rank's loss on its own tokens, the objective their mean): the all-to-all's
backward already brings every rank's gradient for an expert's rows to the rank that holds the expert, so an expert's
gradient is the *sum* over ranks of their losses' gradients — no all-reduce over the ep group (its ranks hold
different experts, there is nothing to average with), only the 1/N of the mean. The router and everything else that
is replicated gets an all-reduce, as in data parallelism. With ep inside a larger dp group, experts are replicated over
the ranks holding the same block, and their gradients are all-reduced over those replicas only (`reduce_gradients`).

With a capacity factor, each rank applies it to its own tokens (C from its own S), before the exchange: an expert
may then receive up to N x C rows in a step. `alltoall_bytes` is the dropless formula.
"""
import torch
import torch.distributed as dist

from .. import comm
from .layer import Experts, MoE, run_experts


def exchange_counts(counts: torch.Tensor, group=None) -> torch.Tensor:
    """counts (E,) int64: the rows this rank sends to each global expert, experts in contiguous blocks of L = E / N
    per rank. Returns (N, L): row i = the rows rank i sends to each of *this* rank's experts. Through comm (counted).
    Graded: at 2, 3 and 4 ranks against planted counts, and the bytes it sends."""
    # <exercise exchange_counts points=2>
    # hint: rank j needs block j of every rank's counts. One of minidist.comm's collectives does exactly that (the
    #       exercise file does not import comm for you: from minidist import comm).
    n = comm.group_size(group)
    return comm.all_to_all(counts.view(n, -1), group).view(n, -1)
    # </exercise>


class ExpertDispatch:
    """MoE.dispatch under expert parallelism: steps 2-4 of the module docstring for one forward."""

    def __init__(self, experts, group):
        self.experts, self.group = experts, group

    def __call__(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        n = comm.group_size(self.group)
        per_rank = counts.numel() // n
        received = exchange_counts(counts, self.group)                    # (N, L)
        both = torch.cat([counts, received.flatten()]).tolist()          # one host sync for both sets of sizes
        counts, received = both[:n * per_rank], [both[n * per_rank + i * per_rank:][:per_rank] for i in range(n)]
        send = [sum(counts[j * per_rank:(j + 1) * per_rank]) for j in range(n)]
        recv = [sum(r) for r in received]
        arrived = comm.DifferentiableAllToAll.apply(rows, send, recv, self.group)   # source-major, expert-minor
        blocks = arrived.split([c for r in received for c in r])
        by_expert = [torch.cat([blocks[i * per_rank + l] for i in range(n)]) for l in range(per_rank)]
        outputs = run_experts(self.experts, torch.cat(by_expert), [b.shape[0] for b in by_expert])
        out_blocks = outputs.split([received[i][l] for l in range(per_rank) for i in range(n)])   # expert-major
        back = torch.cat([out_blocks[l * n + i] for i in range(n) for l in range(per_rank)])      # source-major
        return comm.DifferentiableAllToAll.apply(back, recv, send, self.group)


def expert_parallel(moe: MoE, group=None, replicate_group=None) -> MoE:
    """Shard `moe`'s experts over `group` in place: this rank keeps its contiguous block (`moe.expert_ids`), the
    router stays replicated. `replicate_group`: the ranks holding the same block (ep inside dp), recorded for
    `reduce_gradients`, and checked here (collectively) to hold one block. Returns the module."""
    if not isinstance(moe, MoE):
        raise TypeError(f"expert_parallel takes a minidist.moe.MoE, got {type(moe).__name__}")
    if moe.dispatch is not None:
        raise ValueError("this MoE is expert-parallel already")
    n, rank = comm.group_size(group), dist.get_rank(group)
    if moe.n_experts % n:
        raise ValueError(f"{moe.n_experts} experts not divisible by the expert-parallel size {n}")
    per_rank = moe.n_experts // n
    if replicate_group is not None:   # collective: every rank reaches the same verdict, so none is left waiting
        blocks = comm.all_gather_cat(torch.tensor([rank]), replicate_group).tolist()
        if len(set(blocks)) > 1:
            raise ValueError(f"replicate_group holds ranks with different blocks of experts (expert-parallel ranks "
                             f"{blocks}): a replica group must hold the same experts")
    held = dict(zip(moe.expert_ids, moe.experts))
    moe.expert_ids = list(range(rank * per_rank, (rank + 1) * per_rank))
    # keyed by the global id: this rank's state_dict says experts.5.gate.weight for expert 5, so a checkpoint keeps
    # each expert under its own name (checkpoint.save writes every rank's distinct names; a load reshards)
    moe.experts = Experts({e: held[e] for e in moe.expert_ids})
    for p in moe.experts.parameters():
        p.expert_parallel = True   # reduce_gradients: all-reduced over the replicas only
    moe.ep_group, moe.replicate_group = group, replicate_group
    moe.dispatch = ExpertDispatch(list(moe.experts), group)
    return moe


_RECORDED = object()


def reduce_gradients(model: torch.nn.Module, dp_group=None, replicate_group=_RECORDED) -> None:
    """After backward, with each rank's loss the mean over its own tokens: make every gradient the one of the mean
    over the `dp_group` (every rank that holds different tokens, the ep ranks included). Replicated parameters (the
    router, attention, ...): all-reduce over dp_group, / its size. Expert parameters: all-reduce over their replicas
    only, / the dp size. The replicas are the group `expert_parallel` recorded on each MoE; a `replicate_group`
    passed here must be that one (it is refused otherwise), and is used for expert parameters outside a minidist MoE
    (tagged `p.expert_parallel`, as reference.deepspeed_moe does)."""
    recorded = {}
    for m in model.modules():
        if isinstance(m, MoE) and m.dispatch is not None:
            if replicate_group is not _RECORDED and replicate_group is not m.replicate_group:
                raise ValueError("reduce_gradients: replicate_group differs from the one expert_parallel recorded for "
                                 "this MoE (expert_parallel(moe, group, replicate_group) decides it)")
            recorded |= {id(p): m.replicate_group for p in m.experts.parameters()}
    n = comm.group_size(dp_group)
    for p in model.parameters():
        if p.grad is None:
            continue
        if not getattr(p, "expert_parallel", False):
            comm.all_reduce_(p.grad, dp_group)
        else:
            group = recorded.get(id(p), None if replicate_group is _RECORDED else replicate_group)
            if group is not None:
                comm.all_reduce_(p.grad, group)
        p.grad.div_(n)


def alltoall_bytes(chosen: list[torch.Tensor], rank: int, n_experts: int, d_model: int, element: int = 4) -> int:
    """The formula: bytes rank `rank` sends in one forward and backward of an expert-parallel MoE (dropless), given
    the experts every rank's tokens chose (`chosen[i]`: (S_i, k) for rank i; its experts are block `rank` of E / N).
    Forward, it sends its own assignments to other ranks' experts (out) and the outputs of the assignments other
    ranks sent it (in); backward, the gradients of both go the other way. Rows are d x element bytes; plus the count
    exchange: L = E / N int64 counts to each other rank."""
    world = len(chosen)
    per_rank = n_experts // world
    out = int((chosen[rank] // per_rank != rank).sum())
    into = sum(int((c // per_rank == rank).sum()) for i, c in enumerate(chosen) if i != rank)
    return 2 * (out + into) * d_model * element + (world - 1) * per_rank * 8


def layout_costs(tokens: int, d_model: int, d_ff: int, n_experts: int, top_k: int, world: int,
                 element: int = 2) -> dict:
    """Three ways to spread one MoE layer's experts over `world` ranks that each hold `tokens` tokens, per rank and
    training step (forward + backward), with uniform routing: {layout: (expert parameters held, bytes sent)}.

        DP  every rank holds every expert; the gradients are all-reduced: 2 (N-1)/N x E x 3 d F x element
        EP  E / N experts per rank; all-to-all of the rows (there and back, forward and backward), a share (N-1)/N
            of them to other ranks: 4 (N-1)/N x tokens x k x d x element
        TP  every expert cut in N (Megatron column/row); each rank holds 1/N of every expert, so it must see all N
            ranks' tokens: all-gather the inputs and reduce-scatter the outputs forward (the k chosen experts'
            partial outputs are summed locally first, one d-row per token), the duals backward; each moves
            (N-1)/N of N x tokens rows: 4 (N-1) x tokens x d x element, N/k times EP's
    And, for scale, a dense MLP with the same FLOPs per token (hidden k F) under DP: its gradients' all-reduce."""
    expert = 3 * d_model * d_ff
    share = (world - 1) / world
    return {"DP": (n_experts * expert, 2 * share * n_experts * expert * element),
            "EP": (n_experts * expert // world, 4 * share * tokens * top_k * d_model * element),
            "TP": (n_experts * expert // world, 4 * (world - 1) * tokens * d_model * element),
            "dense, same FLOPs (DP)": (top_k * expert, 2 * share * top_k * expert * element)}
