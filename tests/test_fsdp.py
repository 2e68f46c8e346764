"""FSDP (fully_shard): the lifecycle by hand, FSDP2 side by side, bytes and memory of a step, one unit gathered at a
time, prefetching, full state dicts, accumulation, and the errors."""
import copy
import gc
import math
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from minidist import launch
from minidist.data import token_ids
from minidist.fsdp import clip_grad_norm_, full_state_dict, fully_shard, reshard_, unshard_
from minidist.grading import implementation
from minidist.memory import measure_state_bytes
from minidist.models import GPT, count_params, lm_loss
from minidist.tour.data_parallel import BATCHES, BF16_TOL, CFG, SGD_TOL
from minidist.tour.fsdp import PEAK_CFG, against_fsdp2, late_prefetches, per_block, recomputed_against_one_process, timeline
from minidist.tour.zero import states_and_bytes
from minidist.testing import value_errors


def unshard_by_hand():
    n, rank = dist.get_world_size(), dist.get_rank()
    full = torch.empty(2 * n)
    view = full[2:4]  # a "parameter": a view of the gathered buffer
    reshard_(full)
    work = implementation("fsdp_unshard")(full, torch.tensor([10.0 * rank, 10.0 * rank + 1]), None)
    work.wait()
    return full.clone(), view.clone()


@pytest.mark.exercise("fsdp_unshard")
def test_unshard_gathers_into_the_freed_tensor():
    for gathered, view in launch(unshard_by_hand, 3):
        assert torch.equal(gathered, torch.tensor([0.0, 1, 10, 11, 20, 21]))
        assert torch.equal(view, torch.tensor([10.0, 11]))  # every view sees the gathered memory


def unshard_two_units():
    """Two units unsharded back to back under a slow link (a unit and the one prefetched after it)."""
    from minidist import comm
    from minidist.testing import issue_log
    n, rank = dist.get_world_size(), dist.get_rank()
    fulls = [torch.empty(2 * n), torch.empty(n, dtype=torch.bfloat16)]
    for full in fulls:
        reshard_(full)
    with comm.ring_backend(comm.SimulatedLink(alpha=0.02, bandwidth=1e9)), issue_log() as pending:
        unshard = implementation("fsdp_unshard")
        works = [unshard(fulls[0], torch.tensor([rank, 10.0 + rank]), None),
                 unshard(fulls[1], torch.tensor([rank], dtype=torch.bfloat16), None)]
        for w in works:
            w.wait()
    return pending, [f.clone() for f in fulls]


@pytest.mark.exercise("fsdp_unshard")
def test_unshard_returns_while_its_all_gather_runs():
    for pending, (first, second) in launch(unshard_two_units, 3):
        assert pending == [0, 1], f"collectives still running when each was issued: {pending} (unshard waited)"
        assert torch.equal(first, torch.tensor([0.0, 10, 1, 11, 2, 12]))
        assert torch.equal(second, torch.tensor([0, 1, 2], dtype=torch.bfloat16))


def reshard_by_hand():
    full = torch.empty(2 * dist.get_world_size())
    view = full[2:4]
    unshard_(full, torch.ones(2)).wait()
    before = full.untyped_storage().nbytes()
    implementation("fsdp_reshard")(full)
    after, shape = full.untyped_storage().nbytes(), tuple(view.shape)
    unshard_(full, torch.full((2,), 3.0)).wait()  # the same tensors can be gathered into again
    return before, after, shape, view.clone()


@pytest.mark.exercise("fsdp_reshard")
def test_reshard_frees_the_memory_and_keeps_the_tensors():
    for before, after, shape, view in launch(reshard_by_hand, 2):
        assert before == 16 and after == 0 and shape == (2,)
        assert torch.equal(view, torch.full((2,), 3.0))


def reduce_scatter_by_hand():
    rank = dist.get_rank()
    grads = [torch.full((2, 2), float(rank + 1)), None, torch.arange(3.0) * (rank + 1)]
    work = implementation("fsdp_post_backward")(grads, [4, 3, 3], 4, torch.float32, None)
    huge = [torch.full((2, 2), 2e38), None, torch.full((3,), 2e38)]  # 3 x 2e38 is past fp32's largest, 3.4e38
    return work.wait(), implementation("fsdp_post_backward")(huge, [4, 3, 3], 4, torch.float32, None).wait()


@pytest.mark.exercise("fsdp_post_backward")
def test_post_backward_reduce_scatter_by_hand():
    # 4 + 3 + 3 = 10 elements padded to 12 on 3 ranks: [g0 g0 g0 g0 | 0 0 0 g2 | g2 g2 pad pad], averaged over ranks
    expected = torch.tensor([2.0, 2, 2, 2, 0, 0, 0, 0, 2, 4, 0, 0]).chunk(3)
    huge = torch.tensor([2e38] * 4 + [0.0] * 3 + [2e38] * 3 + [0.0] * 2).chunk(3)
    for rank, (shard, averaged) in enumerate(launch(reduce_scatter_by_hand, 3)):
        assert shard.dtype == torch.float32 and torch.equal(shard, expected[rank])
        assert torch.allclose(averaged, huge[rank], rtol=1e-5), "the sum overflowed: divide by N before summing"


@pytest.mark.exercise("fsdp_prefetch")
def test_prefetch_target():
    prefetch_target = implementation("fsdp_prefetch")
    order = ["root", "b0", "b1", "b2"]
    assert [prefetch_target(order, u) for u in order] == ["b0", "b1", "b2", None]
    assert prefetch_target(order[::-1], "b1") == "b0"
    assert prefetch_target(order, "unseen") is None and prefetch_target([], "root") is None


def test_against_fsdp2_fp32_and_bf16():
    for r in launch(against_fsdp2, 2):
        assert r[None] < SGD_TOL and r[torch.bfloat16] < BF16_TOL


def test_bytes_and_memory_of_a_step_with_padding():
    """Stage 3 as one unit, per-block units, and without resharding after forward; CFG's sizes divide nothing: the
    bytes and every category of memory, summed over the ranks, equal the padded formulas exactly."""
    n, model = 3, GPT(CFG)
    psi, tensors = count_params(model), len(list(model.parameters()))
    # each parameter sharded on dim 0, ceil(d0 / N) rows per rank: padded to N * ceil(d0 / N) rows, however the
    # parameters are grouped in units
    size = sum(n * math.ceil(p.shape[0] / n) * p[0].numel() for p in model.parameters())
    assert size > psi  # CFG's dims 0 divide nothing: padding
    padded = dict.fromkeys(("zero3", "fsdp", "fsdp-keep"), size)
    results = launch(states_and_bytes, n, tuple(padded), CFG)
    for s, size in padded.items():
        gathers = 3 if s != "fsdp-keep" else 2  # forward, backward (unless kept), and the reduce-scatter
        sent = {op: sum(r[s]["bytes"].get(op, 0) for r in results) for op in ("all_gather", "reduce_scatter")}
        assert sent["all_gather"] + sent["reduce_scatter"] == gathers * (n - 1) * 2 * size, s  # bf16: 2 bytes
        assert sum(r[s]["bytes"]["all_reduce"] for r in results) == 2 * (n - 1) * 4 * tensors  # an int32 flag each
        assert all(r[s]["counted"] for r in results)
        # fp32 shards and fp32 gradient shards (4 + 4 bytes per padded element), AdamW moments (8 per element): the
        # formula's 2 + 2 + 12 split differently, with the same total 16Ψ/N (plus the padding)
        measured = [sum(getattr(r[s]["states"], k) for r in results) for k in ("params", "grads", "optimizer")]
        assert measured == [4 * size, 4 * size, 8 * psi], (s, measured)


def test_one_unit_gathered_at_a_time_plus_the_prefetched_one():
    prefetching, first_step = launch(timeline, 2)[0], launch(timeline, 2, PEAK_CFG, None, 1)[0]
    kept = launch(timeline, 2, PEAK_CFG, None, 1, 4, False)[0]  # reshard_after_forward=False
    assert kept["peak"] == sum(kept["units"].values())  # every unit gathered at the end of forward
    block, root = prefetching["units"]["blocks.0"], prefetching["units"]["root"]
    assert len(prefetching["units"]) == PEAK_CFG.n_layer + 1
    assert prefetching["peak"] == root + 2 * block
    assert late_prefetches(prefetching["events"]) == 0
    # The first forward learns the order of the units: nothing is prefetched in it, every block's gather is late.
    assert late_prefetches(first_step["events"]) == PEAK_CFG.n_layer


def state_dict_and_accumulation():
    torch.manual_seed(0)
    model = GPT(CFG)
    reference = copy.deepcopy(model)
    sharded = per_block(model, reshard_after_forward=False)
    names_and_values = full_state_dict(sharded)
    same_start = list(names_and_values) == list(reference.state_dict()) and all(
        torch.equal(names_and_values[k], v) for k, v in reference.state_dict().items())
    n, rank = dist.get_world_size(), dist.get_rank()
    opt, ref_opt = torch.optim.SGD(sharded.parameters(), lr=0.1), torch.optim.SGD(reference.parameters(), lr=0.1)
    x, y = BATCHES[0]
    lm_loss(reference(x), y).backward()
    ref_opt.step()
    for xm, ym in zip(x.chunk(n)[rank].chunk(2), y.chunk(n)[rank].chunk(2)):  # two micro-steps, one step
        (lm_loss(sharded(xm), ym) / 2).backward()
    opt.step()
    trained = full_state_dict(sharded)
    diff = max((trained[k] - v).abs().max().item() for k, v in reference.state_dict().items())
    return same_start, diff, {k: tuple(p.shape) for k, p in sharded.named_parameters()}, \
        sum(p.numel() for p in sharded.parameters())


def test_full_state_dict_and_gradient_accumulation():
    results = launch(state_dict_and_accumulation, 3)
    full = dict(GPT(CFG).named_parameters())
    for rank, (same_start, diff, shapes, _) in enumerate(results):
        assert same_start and diff < SGD_TOL
        assert list(shapes) == list(full)  # the same names, in the same order
        for k, p in full.items():  # this rank's dim-0 rows: same ndim, ceil(d0 / N) rows (fewer on the last ranks)
            per = math.ceil(p.shape[0] / 3)
            rows = min(p.shape[0], (rank + 1) * per) - min(p.shape[0], rank * per)
            assert shapes[k] == (rows, *p.shape[1:]), k
    assert sum(r[3] for r in results) == count_params(GPT(CFG))  # each element on exactly one rank


class TwoDtypes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2).double()


def bad_inputs():
    model = GPT(CFG)
    fully_shard(model.blocks[0])
    errors = value_errors(lambda: fully_shard(model.blocks[0]), lambda: fully_shard(TwoDtypes()),
                          lambda: fully_shard(nn.Linear(2, 2), param_dtype=torch.int8))
    tied = GPT(CFG)
    tied.blocks[0].mlp.fc.weight = tied.blocks[1].mlp.fc.weight  # one parameter in two blocks
    fully_shard(tied.blocks[1])
    root_first = fully_shard(GPT(CFG))
    return errors + value_errors(lambda: fully_shard(tied.blocks[0]), lambda: fully_shard(root_first.blocks[0]))


def test_bad_input_is_a_clear_error():
    errors = launch(bad_inputs, 1)[0]
    assert len(errors) == 5
    assert "already sharded" in errors[0]
    assert "must share a dtype" in errors[1] and "torch.float64" in errors[1]
    assert "must be floating-point" in errors[2]
    assert "mlp.fc.weight is already sharded by another fully_shard unit" in errors[3]
    assert "already sharded by an enclosing fully_shard unit" in errors[4] and "inner modules" in errors[4]


def test_bench_fsdp_prints_its_ratio(tmp_path, capsys):
    import json
    from minidist.__main__ import main
    token_ids()  # tokenized once here: the forked ranks inherit it
    assert main(["bench", "fsdp", "--steps", "1", "--warmup", "0", "--json", str(tmp_path / "b.json")]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert all(0 < result[k] < 60 for k in ("minidist_s", "reference_s", "one_unit_s"))  # each variant ran a step
    out = capsys.readouterr().out
    assert "FSDP2" in out and f"ratio {result['ratio']:.3f}" in out



class Branchy(nn.Module):
    """`never` is used by no rank; `twice` applies `a` two times (a weight shared across depth)."""

    def __init__(self, twice=False):
        super().__init__()
        self.a, self.never, self.b, self.twice = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1), twice

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(torch.tanh(self.a(h)) if self.twice else h)


def unused_clipped_and_freed():
    """AdamW with weight decay, a parameter no rank uses, clipping: against one process; then what zero_grad frees."""
    torch.manual_seed(0)
    model = Branchy()
    reference, start = copy.deepcopy(model), copy.deepcopy(model)
    fully_shard(model.a)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.1)
    n, rank, norms = dist.get_world_size(), dist.get_rank(), []
    for step in range(3):
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(step))
        model(x.chunk(n)[rank]).pow(2).mean().backward()
        reference(x).pow(2).mean().backward()
        norms.append((clip_grad_norm_(model, 0.01), torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01)))
        shards = [weakref.ref(p.grad._base) for p in model.parameters() if p.grad is not None and p.grad._base is not None]
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    gc.collect()
    full = full_state_dict(model)
    return {"diff": max((full[k] - v).abs().max().item() for k, v in reference.state_dict().items()),
            "never moved": max((full[k] - v).abs().max().item() for k, v in start.state_dict().items()
                               if k.startswith("never")),
            "norms": norms, "grads after zero_grad": measure_state_bytes(model, opt).grads,
            "shards alive": sum(r() is not None for r in shards), "shards": len(shards)}


def test_unused_parameters_clipping_and_gradient_shards_freed():
    for out in launch(unused_clipped_and_freed, 2):
        assert out["never moved"] == 0.0  # no gradient on any rank: no AdamW step, no weight decay
        assert out["diff"] < 0.01 * 0.01 * 3  # README: 1% of the most Adam moves a weight in 3 steps
        assert all(theirs > 0.01 and abs(ours - theirs) < 1e-6 * theirs for ours, theirs in out["norms"])
        assert out["grads after zero_grad"] == 0 and out["shards"] > 0 and out["shards alive"] == 0


def used_twice(which):
    torch.manual_seed(0)
    if which == "module applied twice":
        model = Branchy(twice=True)
        fully_shard(model.a)
        fully_shard(model)
        loss = model(torch.randn(4, 4)).sum()
    else:  # two forwards of the whole model, one backward of the summed losses
        model = per_block(GPT(CFG))
        x = torch.randint(CFG.vocab_size, (2, 8))
        loss = lm_loss(model(x), x) + lm_loss(model(x.flip(1)), x)
    try:
        loss.backward()
    except RuntimeError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("which", ["module applied twice", "two forwards, one backward"])
def test_a_unit_used_twice_in_one_backward_is_refused(which):
    for message in launch(used_twice, 2, which):
        assert "ran forward more than once for one backward" in message


def frozen_bottom():
    """Fine-tuning: embeddings and block 0 frozen; per-block units against one process (SGD). Backward never reaches
    block 0: nothing may stay gathered after a step, and from the second step on block 0 is not prefetched."""
    torch.manual_seed(0)
    model = GPT(PEAK_CFG)
    for p in [*model.blocks[0].parameters(), model.wpe.weight, model.wte.weight]:
        p.requires_grad_(False)
    reference = copy.deepcopy(model)
    per_block(model)
    n, rank = dist.get_world_size(), dist.get_rank()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ref_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.1)
    for step in range(3):
        x = torch.randint(PEAK_CFG.vocab_size, (4, 16), generator=torch.Generator().manual_seed(step))
        model.fsdp_unit.events.clear()
        for m, o, xb in ((model, opt, x.chunk(n)[rank]), (reference, ref_opt, x)):
            lm_loss(m(xb), xb).backward()
            o.step()
            o.zero_grad()
    held = sum(m.fsdp_unit.full_flat.untyped_storage().nbytes() for m in model.modules()
               if getattr(m, "fsdp_unit", None) is not None)
    gathers = sum(what == "all-gather blocks.0" for what, _, _ in model.fsdp_unit.events)
    full = full_state_dict(model)
    return max((full[k] - v).abs().max().item() for k, v in reference.state_dict().items()), held, gathers


def test_frozen_unit_is_resharded_and_not_prefetched_for_backward():
    for diff, held, gathers in launch(frozen_bottom, 2):
        assert diff < SGD_TOL and held == 0 and gathers == 1  # block 0: one all-gather, for forward


def state_dict_while_gathered():
    torch.manual_seed(0)
    model = Branchy()
    start = copy.deepcopy(model).state_dict()
    fully_shard(model, param_dtype=torch.bfloat16, reshard_after_forward=False)
    model(torch.randn(2, 4))  # a forward in grad mode (a metric): the unit stays gathered, in bf16
    full = full_state_dict(model)
    return {k: v.dtype for k, v in full.items()}, max((full[k] - v).abs().max().item() for k, v in start.items())


def test_full_state_dict_is_fp32_while_a_unit_is_gathered():
    for dtypes, diff in launch(state_dict_while_gathered, 2):
        assert set(dtypes.values()) == {torch.float32} and diff == 0.0


@pytest.mark.parametrize("how", ["non-reentrant", "reentrant", "minidist"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_recomputation_in_backward_trains_as_one_process(how, world_size):
    for out in launch(recomputed_against_one_process, world_size, how):
        assert out["block 0 moved"] > 1e-3  # it trained (the recomputation bug left the blocks where they started)
        assert out["diff"] < SGD_TOL and out["held"] == 0


@pytest.mark.exercise("fsdp_pre_backward")
def test_pre_backward_detection_by_hand():
    from types import SimpleNamespace
    from minidist.fsdp.state import TrainingState as S
    reached = implementation("fsdp_pre_backward")
    unit = SimpleNamespace(name="blocks.1", training_state=S.IDLE, backward_use=None)
    assert reached(unit, 4) is True and unit.training_state is S.PRE_BACKWARD and unit.backward_use == 4
    assert reached(unit, 4) is False and unit.training_state is S.PRE_BACKWARD     # a second output
    unit.training_state = S.POST_BACKWARD                                           # gradients already sent:
    assert reached(unit, 4) is False and unit.training_state is S.POST_BACKWARD     # a recomputed output
    with pytest.raises(RuntimeError, match=r"'blocks.1' ran forward more than once for one backward"):
        reached(unit, 5)
    fresh = SimpleNamespace(name="root", training_state=S.IDLE, backward_use=None)
    with pytest.raises(RuntimeError, match="more than once"):
        reached(fresh, 1), reached(fresh, 2)


def recomputation_with_learners_detection():
    import minidist.fsdp.units as units
    units.backward_reached = implementation("fsdp_pre_backward")   # what pre_backward calls, in this process only
    return recomputed_against_one_process("reentrant"), used_twice("two forwards, one backward")


@pytest.mark.exercise("fsdp_pre_backward")
def test_pre_backward_detection_under_recomputation_and_a_unit_used_twice():
    for out, message in launch(recomputation_with_learners_detection, 2):
        assert out["block 0 moved"] > 1e-3 and out["diff"] < SGD_TOL and out["held"] == 0
        assert "ran forward more than once for one backward" in message


def _layout_by_hand(n, shapes):
    """A unit's layout worked out from the chapter's rule: ceil(d0 / N) rows per slot, slots end to end."""
    from types import SimpleNamespace
    pads = [-(-s[0] // n) for s in shapes]
    sizes = [k * math.prod(s[1:]) for k, s in zip(pads, shapes)]
    offsets = [sum(sizes[:i]) for i in range(len(shapes))]
    return SimpleNamespace(n=n, shapes=shapes, pads=pads, sizes=sizes, offsets=offsets, chunk=sum(sizes))


@pytest.mark.exercise("fsdp_copy_out")
def test_copy_out_by_hand():
    copy_out = implementation("fsdp_copy_out")
    unit = _layout_by_hand(3, [(4, 2), (2,), (1, 3)])   # slots of 2, 1, 1 rows: 4 + 1 + 3 = 8 elements per rank
    a, b, c = torch.arange(8.0).view(4, 2), torch.tensor([100.0, 101.0]), torch.tensor([[7.0, 8.0, 9.0]])
    pad = -1.0
    gathered = torch.tensor([0, 1, 2, 3, 100, 7, 8, 9,            # rank 0: a rows 0-1, b row 0, c row 0
                             4, 5, 6, 7, 101, pad, pad, pad,       # rank 1: a rows 2-3, b row 1, c padding
                             pad, pad, pad, pad, pad, pad, pad, pad])  # rank 2: padding only
    out = copy_out(gathered, unit)
    assert [t.shape for t in out] == [(4, 2), (2,), (1, 3)]
    assert torch.equal(out[0], a) and torch.equal(out[1], b) and torch.equal(out[2], c)
    into = [torch.zeros(3 * k, *s[1:]) for k, s in zip(unit.pads, unit.shapes)]
    out = copy_out(gathered, unit, into)
    assert all(o.data_ptr() == buf.data_ptr() for o, buf in zip(out, into))   # views of the given buffers
    assert torch.equal(into[0][:4], a) and torch.equal(into[1][:2], b) and torch.equal(into[2][:1], c)


def fsdp_with_learners_copy_out():
    import minidist.fsdp.state as state
    import minidist.fsdp.units as units
    units.copy_out = state.copy_out = implementation("fsdp_copy_out")   # in this process only
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2), nn.Linear(2, 2))  # 7 rows: padded on 2
    reference = copy.deepcopy(model)
    for m in (model[0], model[2], model):
        fully_shard(m)
    n, rank = dist.get_world_size(), dist.get_rank()
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(reference.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(6, 5, generator=g)
        for m, o, xb in ((model, opt, x.chunk(n)[rank]), (reference, ref_opt, x)):
            ((m(xb) - 1) ** 2).sum().div(len(xb)).backward()   # a mean: FSDP averages over ranks
            o.step()
            o.zero_grad()
    full = full_state_dict(model)
    return max((full[k] - v).abs().max().item() for k, v in reference.state_dict().items())


@pytest.mark.exercise("fsdp_copy_out")
def test_fsdp_with_copy_out_trains_as_one_process():
    assert max(launch(fsdp_with_learners_copy_out, 2)) < SGD_TOL


class Mixed(nn.Module):
    """A tied embedding / output layer (one unit), a frozen layer, LayerNorms (1-D), and a layer 2 rows deep (fewer
    rows than ranks: some ranks hold none of it)."""

    def __init__(self):
        super().__init__()
        self.emb, self.frozen = nn.Embedding(10, 6), nn.Linear(6, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Tanh())
        self.narrow, self.head = nn.Linear(6, 2), nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight
        self.frozen.requires_grad_(False)

    def forward(self, idx):
        h = self.block(self.frozen(self.emb(idx)))               # (B, T, 6)
        return self.head(h + self.narrow(h).sum(-1, keepdim=True))  # (B, T, 10)


def adamw_groups(model) -> list[dict]:
    """The usual recipe: weight decay on matrices only (p.ndim >= 2), none on biases and norms."""
    trained = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trained if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in trained if p.ndim < 2], "weight_decay": 0.0}]


def per_ndim_adamw():
    torch.manual_seed(0)
    model = Mixed()
    reference, start = copy.deepcopy(model), copy.deepcopy(model).state_dict()
    fully_shard(model.block)
    fully_shard(model.narrow)
    fully_shard(model)
    opt = torch.optim.AdamW(adamw_groups(model), lr=0.01)
    ref_opt = torch.optim.AdamW(adamw_groups(reference), lr=0.01)
    n, rank = dist.get_world_size(), dist.get_rank()
    for step in range(3):
        idx = torch.randint(10, (12, 5), generator=torch.Generator().manual_seed(step))
        for m, o, x in ((model, opt, idx.chunk(n)[rank]), (reference, ref_opt, idx)):
            nn.functional.cross_entropy(m(x).flatten(0, 1), x.flatten()).backward()
            o.step()
            o.zero_grad()
    full = full_state_dict(model)
    return {"groups": [[(tuple(p.shape), p.ndim) for p in g["params"]] for g in opt.param_groups],
            "ref groups": [[p.ndim for p in g["params"]] for g in ref_opt.param_groups],
            "names": [k for k, _ in model.named_parameters()], "ref names": [k for k, _ in reference.named_parameters()],
            "diff": max((full[k] - v).abs().max().item() for k, v in reference.state_dict().items()),
            "frozen moved": max((full[k] - start[k]).abs().max().item() for k in start if k.startswith("frozen")),
            "narrow rows": tuple(model.narrow.weight.shape), "keys": list(full) == list(reference.state_dict())}


@pytest.mark.parametrize("world_size", [3, 4])
def test_per_ndim_adamw_groups_tied_frozen_and_a_dim_smaller_than_n(world_size):
    for rank, out in enumerate(launch(per_ndim_adamw, world_size)):
        assert out["names"] == out["ref names"] and out["keys"]
        assert [[d for _, d in g] for g in out["groups"]] == out["ref groups"]  # each parameter in the same group
        assert out["narrow rows"] == ((1 if rank < 2 else 0), 6)  # 2 rows over N ranks: one each on ranks 0 and 1
        assert out["frozen moved"] == 0.0
        assert out["diff"] < 0.01 * 0.01 * 3  # README: 1% of the most Adam moves a weight in 3 steps


def test_hsdp_2x2_against_one_process_and_fsdp2():
    """4 ranks as 2 replicas x 2 shards: weights equal one process and FSDP2's HSDP on a 2-D DeviceMesh; each rank
    holds half the rows (sharded over 2, not 4); the bytes of a step equal the ring formulas per axis."""
    from minidist.tour.hsdp import hsdp_against, hsdp_bytes_formula
    results = launch(hsdp_against, 4, 2)
    full = dict(GPT(CFG).named_parameters())
    for out in results:
        assert out["one process"] < SGD_TOL and out["FSDP2"] < SGD_TOL
        assert out["shapes"]["wte.weight"] == (full["wte.weight"].shape[0] // 2, CFG.n_embd)
        assert out["bytes"] == hsdp_bytes_formula(out["psi"], out["tensors"], 2, 2)


def test_two_level_network_fsdp_crosses_nodes_hsdp_only_for_the_replica_all_reduce():
    """4 ranks as 2 nodes x 2 (comm.SimulatedLink(ranks_per_node=2)): bytes counted on the link as crossing nodes,
    per rank, against the formulas; HSDP holds twice FSDP's model states (sharded over 2, not 4)."""
    from minidist import comm
    from minidist.tour.hsdp import two_level_network
    from minidist.tour.zero import bytes_formula
    link = comm.SimulatedLink(ranks_per_node=2, inter_alpha=1e-4, inter_bandwidth=1e9)
    results = launch(two_level_network, 4, link)
    psi, tensors = results[0]["psi"], results[0]["tensors"]
    for rank, out in enumerate(results):
        fsdp, hsdp = out["FSDP"], out["HSDP"]
        # FSDP's ring over 0 -> 1 -> 2 -> 3 -> 0: ranks 1 and 3 send every byte to the other node, 0 and 2 none
        assert fsdp["bytes"] == bytes_formula("fsdp", psi, tensors, 4, element=4)  # 3(N-1)/N bΨ + flags
        assert fsdp["crossed"] == (fsdp["bytes"] if rank in (1, 3) else 0)
        # HSDP: only the all-reduces over the replicate axis (each rank's gradient shard, the flags) cross
        assert hsdp["crossed"] == comm.ring_bytes("all_reduce", 4 * psi // 2, 2) + comm.ring_bytes("all_reduce",
                                                                                                  4 * tensors, 2)
        assert hsdp["states"] == 2 * fsdp["states"] == 2 * 4 * psi // 4  # fp32 shards (after zero_grad, SGD: no more)


def test_a_two_level_link_prices_each_message_by_its_ends():
    from minidist import comm
    link = comm.SimulatedLink(alpha=1.0, bandwidth=10.0, ranks_per_node=2, inter_alpha=5.0, inter_bandwidth=2.0)
    assert link.seconds(10, 0, 1) == 2.0 and link.seconds(10, 1, 2) == 10.0 and link.seconds(10) == 2.0
    assert link.crosses(3, 0) and not link.crosses(2, 3)
    with pytest.raises(ValueError, match="ranks_per_node"):
        comm.SimulatedLink(ranks_per_node=0)
