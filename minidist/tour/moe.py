"""Tour checks for chapter 13: expert parallelism against one process (forward, gradients, AdamW steps), the
all-to-all bytes against the routing's formula, dp x ep on 4 ranks, capacity against a planted routing.

The rank functions are shared with the tests, which assert on their results. The reference is one process with the
same weights running the layer on each rank's tokens and averaging the losses (the objective of data parallelism;
with dropless routing the union of the tokens in one batch gives the same forward).
"""
import copy
import time
from fractions import Fraction

import torch
import torch.distributed as dist
import torch._dynamo  # noqa: F401  imported once before launch forks: torch.optim loads it lazily, 2 s per rank

from .. import comm
from ..launch import launch
from ..mesh import Mesh
from ..moe import MoE, alltoall_bytes, capacity, expert_parallel, keep_within_capacity, reduce_gradients, route
from .rows import covers, make_row

D_MODEL, D_FF, TOP_K, TOKENS = 16, 24, 2, 8    # a rank's batch: 12 / N sequences of 8 tokens (N = 1..4)
ROWS, LR, STEPS, AUX = 12, 1e-3, 3, 0.01
FWD_TOL = 1e-6                 # reduction order only: the same matmuls on differently stacked rows
ADAM_TOL = 0.01 * LR * STEPS   # README: 1% of the most AdamW can move a weight in STEPS steps


def experts_for(world: int) -> int:
    return 6 if world == 3 else 8


def batch(step: int, rows: int = ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(rows, TOKENS, D_MODEL, generator=g), torch.randn(rows, TOKENS, D_MODEL, generator=g)


def loss_of(moe: MoE, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, the training loss of one rank's tokens: mean squared error plus the load-balancing loss)."""
    out = moe(x)
    return out, torch.nn.functional.mse_loss(out, y) + AUX * moe.aux_loss


def held(moe: MoE) -> dict:
    """name -> parameter, for the parameters this rank holds (experts are named by their global id)."""
    return dict(moe.named_parameters())


def ep_against_one_process(n_experts: int, replicas: int = 1, capacity_factor=None, mistake: bool = False) -> dict:
    """Expert parallelism over ep = world / replicas ranks (replicated `replicas` times when > 1: the dp x ep mesh),
    each rank on its own tokens, against one process on every rank's tokens: the largest difference of this rank's
    outputs, of its gradients after the first backward, and of its weights after STEPS AdamW steps; the all-to-all
    bytes it sent in the first forward and backward (counted) and the formula's, from the reference's routing.
    mistake=True all-reduces the experts' gradients over the ep group too, as if its ranks held replicas (chapter
    13's common mistake: it adds up different experts' gradients, silently, as they have the same shapes)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = Mesh.from_axes([("replicate", replicas), ("ep", world // replicas)])
    replicate = mesh.group("replicate") if replicas > 1 else None
    torch.manual_seed(0)
    reference = MoE(D_MODEL, D_FF, n_experts, TOP_K, capacity_factor=capacity_factor)
    moe = expert_parallel(copy.deepcopy(reference), mesh.group("ep"), replicate)
    opts = [torch.optim.AdamW(m.parameters(), lr=LR) for m in (reference, moe)]
    out = {"forward": 0.0}
    for step in range(STEPS):
        x, y = batch(step)   # inputs that need a gradient, as the output of a layer below would
        chunks = [(xr.clone().requires_grad_(), yr) for xr, yr in zip(x.chunk(world), y.chunk(world))]
        ref = [loss_of(reference, xr, yr) for xr, yr in chunks]   # every rank's tokens in turn
        sum(loss for _, loss in ref).div(world).backward()        # the mean of the ranks' losses
        expected = ref[rank][0].detach()
        xr, yr = chunks[rank][0].detach().clone().requires_grad_(), chunks[rank][1]
        with comm.ByteLedger() as ledger:
            ep_out, loss = loss_of(moe, xr, yr)
            loss.backward()
        out["forward"] = max(out["forward"], (ep_out - expected).abs().max().item())
        if mistake:   # the experts "averaged" over the ep group, as if its ranks held replicas
            for p in moe.experts.parameters():
                comm.all_reduce_(p.grad, mesh.group("ep"))
        reduce_gradients(moe)
        if step == 0:
            group = mesh.members["ep"]   # the ranks whose tokens this rank's experts serve
            chosen = [route(reference.router(chunks[g][0].reshape(-1, D_MODEL)), TOP_K)[2] for g in group]
            out["bytes"] = ledger.total_bytes("all_to_all", axis="ep")
            out["bytes_theory"] = alltoall_bytes(chosen, mesh.local_rank("ep"), n_experts, D_MODEL)
            out["counted"] = ledger.counted
            ref = held(reference)
            out["grads"] = max([(p.grad - ref[k].grad).abs().max().item() for k, p in held(moe).items()]
                               + [(xr.grad / world - chunks[rank][0].grad).abs().max().item()])  # its 1/N share
        for opt in opts:
            opt.step()
            opt.zero_grad()
    ref = held(reference)
    out["weights"] = max((p - ref[k]).abs().max().item() for k, p in held(moe).items())
    out["expert_ids"], out["dropped"] = moe.expert_ids, moe.dropped
    return out


def planted_capacity(capacity_factor: float = 0.5, tokens: int = 16, n_experts: int = 4) -> dict:
    """A routing planted through the router (E = 4 experts, token s: first choice s % 2, second choice 3 if s % 6 == 1
    else 2: experts 0, 1 and 2 overloaded, expert 3 under capacity), C = ceil(c * S * k / E): the assignments dropped
    (MoE.dropped) against the formula sum_e max(0, n_e - C); how many assignments the layer kept differently from a
    plain queue (first choices before second choices, tokens in order: GShard); the largest output of a token none of
    whose assignments was kept (must be 0)."""
    torch.manual_seed(0)
    moe = MoE(n_experts, 8, n_experts, TOP_K, capacity_factor=capacity_factor)
    s = torch.arange(tokens)
    chosen = torch.stack([s % 2, torch.where(s % 6 == 1, 3, 2)], 1)   # (S, k)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(n_experts))   # logits = x, and x scores the first choice highest
    x = 4 * torch.nn.functional.one_hot(chosen[:, 0], n_experts) + 2 * torch.nn.functional.one_hot(chosen[:, 1],
                                                                                                  n_experts)
    out = moe(x.float().view(1, tokens, n_experts)).view(tokens, -1)
    cap = capacity(tokens, TOP_K, n_experts, capacity_factor)
    queue, kept = [0] * n_experts, torch.zeros(tokens, TOP_K, dtype=torch.bool)
    for j in range(TOP_K):
        for s_ in range(tokens):
            e = int(chosen[s_, j])
            kept[s_, j], queue[e] = queue[e] < cap, queue[e] + 1
    per_expert = torch.bincount(chosen.flatten(), minlength=n_experts)
    none_kept = ~kept.any(1)
    return {"dropped": moe.dropped, "formula": int((per_expert - cap).clamp(min=0).sum()), "capacity": cap,
            "assignments": tokens * TOP_K, "kept": moe.tokens_per_expert.tolist(),
            "kept_formula": per_expert.clamp(max=cap).tolist(),
            "kept_differently": int((keep_within_capacity(chosen, n_experts, cap) != kept).sum()),
            "none_kept": int(none_kept.sum()),
            "dropped_tokens_output": out[none_kept].abs().max().item() if none_kept.any() else 0.0}


def all_to_all_demo() -> dict:
    """All-to-all, even and uneven, on this rank (for the chapter's primer): rank r holds the values 10 r + j, j the
    destination; even: one value to each rank; uneven: r + 1 copies of 10 r + j to rank j."""
    n, r = dist.get_world_size(), dist.get_rank()
    even = comm.all_to_all(torch.tensor([10 * r + j for j in range(n)]))
    rows = torch.tensor([10 * r + j for j in range(n) for _ in range(r + 1)])
    uneven = comm.all_to_all_uneven(rows, [r + 1] * n, [i + 1 for i in range(n)])
    return {"sent": [10 * r + j for j in range(n)], "even": even.tolist(), "uneven": uneven.tolist()}


def router_gradient(top_k: int = 2, tokens: int = 16, n_experts: int = 4, seed: int = 0) -> dict:
    """The task loss's gradient on the router logits (no aux loss): the largest on a logit the token did not choose,
    and the mean size of those on the chosen ones. With renormalized top-k the weights are a softmax over the chosen
    logits only, so the first is exactly 0 (only the load-balancing loss reaches the unchosen logits)."""
    torch.manual_seed(seed)
    moe = MoE(D_MODEL, D_FF, n_experts, top_k)
    logits = []
    moe.router.register_forward_hook(lambda module, args, out: logits.append(out) or out.retain_grad())
    moe(torch.randn(1, tokens, D_MODEL)).square().sum().backward()
    grad, chosen = logits[0].grad, torch.nn.functional.one_hot(logits[0].topk(top_k, -1).indices, n_experts).sum(1)
    return {"unchosen": grad[chosen == 0].abs().max().item(), "chosen": grad[chosen == 1].abs().mean().item()}


def tp_expert_bytes(tokens: int = 6) -> dict:
    """One expert cut over the world in Megatron's way (gate and up by rows of F, down by columns), each rank with its
    own `tokens` tokens: all-gather the inputs, run this rank's slice on all of them, reduce-scatter the partial
    outputs back to their owners; then backward. The largest output and input-gradient difference against the whole
    expert on this rank's tokens, and the bytes this rank sent (counted, minidist's ring) against layout_costs' TP."""
    from ..moe import Expert, layout_costs
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    whole = Expert(D_MODEL, D_FF * world)
    mine = Expert(D_MODEL, D_FF)
    with torch.no_grad():
        for name in ("gate", "up"):
            getattr(mine, name).weight.copy_(getattr(whole, name).weight.chunk(world, 0)[rank])
        mine.down.weight.copy_(whole.down.weight.chunk(world, 1)[rank])
    x = torch.randn(world, tokens, D_MODEL, generator=torch.Generator().manual_seed(1))[rank].requires_grad_()
    with comm.ByteLedger() as ledger, comm.ring_backend():
        out = comm.reduce_scatter(mine(comm.all_gather(x)))        # (N S, d) partial sums -> (S, d) this rank's
        out.square().sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    expected = whole(ref_x)
    expected.square().sum().backward()
    theory = layout_costs(tokens, D_MODEL, D_FF * world, 1, 1, world, element=4)["TP"][1]
    return {"forward": (out - expected).abs().max().item(), "input_grad": (x.grad - ref_x.grad).abs().max().item(),
            "bytes": ledger.total_bytes(), "bytes_theory": theory, "counted": ledger.counted}


def _timed(fn, world_size, *args):
    start = time.perf_counter()
    return launch(fn, world_size, *args), time.perf_counter() - start


@covers("EP, experts on ranks: forward, gradients", "EP: 3 AdamW steps", "dp x ep")
def check_expert_parallel(world_size: int) -> list[dict]:
    """EP over the tour's world size (8 experts; 6 on 3 ranks) against one process, and dp 2 x ep 2 on 4 ranks."""
    rows, ranks = [], f"{world_size} rank{'s' * (world_size > 1)}"
    for label, world, replicas in ((f"EP, {experts_for(world_size)} experts on {ranks}", world_size, 1),
                                   ("dp 2 x ep 2, 8 experts", 4, 2)):
        per_rank, seconds = _timed(ep_against_one_process, world, experts_for(world), replicas)
        rows.append(make_row(f"{label}: forward, gradients", "one process, mean of ranks' losses",
                             max_abs_diff=max(max(r["forward"], r["grads"]) for r in per_rank), tolerance=FWD_TOL,
                             comm_bytes=Fraction(sum(r["bytes"] for r in per_rank), world),
                             comm_bytes_theory=Fraction(sum(r["bytes_theory"] for r in per_rank), world),
                             seconds=seconds))
        rows.append(make_row(f"{label}: {STEPS} AdamW steps", "one process (AdamW)",
                             max_abs_diff=max(r["weights"] for r in per_rank), tolerance=ADAM_TOL, seconds=seconds))
    return rows


@covers("capacity")
def check_capacity(world_size: int) -> list[dict]:
    start = time.perf_counter()
    r = planted_capacity()
    ok_kept = r["kept"] == r["kept_formula"] and r["kept_differently"] == 0 and r["none_kept"] > 0
    return [make_row(f"capacity 0.5: {r['dropped']} of {r['assignments']} assignments dropped (C={r['capacity']})",
                     "sum_e max(0, n_e - C), planted",
                     max_abs_diff=abs(r["dropped"] - r["formula"]) + (0 if ok_kept else 1) + r["dropped_tokens_output"],
                     tolerance=0, seconds=time.perf_counter() - start)]


CHECKS = [check_expert_parallel, check_capacity]
