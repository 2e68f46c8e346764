"""ZeRO stages 1 and 2 (and 3 as one FSDP unit): the same weights as DDP, the memory and bytes of the formulas,
unused parameters, parameter groups, state dicts, accumulation, mixed precision, and ZeroRedundancyOptimizer."""
import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from minidist import launch
from minidist.data import token_ids
from minidist.data_parallel import DataParallel
from minidist.grading import implementation
from minidist.mixed_precision import LossScaler, MixedPrecisionOptimizer
from minidist.models import GPT, count_params, lm_loss
from minidist.tour.data_parallel import BATCHES, BF16_TOL, CFG
from minidist.tour.zero import (ADAM_LR, ADAM_TOL5, REPLICATED, STRATEGIES, against_zero_redundancy, cross_stage,
                                states_and_bytes)
from minidist.zero import ZeroOptimizer
from minidist.testing import value_errors
from tests.test_reducer import SkipWhenEmpty  # its output for an empty input is a constant


@pytest.mark.exercise("zero_shard_pieces")
def test_shard_pieces_by_hand():
    shard_pieces = implementation("zero_shard_pieces")
    # (not chapter 05's example) tensors of 2, 0, 7 elements: 9, padded to 12 on 4 ranks, chunks of 3:
    # [t0 t0 t2][t2 t2 t2][t2 t2 t2][pad pad pad]
    assert shard_pieces([2, 0, 7], 0, 4) == (3, [(0, 0, 2, 0), (2, 0, 1, 2)])
    assert shard_pieces([2, 0, 7], 1, 4) == (3, [(2, 1, 4, 0)])
    assert shard_pieces([2, 0, 7], 2, 4) == (3, [(2, 4, 7, 0)])
    assert shard_pieces([2, 0, 7], 3, 4) == (3, [])  # only padding
    assert shard_pieces([6], 0, 1) == (6, [(0, 0, 6, 0)])
    assert shard_pieces([], 0, 3) == (0, [])


@pytest.mark.exercise("zero_shard_pieces")
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shard_pieces_cover_every_element_once(n):
    sizes = [5, 0, 13, 1, 7, 2]
    seen = [[0] * s for s in sizes]
    for rank in range(n):
        chunk, pieces = implementation("zero_shard_pieces")(sizes, rank, n)
        assert chunk == math.ceil(sum(sizes) / n)
        used = [0] * chunk
        for index, start, stop, offset in pieces:
            assert 0 <= start < stop <= sizes[index] and offset + stop - start <= chunk
            for k in range(stop - start):
                seen[index][start + k] += 1
                used[offset + k] += 1
            # the element's place in the flat buffer is its place in the rank's chunk
            assert rank * chunk + offset == sum(sizes[:index]) + start
        assert max(used, default=0) <= 1
    assert all(count == 1 for s in seen for count in s)


def reduce_scatter_by_hand():
    n, rank = dist.get_world_size(), dist.get_rank()
    flats = [torch.arange(2.0 * n) * (rank + 1), torch.full((n,), float(rank), dtype=torch.bfloat16)]
    before = [f.clone() for f in flats]
    out = implementation("zero_reduce_scatter")(flats, None)
    unchanged = all(torch.equal(a, b) for a, b in zip(flats, before))
    return [o.dtype for o in out], out, unchanged


@pytest.mark.exercise("zero_reduce_scatter")
def test_reduce_scatter_gradients_average_each_bucket():
    n = 3
    mean_factor = sum(range(1, n + 1)) / n  # the average of (rank + 1) over the ranks
    for rank, (dtypes, (first, second), unchanged) in enumerate(launch(reduce_scatter_by_hand, n)):
        assert dtypes == [torch.float32, torch.bfloat16] and unchanged
        torch.testing.assert_close(first, torch.arange(2.0 * rank, 2.0 * rank + 2) * mean_factor)
        assert second.shape == (1,) and second.item() == pytest.approx((n - 1) / 2, abs=1e-2)


def reduce_scatter_structure():
    """Three buckets under a slow simulated link: when was each started, and are huge fp32 / bf16 gradients averaged
    without overflow (2e38 on each of 3 ranks: their sum is past fp32's and bf16's largest, 3.4e38; their mean is
    not)."""
    from minidist import comm
    from minidist.testing import issue_log
    n = dist.get_world_size()
    flats = [torch.full((2 * n,), 2e38), torch.full((n,), 2e38, dtype=torch.bfloat16), torch.ones(n)]
    with comm.ring_backend(comm.SimulatedLink(alpha=0.02, bandwidth=1e9)), issue_log() as pending:
        out = implementation("zero_reduce_scatter")(flats, None)
    return pending, out


@pytest.mark.exercise("zero_reduce_scatter")
def test_reduce_scatter_gradients_start_all_buckets_then_divide_before_summing():
    for pending, (big, big16, ones) in launch(reduce_scatter_structure, 3):
        assert pending == [0, 1, 2], f"asynchronous collectives still running when each bucket started: {pending}"
        assert torch.isfinite(big).all() and torch.isfinite(big16).all(), "the sum overflowed: divide by N first"
        assert torch.allclose(big, torch.full((2,), 2e38), rtol=1e-5) and torch.equal(ones, torch.ones(1))
        assert big16.dtype == torch.bfloat16 and abs(big16.float().item() / 2e38 - 1) < 1e-2


def all_gather_by_hand():
    rank = dist.get_rank()
    shards = [torch.tensor([rank, 10.0 + rank]), torch.tensor([rank], dtype=torch.bfloat16)]
    return implementation("zero_all_gather")(shards, None)


@pytest.mark.exercise("zero_all_gather")
def test_all_gather_parameters_concatenates_in_rank_order():
    for first, second in launch(all_gather_by_hand, 3):
        assert torch.equal(first, torch.tensor([0.0, 10.0, 1.0, 11.0, 2.0, 12.0]))
        assert torch.equal(second, torch.tensor([0, 1, 2], dtype=torch.bfloat16))


def all_gather_structure():
    from minidist import comm
    from minidist.testing import issue_log
    rank = dist.get_rank()
    shards = [torch.tensor([rank, 10.0 + rank]), torch.tensor([rank], dtype=torch.bfloat16), torch.ones(3)]
    with comm.ring_backend(comm.SimulatedLink(alpha=0.02, bandwidth=1e9)), issue_log() as pending:
        out = implementation("zero_all_gather")(shards, None)
    return pending, out


@pytest.mark.exercise("zero_all_gather")
def test_all_gather_parameters_start_every_bucket_before_waiting():
    for pending, (first, second, third) in launch(all_gather_structure, 3):
        assert pending == [0, 1, 2], f"asynchronous collectives still running when each bucket started: {pending}"
        assert torch.equal(first, torch.tensor([0.0, 10.0, 1.0, 11.0, 2.0, 12.0])) and torch.equal(third, torch.ones(9))
        assert second.dtype == torch.bfloat16


def used_by_hand():
    from minidist import comm
    rank = dist.get_rank()
    params = [torch.zeros(3, requires_grad=True) for _ in range(4)]
    for i, p in enumerate(params):   # 0 everywhere, 1 on rank 1 only, 2 nowhere, 3 on rank 0 only
        if i == 0 or (i == 1 and rank == 1) or (i == 3 and rank != 1):
            p.grad = torch.ones(3)
    with comm.ring_backend(), comm.ByteLedger() as ledger:
        used = implementation("zero_used_on_some_rank")(params, None)
    return used, ledger.count(), ledger.count("all_reduce"), ledger.total_bytes(), ledger.counted


@pytest.mark.exercise("zero_used_on_some_rank")
def test_used_on_some_rank_agrees_with_one_small_all_reduce():
    n = 2
    results = launch(used_by_hand, n)
    assert all(used == [True, True, False, True] for used, *_ in results)
    assert all(count == 1 and reduces == 1 and counted for _, count, reduces, _, counted in results)
    assert sum(r[3] for r in results) == 2 * (n - 1) * 4 * 4   # a ring all-reduce of 4 int32 flags, summed over ranks


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_stage_trains_the_weights_ddp_trains(world_size):
    results = launch(cross_stage, world_size)
    for r in results:
        for strategy in STRATEGIES:
            diff, divergence = r[strategy]
            assert diff < ADAM_TOL5, (strategy, diff)
            assert divergence == (0.0 if strategy in REPLICATED else None)


def padded(psi: int, n: int) -> int:
    return n * math.ceil(psi / n)


def test_memory_and_bytes_with_padding_mixed_precision():
    """CFG's sizes divide by nothing: every category of memory, summed over the ranks, and the bytes equal the padded
    formulas exactly (one bucket per strategy: bucket_cap_mb=25; stage 3 as one unit)."""
    n, model = 3, GPT(CFG)
    psi, tensors, pad = count_params(model), len(list(model.parameters())), padded(count_params(model), n)
    pad3 = sum(n * math.ceil(p.shape[0] / n) * p[0].numel() for p in model.parameters())  # stage 3: dim-0 shards
    results = launch(states_and_bytes, n, ("ddp", "zero1", "zero2", "zero3"), CFG)
    # (params, grads, optimizer) summed over the ranks: bf16 weights and gradients (2 bytes), fp32 masters (4),
    # moments (8) where each rank holds its chunk of the padded bucket (masters, gradient shards) or only its
    # elements (moments: one per element of a piece); stage 3 keeps fp32 shards and fp32 gradient shards, each
    # parameter's padded to N * ceil(d0 / N) rows.
    expected = {"ddp": (n * 2 * psi, n * 2 * psi, n * 12 * psi), "zero1": (n * 2 * psi, n * 2 * psi, 4 * pad + 8 * psi),
                "zero2": (n * 2 * psi, 2 * pad, 4 * pad + 8 * psi), "zero3": (4 * pad3, 4 * pad3, 8 * psi)}
    for s, (params, grads, optimizer) in expected.items():
        assert all(r[s]["counted"] for r in results)
        measured = [sum(getattr(r[s]["states"], k) for r in results) for k in ("params", "grads", "optimizer")]
        assert measured == [params, grads, optimizer], (s, measured)
    total = {s: sum(r[s]["bytes"].get(op, 0) for r in results for op in ("reduce_scatter", "all_gather"))
             for s in ("zero1", "zero2", "zero3")}
    assert sum(r["ddp"]["bytes"]["all_reduce"] for r in results) == 2 * (n - 1) * 2 * psi
    assert total["zero1"] == total["zero2"] == 2 * (n - 1) * 2 * pad  # what DDP sends, padded
    assert total["zero3"] == 3 * (n - 1) * 2 * pad3                   # 1.5x, of each parameter padded on dim 0
    for s in ("zero1", "zero2", "zero3"):  # one int32 flag per tensor: who had a gradient
        assert sum(r[s]["bytes"]["all_reduce"] for r in results) == 2 * (n - 1) * 4 * tensors


def test_against_zero_redundancy_optimizer():
    assert max(launch(against_zero_redundancy, 3)) < ADAM_TOL5


class Branchy(nn.Module):
    """`rare` is used on rank 0 only, `never` is never used."""

    def __init__(self):
        super().__init__()
        self.emb, self.rare, self.never, self.out = (nn.Embedding(16, 8), nn.Linear(8, 8), nn.Linear(8, 8),
                                                     nn.Linear(8, 16))

    def forward(self, x):
        h = self.emb(x)
        return self.out(self.rare(h) if dist.get_rank() == 0 else h)


def unused_parameters(stage):
    torch.manual_seed(0)
    start = Branchy()
    ddp_model, zero_model = copy.deepcopy(start), copy.deepcopy(start)
    ddp = DataParallel(ddp_model, find_unused_parameters=True)
    opts = (torch.optim.AdamW(ddp.parameters(), lr=0.01, weight_decay=0.1),
            ZeroOptimizer(zero_model.parameters(), torch.optim.AdamW, stage=stage, lr=0.01, weight_decay=0.1,
                          bucket_cap_mb=0.0005))
    for step in range(3):
        x = torch.randint(16, (4, 5), generator=torch.Generator().manual_seed(10 * step + dist.get_rank()))
        for model, opt in zip((ddp, zero_model), opts):
            lm_loss(model(x), x).backward()
            opt.step()
            opt.zero_grad()
    diff = max((a - b).abs().max().item() for a, b in zip(ddp_model.parameters(), zero_model.parameters()))
    untouched = all(torch.equal(a, b) for a, b in zip(start.never.parameters(), zero_model.never.parameters()))
    return diff, untouched, not torch.equal(start.rare.weight, zero_model.rare.weight)


@pytest.mark.parametrize("stage", [1, 2])
def test_parameters_without_gradient_are_left_alone_and_rare_ones_averaged(stage):
    for diff, never_untouched, rare_trained in launch(unused_parameters, 2, stage):
        assert diff < 1e-6 and never_untouched and rare_trained  # no weight decay on `never` either


def groups_and_state_dict():
    torch.manual_seed(0)
    model = GPT(CFG)
    reference = copy.deepcopy(model)
    n, rank = dist.get_world_size(), dist.get_rank()

    def groups(m):  # no weight decay on biases and LayerNorms, half the learning rate for them
        decay = [p for name, p in m.named_parameters() if p.dim() >= 2]
        return [{"params": decay, "weight_decay": 0.1}, {"params": [p for p in m.parameters() if p.dim() < 2],
                                                         "weight_decay": 0.0, "lr": ADAM_LR / 2}]
    opt = ZeroOptimizer(groups(model), torch.optim.AdamW, stage=1, lr=ADAM_LR)
    ref_opt = torch.optim.AdamW(groups(reference), lr=ADAM_LR)
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, ref_opt)]
    for x, y in BATCHES[:2]:
        for m, o, (xb, yb) in ((model, opt, (x.chunk(n)[rank], y.chunk(n)[rank])), (reference, ref_opt, (x, y))):
            lm_loss(m(xb), yb).backward()
            o.step()
            o.zero_grad()
        for s in schedules:
            s.step()
    ours, theirs = opt.state_dict(), ref_opt.state_dict()
    same_groups = ours["param_groups"] == theirs["param_groups"]
    state_diff = max((ours["state"][i][k] - theirs["state"][i][k]).abs().max().item()
                     for i in theirs["state"] for k in theirs["state"][i])
    # Resume: a fresh model and a stage-2 optimizer loading stage 1's state go on exactly as the original.
    resumed = copy.deepcopy(model)
    resumed_opt = ZeroOptimizer(groups(resumed), torch.optim.AdamW, stage=2, lr=1.0)
    resumed_opt.load_state_dict(ours)
    plain = torch.optim.AdamW(groups(copy.deepcopy(reference)), lr=1.0)
    plain.load_state_dict(ours)  # the format of the wrapped optimizer itself
    for x, y in BATCHES[2:]:
        for m, o in ((model, opt), (resumed, resumed_opt)):
            lm_loss(m(x.chunk(n)[rank]), y.chunk(n)[rank]).backward()
            o.step()
            o.zero_grad()
    resume_diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), resumed.parameters()))
    return same_groups, state_diff, resume_diff, plain.param_groups[1]["lr"] == ours["param_groups"][1]["lr"]


def test_param_groups_schedulers_and_state_dicts():
    for same_groups, state_diff, resume_diff, loaded_by_torch in launch(groups_and_state_dict, 3):
        assert same_groups and loaded_by_torch
        assert state_diff < 1e-6   # moments of reduced gradients: summation order only
        assert resume_diff < 1e-7  # the same arithmetic on the same numbers, up to the stage's reduction order


def accumulation(stage, micro_steps=2):
    torch.manual_seed(0)
    model = GPT(CFG)
    reference = copy.deepcopy(model)
    n, rank = dist.get_world_size(), dist.get_rank()
    opt = ZeroOptimizer(model.parameters(), torch.optim.SGD, stage=stage, lr=0.1, bucket_cap_mb=0.02)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    x, y = BATCHES[0]
    lm_loss(reference(x), y).backward()
    ref_opt.step()
    for xm, ym in zip(x.chunk(n)[rank].chunk(micro_steps), y.chunk(n)[rank].chunk(micro_steps)):
        (lm_loss(model(xm), ym) / micro_steps).backward()
    opt.step()
    return max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize("stage", [1, 2])
def test_gradient_accumulation_over_micro_steps(stage):
    assert max(launch(accumulation, 2, stage)) < 1e-7


@pytest.mark.exercise("zero2_pack_bucket")
def test_pack_bucket_by_hand():
    from minidist.data_parallel.buckets import layout
    pack = implementation("zero2_pack_bucket")
    a, b, c = nn.Parameter(torch.zeros(5)), nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2))
    params = [a, b, c]
    # Reverse order, buckets of 6 elements: c at [0, 4), b at [4, 7), a at [7, 12): bucket 0 = c, b[:2];
    # bucket 1 = b[2:], a. b is cut by the boundary.
    buckets, offsets = layout(params, 6 * 4)
    bucket_of = {0: [buckets[1]], 1: [buckets[0], buckets[1]], 2: [buckets[0]]}
    a.grad, b.grad, c.grad = torch.arange(1.0, 6.0), torch.tensor([7.0, 8.0, 9.0]), torch.tensor([[10.0, 20.0],
                                                                                                [30.0, 40.0]])
    first = pack(buckets[0], params, offsets, bucket_of, 4)     # padded to 8 on 4 ranks
    assert torch.equal(first, torch.tensor([10.0, 20.0, 30.0, 40.0, 7.0, 8.0, 0.0, 0.0]))
    assert c.grad is None and b.grad is not None and a.grad is not None  # b still has a piece to give
    second = pack(buckets[1], params, offsets, bucket_of, 4)
    assert torch.equal(second, torch.tensor([9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0]))
    assert a.grad is None and b.grad is None
    b.grad = torch.tensor([1.0, 2.0, 3.0])                     # a has no gradient: zeros in its place
    third = pack(buckets[1], params, offsets, bucket_of, 3)     # 6 elements on 3 ranks: no padding
    assert torch.equal(third, torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0, 0.0])) and third.dtype == torch.float32


def accumulation_with_learners_packing():
    import minidist.data_parallel.reducer as reducer
    reducer.pack_bucket = implementation("zero2_pack_bucket")   # what the reducer calls, in this process only
    return accumulation(2)


@pytest.mark.exercise("zero2_pack_bucket")
def test_zero2_accumulates_shards_not_full_gradients():
    assert max(launch(accumulation_with_learners_packing, 2)) < 1e-7


def mixed_precision(stage, steps=4):
    """bf16 model + fp32 master shards against DataParallel on the same bf16 model with MixedPrecisionOptimizer (fp32
    masters), on the same slices, SGD: the same bf16 gradients averaged, the same fp32 arithmetic on the masters."""
    torch.manual_seed(0)
    model = GPT(CFG).bfloat16()
    reference = copy.deepcopy(model)
    n, rank = dist.get_world_size(), dist.get_rank()
    opt = ZeroOptimizer(model.parameters(), torch.optim.SGD, stage=stage, lr=0.1)
    ddp = DataParallel(reference)
    ref_opt = MixedPrecisionOptimizer(reference, torch.optim.SGD, LossScaler(init_scale=1.0), lr=0.1)
    for x, y in BATCHES[:steps]:
        for m, o in ((model, opt), (ddp, ref_opt)):
            lm_loss(m(x.chunk(n)[rank]).float(), y.chunk(n)[rank]).backward()
            o.step()
            o.zero_grad()
    master = opt.state_dict()  # full fp32 masters under "master"
    index = {id(p): i for i, p in enumerate(model.parameters())}
    masters = [master["state"][index[id(p)]]["master"] for p in model.parameters()]
    diff = max((m - q).abs().max().item() for m, q in zip(masters, ref_opt.master))
    beyond_bf16 = sum((m != m.bfloat16().float()).sum().item() for m in masters)  # bits a bf16 copy cannot hold
    dtypes = {p.dtype for p in model.parameters()} | {opt.master.dtype}
    return diff, beyond_bf16, dtypes


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_model_with_fp32_master_shards(stage):
    for diff, beyond_bf16, dtypes in launch(mixed_precision, 3, stage):
        assert dtypes == {torch.bfloat16, torch.float32}
        assert diff < 1e-6       # fp32 masters: only the summation order of the bf16 gradients may differ
        assert beyond_bf16 > 0   # the masters are not rounded to bf16


class Two(nn.Module):
    """Two linear layers (SGD tests); `empty` is a trainable parameter with no elements."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6, dtype=dtype), nn.Linear(6, 3, dtype=dtype)
        self.empty = nn.Parameter(torch.zeros(0, dtype=dtype))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.to(self.a.weight.dtype))))


def two_batches(step):
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(step))


def train_against_one_process(model, opt, reference, ref_opt, steps, start=0, clip=None):
    """SGD steps on this rank's slice (ZeroOptimizer) and on the whole batch (one process); the norms clipped."""
    n, rank, norms = dist.get_world_size(), dist.get_rank(), []
    for step in range(start, start + steps):
        x = two_batches(step)
        for m, o, xb in ((model, opt, x.chunk(n)[rank]), (reference, ref_opt, x)):
            m(xb).pow(2).mean().backward()
            if clip:
                norms.append(o.clip_grad_norm_(clip) if o is opt else
                             torch.nn.utils.clip_grad_norm_(reference.parameters(), clip).item())
            o.step()
            o.zero_grad()
    return max((p.double() - q.double()).abs().max().item() for p, q in
               zip(model.parameters(), reference.parameters()) if p.numel()), norms


def rebuilt_and_changed():
    """A stage-2 optimizer rebuilt on the same model (stage 1, then 2 again: a re-run cell), and weights loaded into
    the model after the optimizer was built: both must go on as one process would."""
    torch.manual_seed(0)
    model, out = Two(), {}
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    first = ZeroOptimizer(model.parameters(), torch.optim.SGD, stage=2, lr=0.1, bucket_cap_mb=1e-4)
    out["before"] = train_against_one_process(model, first, reference, ref_opt, 2)[0]
    opt = ZeroOptimizer(model.parameters(), torch.optim.SGD, stage=1, lr=0.1)
    out["stage 1 after 2"] = train_against_one_process(model, opt, reference, ref_opt, 2, start=2)[0]
    opt = ZeroOptimizer(model.parameters(), torch.optim.SGD, stage=2, lr=0.1, bucket_cap_mb=1e-4)
    out["stage 2 again"] = train_against_one_process(model, opt, reference, ref_opt, 2, start=4)[0]
    try:
        first.step()
    except RuntimeError as e:
        out["old one"] = str(e)
    for stage in (1, 2):  # new weights loaded into the model after the optimizer was built
        opt = ZeroOptimizer(model.parameters(), torch.optim.SGD, stage=stage, lr=0.1)
        loaded = {k: v + 1.0 for k, v in reference.state_dict().items()}
        model.load_state_dict(loaded)
        reference.load_state_dict(loaded)
        out[f"loaded, stage {stage}"] = train_against_one_process(model, opt, reference, ref_opt, 2, start=6)[0]
    # changed between two steps of one optimizer (which skips reading back the weights its all-gather left as they
    # were): loaded in place (their version counters move), then one replaced by new memory (p.data = ...)
    loaded = {k: v - 0.5 for k, v in reference.state_dict().items()}
    model.load_state_dict(loaded)
    reference.load_state_dict(loaded)
    out["loaded between steps"] = train_against_one_process(model, opt, reference, ref_opt, 2, start=8)[0]
    (p, *_), (q, *_) = model.parameters(), reference.parameters()
    p.data, q.data = q.detach() * 2, q.detach() * 2
    out["replaced between steps"] = train_against_one_process(model, opt, reference, ref_opt, 2, start=10)[0]
    return out


def test_a_rebuilt_optimizer_and_weights_loaded_later_train_as_one_process():
    for out in launch(rebuilt_and_changed, 2):
        assert "taken over by a newer ZeroOptimizer" in out.pop("old one", "no error")
        assert all(diff < 1e-6 for diff in out.values()), out


def per_group_states():
    """Momentum and amsgrad set in one parameter group only (the defaults create no such state)."""
    torch.manual_seed(0)
    out = []
    for cls, extra in ((torch.optim.SGD, {"momentum": 0.9}), (torch.optim.Adam, {"amsgrad": True})):
        model = Two()
        reference = copy.deepcopy(model)

        def groups(m):
            return [{"params": m.a.parameters(), **extra}, {"params": [*m.b.parameters(), m.empty]}]
        opt = ZeroOptimizer(groups(model), cls, stage=2, lr=0.01)
        ref_opt = cls(groups(reference), lr=0.01)
        train_against_one_process(model, opt, reference, ref_opt, 2)
        ours, theirs = opt.state_dict()["state"], ref_opt.state_dict()["state"]
        keys = ({i: sorted(v) for i, v in ours.items()}, {i: sorted(v) for i, v in theirs.items() if i in ours})
        diff = max(((torch.as_tensor(ours[i][k]) - torch.as_tensor(v)).abs().max().item()
                   for i in theirs for k, v in theirs[i].items() if i in ours and k in ours[i]), default=0.0)
        out.append((keys, sorted(theirs), diff))
    return out


def test_state_dict_keeps_states_only_a_parameter_group_creates():
    for out in launch(per_group_states, 2):
        for (ours, theirs), stepped, diff in out:
            assert ours == theirs and sorted(ours) == stepped, (ours, theirs)
            assert diff < 1e-6


def clipping(stage):
    torch.manual_seed(0)
    model = Two()
    reference = copy.deepcopy(model)
    opt = ZeroOptimizer(model.parameters(), torch.optim.SGD, stage=stage, lr=0.1, bucket_cap_mb=1e-4)
    diff, norms = train_against_one_process(model, opt, reference, torch.optim.SGD(reference.parameters(), lr=0.1),
                                            3, clip=0.1)
    return diff, norms


@pytest.mark.parametrize("stage", [1, 2])
def test_clip_grad_norm_uses_the_global_norm_of_the_shards(stage):
    for diff, norms in launch(clipping, 2, stage):
        ours, theirs = norms[0::2], norms[1::2]
        assert all(t > 0.1 for t in theirs)  # every step was clipped
        assert max(abs(a - b) / b for a, b in zip(ours, theirs)) < 1e-5 and diff < 1e-6


def fp16_overflow_on_one_rank():
    """fp16: an overflow only in the chunk rank 1 owns, from rank 0's batch; both ranks must skip that step."""
    out = {}
    try:
        ZeroOptimizer(Two(torch.float16).parameters(), torch.optim.SGD, lr=0.1)
    except ValueError as e:
        out["no scaler"] = str(e)
    torch.manual_seed(0)
    model = nn.Linear(4, 4, bias=False).half()
    opt = ZeroOptimizer(model.parameters(), torch.optim.SGD, stage=2, lr=0.1, scaler=LossScaler(init_scale=1024.0))
    start = model.weight.detach().clone()
    weight = torch.tensor([1.0, 1.0, 1e4, 1e4]) if dist.get_rank() == 0 else torch.ones(4)
    x = torch.ones(2, 4, dtype=torch.float16)
    opt.scaler.scale_loss((model(x).float() * weight).sum()).backward()  # inf in rows 2-3: rank 1's chunk
    opt.step()
    opt.zero_grad()
    out["unchanged"] = torch.equal(model.weight, start)
    out["skipped"], out["scale"] = opt.skipped, opt.scaler.scale
    opt.scaler.scale_loss(model(x).float().sum()).backward()
    opt.step()
    out["trained"] = not torch.equal(model.weight, start)
    out["weights"] = model.weight.detach().clone()
    return out


def test_fp16_needs_a_scaler_and_every_rank_skips_an_overflow():
    results = launch(fp16_overflow_on_one_rank, 2)
    for out in results:
        assert "fp16 parameters need loss scaling" in out["no scaler"]
        assert out["unchanged"] and out["skipped"] == 1 and out["scale"] == 512.0 and out["trained"]
    assert torch.equal(results[0]["weights"], results[1]["weights"])


def edge_cases():
    """A zero-size trainable parameter, an fp64 model (fp64 masters), and the mistakes ZeroOptimizer refuses."""
    torch.manual_seed(0)
    out = {}
    for stage in (1, 2):
        for dtype in (torch.float32, torch.float64):
            model = Two(dtype)
            reference = copy.deepcopy(model)
            opt = ZeroOptimizer(model.parameters(), torch.optim.SGD, stage=stage, lr=0.1, bucket_cap_mb=1e-4)
            out[(stage, dtype)] = train_against_one_process(model, opt, reference,
                                                            torch.optim.SGD(reference.parameters(), lr=0.1), 2)[0]
            out[(stage, dtype, "master")] = opt.master.dtype
    model = Two()
    model.a.weight.requires_grad_(False)
    opt = ZeroOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    model.a.weight.requires_grad_(True)  # unfrozen after the optimizer was built: it would never be trained
    model(two_batches(0)).sum().backward()
    out["errors"] = value_errors(opt.step, lambda: opt.add_param_group({"params": [nn.Parameter(torch.ones(2))]}),
                                 lambda: opt.load_state_dict({"state": {2: {"momentum_buffer": torch.ones(3)}},
                                                              "param_groups": opt.state_dict()["param_groups"]}))
    return out


def test_zero_size_and_fp64_parameters_and_refused_mistakes():
    for out in launch(edge_cases, 2):
        errors = out.pop("errors")
        for key, value in out.items():
            if len(key) == 3:
                assert value == key[1], key  # the master is as precise as the model
            else:
                assert value < (1e-6 if key[1] == torch.float32 else 1e-14), (key, value)
        assert len(errors) == 3
        assert "were frozen when this ZeroOptimizer was built" in errors[0]
        assert "cannot add a parameter group" in errors[1]
        assert "state 'momentum_buffer' of parameter 2 has shape (3,), the parameter (6,)" in errors[2]


def bad_inputs():
    model = nn.Linear(2, 2)
    errors = value_errors(lambda: ZeroOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, stage=3),
                          lambda: ZeroOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, stage=1, bucket_cap_mb=0),
                          lambda: ZeroOptimizer(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1)))
    opt = ZeroOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    return errors + value_errors(lambda: opt.load_state_dict({"state": {}, "param_groups": [{"params": [0],
                                                                                           "lr": 0.1}]}))


def test_bad_input_is_a_clear_error():
    errors = launch(bad_inputs, 1)[0]
    assert len(errors) == 4
    assert "stages 1 and 2" in errors[0] and "fully_shard" in errors[0]
    assert "bucket_cap_mb must be positive" in errors[1]
    assert "must be a torch.optim.Optimizer class" in errors[2]
    assert "parameter groups of [1] tensors, this optimizer [2]" in errors[3]


def test_bench_zero_prints_its_ratio(tmp_path, capsys):
    import json
    from minidist.__main__ import main
    token_ids()  # tokenized once here: the forked ranks inherit it
    assert main(["bench", "zero", "--steps", "1", "--warmup", "0", "--json", str(tmp_path / "b.json")]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert all(0 < result[k] < 60 for k in ("minidist_s", "reference_s", "stage2_s"))  # each variant ran a step
    out = capsys.readouterr().out
    assert "ZeroRedundancyOptimizer" in out and f"ratio {result['ratio']:.3f}" in out
    for key in ("reference_phases", "minidist_phases", "stage2_phases"):  # where each variant's step goes
        assert set(result[key]) == {"forward_backward", "reduce_scatter", "step"}
        assert all(0 <= t < 60 for t in result[key].values()) and result[key]["forward_backward"] > 0
    assert result["reference_phases"]["reduce_scatter"] < 1e-3  # no unscale_ to call: nothing timed
    assert "where the time goes" in out


@pytest.mark.parametrize("strategy", ["zero2", "fsdp"])
def test_example_script_trains(strategy):
    from minidist.examples.train import parse, train
    token_ids()  # tokenized once here: the forked ranks inherit it
    for r in launch(train, 2, parse(["--strategy", strategy, "--steps", "20", "--quiet"])):
        assert r["last_loss"] < r["first_loss"] - 0.5
        assert r["replica_divergence"] == (0.0 if strategy == "zero2" else None)  # fsdp: no replicas, shards


def stage2_reduces_during_backward():
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage=2, lr=ADAM_LR, bucket_cap_mb=0.01)
    x, y = BATCHES[0]
    early = []
    for _ in range(3):  # the first backward learns how often each hook fires; later ones launch buckets early
        lm_loss(model(x), y).backward()
        compute_end = opt.reducer.events[0][2]
        early.append([launched < compute_end for _, launched, _ in opt.reducer.events[1:]])
        opt.step()
        opt.zero_grad()
    return early, len(opt.buckets), all(p.grad is None for p in model.parameters())


def test_stage2_reduce_scatters_buckets_while_backward_runs():
    early, buckets, no_full_gradients = launch(stage2_reduces_during_backward, 2)[0]
    assert buckets > 4 and no_full_gradients
    assert not any(early[0])                       # first backward: everything at the end
    assert all(sum(step) >= buckets // 2 for step in early[1:])  # then most buckets leave before backward ends


def stage2_with_an_empty_rank(steps: int = 3):
    """Each step one rank has an empty batch; given the model, ZeroOptimizer's sink makes it reduce-scatter zeros."""
    r, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = SkipWhenEmpty()
    reference = copy.deepcopy(model)
    opt = ZeroOptimizer(model.parameters(), torch.optim.SGD, stage=2, module=model, lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(steps):
        xs = [torch.randn(4, 4, generator=torch.Generator().manual_seed(step))[:0 if k == step % n else 4]
              for k in range(n)]
        model(xs[r]).backward()
        opt.step()
        opt.zero_grad()
        (sum(reference(x) for x in xs) / n).backward()  # one process: the mean over ranks of their losses
        ref_opt.step()
        ref_opt.zero_grad()
    return max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize("world_size", [2, 3])
def test_stage_2_given_the_model_survives_a_rank_whose_backward_reaches_no_parameter(world_size):
    for diff in launch(stage2_with_an_empty_rank, world_size, timeout=30):
        assert diff < 1e-6


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return y, y.detach().mean()  # a detached statistic


def sink_side_effects():
    """module=: torch.autograd.grad through the outputs on rank 0 only (a saliency map) sends nothing; a detached
    output stays detached; a newer optimizer on the same parameters frees the old one and its forward hook."""
    import gc
    import weakref
    torch.manual_seed(0)
    model = TwoOutputs()
    opt = ZeroOptimizer(model.parameters(), torch.optim.SGD, stage=2, module=model, lr=0.1)
    detached = []
    for step in range(3):
        x = torch.randn(4, 4, generator=torch.Generator().manual_seed(step)).requires_grad_()
        out, stat = model(x)
        detached.append(not stat.requires_grad)
        if dist.get_rank() == 0:
            torch.autograd.grad(out.sum(), x, retain_graph=True)
        out.sum().backward()
        opt.step()
        opt.zero_grad()
    old = weakref.ref(opt)
    ZeroOptimizer(model.parameters(), torch.optim.SGD, stage=2, module=model, lr=0.1)
    del opt
    gc.collect()
    return [p.detach().clone() for p in model.parameters()], all(detached), old() is None, len(model._forward_hooks)


def test_stage_2_sink_leaves_autograd_grad_and_detached_outputs_alone_and_lets_a_replaced_optimizer_go():
    results = launch(sink_side_effects, 2, timeout=30)
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))  # replicas stayed in step
    for _, detached, freed, hooks in results:
        assert detached and freed and hooks == 1
