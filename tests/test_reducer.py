"""The gradient-reduction engine under DataParallel's edge cases, and its reduce-scatter mode (ZeRO-2's)."""
import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minidist import comm, launch
from minidist.data_parallel import DataParallel, global_mean_loss
from minidist.data_parallel.buckets import MiB
from minidist.data_parallel.reducer import GradReducer
from minidist.grading import implementation
from minidist.models import GPT, lm_loss
from minidist.testing import replica_divergence
from minidist.tour.data_parallel import BATCHES, CFG, SGD_TOL


def train_side_by_side(build, batches_for_rank, steps, loss_fn, dp_kwargs=None, lr=0.1):
    """DataParallel on each rank's batches next to one process on all ranks' batches; returns (diff, divergence)."""
    n, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    reference = build()
    torch.manual_seed(0)
    dp = DataParallel(build(), **(dp_kwargs or {}))
    ref_opt, opt = torch.optim.SGD(reference.parameters(), lr=lr), torch.optim.SGD(dp.parameters(), lr=lr)
    for step in range(steps):
        everyone = [batches_for_rank(step, r) for r in range(n)]
        total = sum(len(x) for x, _ in everyone)
        ref_loss = sum(loss_fn(reference, x, y) for x, y in everyone) / total  # the global-batch mean
        ref_loss.backward()
        x, y = everyone[rank]
        global_mean_loss(loss_fn(dp, x, y), len(x)).backward()
        for o in (ref_opt, opt):
            o.step()
            o.zero_grad()
    diff = max((a - b).abs().max().item() for a, b in zip(reference.parameters(), dp.module.parameters()))
    return diff, replica_divergence(dp)


def summed_lm_loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum") / x.shape[1]


def empty_on_some_steps(step, rank):
    x, y = BATCHES[step]
    if (rank + step) % 2:  # odd ranks start empty, then take turns
        return x[:0], y[:0]
    return x[:3 + rank], y[:3 + rank]


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_rank_with_an_empty_batch_neither_hangs_nor_pairs_with_the_next_step(world_size):
    for diff, divergence in launch(train_side_by_side, world_size, lambda: GPT(CFG), empty_on_some_steps, 4,
                                   summed_lm_loss, dict(bucket_cap_mb=0.01)):
        assert diff < SGD_TOL and divergence == 0.0


class SkipWhenEmpty(nn.Module):
    """A model whose output, for an empty input, is a constant: that rank's backward reaches no parameter."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x).sum() if len(x) else x.new_zeros(())


def skip_batches(step, rank):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(4, 4, generator=g)
    return (x[:0], None) if rank == step % 2 else (x, None)


def test_a_loss_that_reaches_no_parameter_still_communicates():
    for diff, divergence in launch(train_side_by_side, 2, SkipWhenEmpty, skip_batches, 3,
                                   lambda m, x, y: m(x), dict(bucket_cap_mb=None)):
        assert diff < SGD_TOL and divergence == 0.0


class SharedTwice(nn.Module):
    """One block applied twice, each under reentrant checkpointing: its gradient hooks fire twice per backward."""

    def __init__(self):
        super().__init__()
        self.emb, self.block, self.head = nn.Embedding(16, 32), nn.Linear(32, 32), nn.Linear(32, 16)

    def forward(self, x):
        h = self.emb(x)
        for _ in range(2):
            h = checkpoint(lambda t: torch.tanh(self.block(t)), h, use_reentrant=True)
        return self.head(h)


def shared_batches(step, rank):
    g = torch.Generator().manual_seed(10 * step + rank)
    x = torch.randint(16, (3, 5), generator=g)
    return x, torch.randint(16, (3, 5), generator=g)


def test_hooks_that_fire_twice_per_backward_count_once():
    for diff, divergence in launch(train_side_by_side, 2, SharedTwice, shared_batches, 4, summed_lm_loss,
                                   dict(bucket_cap_mb=0.002)):
        assert diff < SGD_TOL and divergence == 0.0


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.w = nn.Parameter(torch.randn(16, 8).t())  # (8, 16), not contiguous

    def forward(self, x):
        return self.emb(x) @ self.w


def test_non_contiguous_parameters():
    assert not Transposed().w.is_contiguous()
    for diff, divergence in launch(train_side_by_side, 3, Transposed, shared_batches, 3, summed_lm_loss):
        assert diff < SGD_TOL and divergence == 0.0


def mixed_precision_model():
    model = GPT(CFG).bfloat16()
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.float()  # LayerNorm stays fp32 next to bf16 weights
    return model


class Upcast(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(x).float()


def mixed_dtypes():
    torch.manual_seed(0)
    dp = DataParallel(Upcast(mixed_precision_model()), bucket_cap_mb=0.01)
    reference = Upcast(mixed_precision_model())
    reference.load_state_dict(dp.module.state_dict())
    x, y = BATCHES[0]
    n, rank = dist.get_world_size(), dist.get_rank()
    with comm.ByteLedger() as ledger:
        for _ in range(2):
            dp.zero_grad(set_to_none=False)
            lm_loss(dp(x.chunk(n)[rank]), y.chunk(n)[rank]).backward()
    lm_loss(reference(x), y).backward()  # one process, the whole batch, the same precision
    diff = max((p.grad.float() - q.grad.float()).abs().max().item()
               for p, q in zip(dp.module.parameters(), reference.parameters()))
    dtypes = sorted({str(b.dtype) for b in dp.buckets})
    synced = max((p.grad - comm.broadcast(p.grad, 0)).abs().max().item() for p in dp.parameters())
    return dtypes, sorted({str(r.dtype) for r in ledger.records}), diff, synced


def test_mixed_dtypes_get_one_bucket_set_each():
    from minidist.tour.data_parallel import BF16_TOL
    for dtypes, sent, diff, synced in launch(mixed_dtypes, 2):
        assert dtypes == sent == ["torch.bfloat16", "torch.float32"]
        assert diff < BF16_TOL and synced == 0.0  # averaged like one process, bucket by bucket, in both dtypes


def remove_and_rewrap():
    model = GPT(CFG)
    first = DataParallel(model)
    with pytest.raises(ValueError, match="already wrapped"):
        DataParallel(model)
    first.remove()
    x, y = BATCHES[0]
    with comm.ByteLedger() as alone:
        lm_loss(model(x), y).backward()  # unhooked: a plain local backward
    model.zero_grad()
    second = DataParallel(model, bucket_cap_mb=0.05)
    with comm.ByteLedger() as wrapped:
        lm_loss(second(x[dist.get_rank()::2]), y[dist.get_rank()::2]).backward()
    return alone.count(), wrapped.count("all_reduce"), len(second.buckets)


def test_hooks_are_removable_and_a_module_can_be_wrapped_again():
    for alone, reduced, buckets in launch(remove_and_rewrap, 2):
        assert alone == 0 and reduced == buckets


class SlowBackward(torch.autograd.Function):
    """Identity whose backward takes 50 ms: backward computes long after the last layers' gradients are ready."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.05)
        return grad


class SlowStart(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.body, self.head = nn.Embedding(16, 64), nn.Sequential(*[nn.Linear(64, 64) for _ in range(3)]), \
            nn.Linear(64, 16)

    def forward(self, x):
        return self.head(self.body(SlowBackward.apply(self.emb(x))))


def timeline(overlap):
    torch.manual_seed(0)
    dp = DataParallel(SlowStart(), bucket_cap_mb=0.01, overlap=overlap)
    x = torch.randint(16, (4, 8))
    finished_early = []
    for _ in range(3):  # the first backward learns how often each hook fires; later ones overlap
        lm_loss(dp(x), x).backward()
        compute_end = dp.events[0][2]
        finished_early.append([end < compute_end for _, _, end in dp.events[1:]])
    return finished_early[1:], len(dp.buckets)


def test_overlap_completes_all_reduces_before_backward_ends():
    (overlapped, buckets), (after, _) = launch(timeline, 2, True)[0], launch(timeline, 2, False)[0]
    assert buckets == math.ceil(4 * sum(p.numel() for p in SlowStart().parameters()) / int(0.01 * MiB)) > 3
    for step in overlapped:  # every bucket but the embedding's was reduced while backward still computed
        assert all(step[:-1]), step
    assert not any(any(step) for step in after)


def reduce_scatter_mode():
    n, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = GPT(CFG)
    params = [p for p in model.parameters() if p.requires_grad]
    reducer = GradReducer(params, cap_bytes=int(0.02 * MiB), op="reduce_scatter")
    x, y = BATCHES[0]
    expected = []
    for _ in range(2):
        reducer.prepare_backward()
        lm_loss(reducer.attach(model(x.chunk(n)[rank])), y.chunk(n)[rank]).backward()
    held = [p.grad for p in params]
    reducer.remove()
    lm_loss(model(x), y).backward()  # one process, whole batch: the average over the ranks' halves
    for b in reducer.buckets:
        full = torch.zeros(b.stop - b.start)
        for i in b.params:
            _, offset = reducer.offsets[i]
            lo, hi = max(offset, b.start), min(offset + params[i].numel(), b.stop)
            full[lo - b.start:hi - b.start] = params[i].grad.reshape(-1)[lo - offset:hi - offset]
        padded = torch.cat([full, full.new_zeros(-len(full) % n)])
        expected.append((reducer.shards[b.index] - padded.chunk(n)[rank]).abs().max().item())
    return max(expected), all(g is None for g in held), [s.numel() for s in reducer.shards]


@pytest.mark.parametrize("world_size", [2, 3])
def test_reduce_scatter_mode_keeps_only_this_ranks_averaged_shard(world_size):
    for diff, dropped, shard_sizes in launch(reduce_scatter_mode, world_size):
        assert diff < 1e-6 and dropped
        psi = sum(p.numel() for p in GPT(CFG).parameters())
        assert sum(shard_sizes) <= psi / world_size + len(shard_sizes)  # 1/N, up to one padding element a bucket


@pytest.mark.exercise("launch_ready_buckets")
def test_launch_ready_buckets_by_hand():
    launch_ready = implementation("launch_ready_buckets")
    launched = []
    assert launch_ready([0, 0, 1, 0], 0, launched.append) == 2 and launched == [0, 1]
    assert launch_ready([0, 0, 0, 0], 2, launched.append) == 4 and launched == [0, 1, 2, 3]
    launched.clear()
    assert launch_ready([1, 0, 0], 0, launched.append) == 0 and launched == []  # complete, but behind bucket 0
    assert launch_ready([], 0, launched.append) == 0 and launched == []


@pytest.mark.exercise("launch_ready_buckets")
def test_any_arrival_order_launches_every_bucket_in_order_as_early_as_possible():
    launch_ready = implementation("launch_ready_buckets")
    owners = [[0, 1], [1, 2], [3], [4, 5, 6], [6]]  # bucket -> the gradients it waits for (6 straddles two)
    rng = torch.Generator().manual_seed(0)
    for _ in range(20):
        pending, launched, nxt = [len(o) for o in owners], [], 0
        for grad in torch.randperm(7, generator=rng).tolist():
            for b, o in enumerate(owners):
                pending[b] -= grad in o
            nxt = launch_ready(pending, nxt, launched.append)
            ready = next((b for b, p in enumerate(pending) if p), len(pending))  # all before this one are complete
            assert launched == list(range(ready)) and nxt == ready


def test_predicted_step_time_by_hand():
    from minidist.comm.ring import AlphaBeta
    from minidist.data_parallel import predict_step_seconds
    cost = AlphaBeta(alpha=1.0, beta=0.0)  # every all-reduce on 2 ranks: 2 messages, 2 s
    # no overlap: forward 1 + backward 4, then 3 buckets one after another
    assert predict_step_seconds([10, 10, 20], 2, cost, 1.0, 4.0, overlap=False) == 5.0 + 3 * 2.0
    # overlap: buckets ready at 1 + 4 * (1/4, 2/4, 4/4) = 2, 3, 5; reduced from 2-4, 4-6, 6-8
    assert predict_step_seconds([10, 10, 20], 2, cost, 1.0, 4.0, overlap=True) == 8.0
    free = AlphaBeta(alpha=0.0, beta=0.0)
    assert predict_step_seconds([10, 10, 20], 2, free, 1.0, 4.0) == 5.0  # free communication hides entirely


@pytest.mark.parametrize("cap", [0, -5, 2.5])
def test_a_bucket_capacity_that_is_not_a_positive_integer_is_refused(cap):
    from minidist.data_parallel.buckets import assign_buckets
    with pytest.raises(ValueError, match="bucket capacity must be a positive number of elements"):
        assign_buckets([3, 4], cap)


def with_torch_fp16_hook():
    """torch's own fp16_compress_hook, registered on minidist's DataParallel and on DDP: the same weights."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
    from torch.nn.parallel import DistributedDataParallel as DDP
    n, rank = dist.get_world_size(), dist.get_rank()
    models = []
    for wrap in (lambda m: DataParallel(m, bucket_cap_mb=0.05), lambda m: DDP(m, bucket_cap_mb=0.05),
                 lambda m: DataParallel(m, bucket_cap_mb=0.05)):
        torch.manual_seed(0)
        models.append(wrap(GPT(CFG)))
    ours, theirs, plain = models  # plain: no hook, to show the hook changes the result
    for model in (ours, theirs):
        model.register_comm_hook(None, fp16_compress_hook)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    for x, y in BATCHES:
        for model, opt in zip(models, opts):
            lm_loss(model(x.chunk(n)[rank]), y.chunk(n)[rank]).backward()
            opt.step()
            opt.zero_grad()
    diff = lambda a, b: max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))  # noqa
    return diff(ours.module, theirs.module), diff(plain.module, theirs.module), replica_divergence(ours)


def test_a_ddp_comm_hook_runs_on_data_parallel_as_on_ddp():
    for diff, without_hook, divergence in launch(with_torch_fp16_hook, 2):
        assert diff < 1e-7 < without_hook and divergence == 0.0, (diff, without_hook)


def hook_sees_whole_parameters():
    """A hook registered with a small cap: every bucket.gradients() lies inside bucket.buffer(), and training with
    a plain averaging hook equals training without one (bitwise: the same sums, in the same order per element)."""
    n = dist.get_world_size()
    seen = []

    def averaging_hook(state, bucket):
        buf = bucket.buffer()
        lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
        inside = all(lo <= g.data_ptr() and g.data_ptr() + g.numel() * g.element_size() <= hi
                     for g in bucket.gradients())
        seen.append((bucket.index(), inside, len(bucket.gradients())))
        future = torch.futures.Future()
        future.set_result(comm.all_reduce_sum(buf) / n)
        return future

    models = []
    for hooked in (True, False):
        torch.manual_seed(0)
        model = DataParallel(GPT(CFG), bucket_cap_mb=0.01)
        if hooked:
            model.register_comm_hook(None, averaging_hook)
        models.append(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    for x, y in BATCHES[:2]:
        for model, opt in zip(models, opts):
            lm_loss(model(x.chunk(n)[dist.get_rank()]), y.chunk(n)[dist.get_rank()]).backward()
            opt.step()
            opt.zero_grad()
    diff = max((p - q).abs().max().item() for p, q in zip(models[0].parameters(), models[1].parameters()))
    split_without_hook = sum(len(bs) > 1 for bs in models[1].reducer.bucket_of.values())
    return seen, diff, split_without_hook


def test_a_comm_hook_gets_buckets_of_whole_parameters():
    for seen, diff, split_without_hook in launch(hook_sees_whole_parameters, 2):
        assert split_without_hook > 0  # the small cap splits parameters when no hook is registered...
        assert len({i for i, _, _ in seen}) > 2 and all(inside for _, inside, _ in seen)  # ...but not for a hook
        assert diff < SGD_TOL, diff


def test_whole_parameter_buckets_close_at_the_cap_and_never_split():
    from minidist.data_parallel.buckets import assign_whole_buckets
    assert assign_whole_buckets([5, 3, 4], cap=6) == [[(2, 0, 4), (1, 0, 3)], [(0, 0, 5)]]
    assert assign_whole_buckets([5, 0, 4], cap=None) == [[(2, 0, 4)], [(0, 0, 5)]]
    assert assign_whole_buckets([5, 3, 4], cap=100) == [[(2, 0, 4), (1, 0, 3), (0, 0, 5)]]
