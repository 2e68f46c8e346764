"""Data parallelism: every rank holds the whole model, trains on its own slice of the batch, and averages gradients.

If every rank starts from the same weights and applies the same averaged gradient, the replicas stay identical, and
training is the same as one process on the global batch: the gradient of a mean loss over B samples is the mean of
the N ranks' gradients over B/N samples each. The whole cost is one all-reduce of the gradients per step:
2(N-1)/N * 4Ψ bytes per rank in fp32, whatever the batch size.

Three versions of the same idea, as PyTorch's DDP grew them (Li et al. 2020, "PyTorch Distributed"):
  naive       after backward, one all-reduce per parameter (`average_gradients_`, or DataParallel with
              bucket_cap_mb=None, overlap=False):
              hundreds of small messages, each paying the latency alpha;
  bucketed    after backward, gradients are packed into a few large flat buckets (overlap=False): few messages;
  overlapped  backward produces gradients from the last layer to the first, so buckets filled in reverse parameter
              order become complete early: each bucket's all-reduce starts asynchronously from a gradient hook the
              moment its last gradient arrives, and runs while backward computes the rest (overlap=True).
Buckets are always launched in bucket order, so every rank issues the same collectives in the same order even when
gradients arrive in a different order. Everything in flight is waited for at the end of backward (an autograd engine
callback), so `optimizer.step()` right after `backward()` sees averaged gradients, as with DDP. The machinery (bucket
layout, hooks, the guaranteed end-of-backward reduction) is reducer.py's GradReducer, which ZeRO-2 reuses.

`no_sync()` skips communication for gradient accumulation: gradients accumulate locally in .grad over the micro-steps
and the next synchronized backward all-reduces the sum, once.
"""
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import comm
from .buckets import MiB, assign_buckets  # noqa: F401  (chapter 02 shows assign_buckets from here)
from .reducer import GradReducer


def average_gradients_(params, group=None) -> None:
    """The naive algorithm, after backward: replace every .grad by its average over the group, one all-reduce each.

    Every rank must hold a gradient for the same parameters (call it after backward on every rank); a parameter whose
    .grad is None is skipped. Graded: the averaged values by hand, one all-reduce per parameter, and 4 SGD steps on 2
    and 3 ranks equal to one process on the global batch, with replicas bitwise identical.
    """
    # <exercise average_gradients points=1>
    # hint: comm.all_reduce_sum(t, group) returns the sum over ranks in a new tensor (from minidist import comm).
    n = dist.get_world_size(group)
    for p in params:
        if p.grad is not None:
            p.grad.copy_(comm.all_reduce_sum(p.grad, group) / n)
    # </exercise>


def global_mean_loss(loss_sum: torch.Tensor, count, group=None) -> torch.Tensor:
    """The loss to call backward on when ranks hold different numbers of samples (or tokens).

    `loss_sum` is this rank's loss *summed* over its `count` samples. DataParallel averages gradients over the N
    ranks, which weights every rank equally: with a mean loss per rank, a sample on a rank with 3 samples would count
    7.7 times as much as one on a rank with 23. What we want after DataParallel's average is the global-batch
    gradient, grad(sum of all ranks' losses) / (total count over all ranks). Return the loss whose gradient, once
    averaged over the N ranks, is exactly that. The counts travel in one all-reduce per call. Under no_sync(), pass
    the rank's count for the whole step (all its micro-batches) in every micro-step. The value returned is only
    meant for backward: to print the global mean, all-reduce `loss_sum` and divide by the total count.
    Raises ValueError("global_mean_loss: no rank holds a sample in this step (the total count is 0)") when the
    total is 0. Graded: gradients equal to one process on the union of the batches (tolerance 1e-6) with 2 and 3
    ranks holding 3, 23 and 10 sequences, under no_sync with unequal micro-batches, and that ValueError (the test
    matches "the total count is 0").
    """
    # <exercise global_mean_loss points=2>
    # hint: minidist.comm.all_reduce_sum (from minidist import comm) sums a tensor over the group.
    # hint: write the gradient DataParallel leaves on every rank (the mean over ranks of each rank's gradient) and
    #       ask what each rank's loss must be for that mean to be the global-batch gradient.
    # hint: it runs every micro-step: keep the total on the device (no .item(), no float() of a count that may be a
    #       device tensor: each waits for the GPU); check it on the CPU, on an accelerator with torch._assert_async.
    n = dist.get_world_size(group)
    total = comm.all_reduce_sum(torch.as_tensor(count).to(loss_sum.device, torch.float64).reshape(()), group)
    if total.device.type == "cpu" and total == 0:
        raise ValueError("global_mean_loss: no rank holds a sample in this step (the total count is 0)")
    if total.device.type != "cpu":
        torch._assert_async(total != 0, "global_mean_loss: no rank holds a sample in this step (the total count is 0)")
    return loss_sum * (n / total).to(loss_sum.dtype)
    # </exercise>


def predict_step_seconds(bucket_bytes: list[int], n: int, cost, forward_s: float, backward_s: float,
                         overlap: bool = True) -> float:
    """Predicted seconds of one data-parallel step (forward, backward, the buckets' all-reduces) on n ranks.

    Model: backward produces gradients at a steady rate, last layer first, so bucket b is complete once backward has
    produced all the bytes of buckets 0..b; with overlap its all-reduce starts then (without overlap: when backward
    ends). Buckets are reduced one at a time, in order, each taking cost.predict("all_reduce", bytes, n) (chapter 01's
    alpha-beta model). The step ends when both backward and the last all-reduce are done. Small buckets start early
    but pay alpha many times; one big bucket pays alpha once but cannot start before backward ends: the best bucket
    size lies between, and this predicts where.
    """
    total, produced, comm_end = sum(bucket_bytes), 0, 0.0
    if total <= 0:
        raise ValueError(f"predict_step_seconds needs buckets holding some bytes, got {bucket_bytes}")
    for nbytes in bucket_bytes:
        produced += nbytes
        ready = forward_s + backward_s * (produced / total if overlap else 1.0)
        comm_end = max(comm_end, ready) + cost.predict("all_reduce", nbytes, n)
    return max(forward_s + backward_s, comm_end)


def broadcast_from_rank0_(module: nn.Module, group=None) -> None:
    """Overwrite every parameter and buffer with group rank 0's, so all replicas start identical."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            t.copy_(comm.broadcast(t, src=0, group=group))


class DataParallel(nn.Module):
    """Wrap `module` for data-parallel training; used like torch.nn.parallel.DistributedDataParallel.

    bucket_cap_mb: bucket size in MiB (None: one bucket per parameter). overlap: all-reduce each bucket as soon as it
    is full, during backward (False: all buckets after backward); the naive algorithm is bucket_cap_mb=None,
    overlap=False. find_unused_parameters: allow parameters that get no gradient in a step (costs one extra small
    all-reduce per step to agree on which ones, across ranks). Frozen parameters (requires_grad=False) are never
    communicated. Buffers are broadcast from rank 0 once, at construction; DDP re-broadcasts them before every
    forward (broadcast_buffers=True) to keep e.g. BatchNorm statistics identical, which the models here do not need.
    The gradient reduction itself is the GradReducer of reducer.py; `remove()` takes its hooks off the module.
    """

    def __init__(self, module: nn.Module, group=None, bucket_cap_mb: float | None = 25, overlap: bool = True,
                 find_unused_parameters: bool = False):
        super().__init__()
        if getattr(module, "_minidist_data_parallel", False):
            raise ValueError("this module is already wrapped by a DataParallel: call .remove() on that one first")
        if bucket_cap_mb is not None and not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be positive (or None for one bucket per parameter), "
                             f"got {bucket_cap_mb}")
        self.module, self.group = module, group
        broadcast_from_rank0_(module, group)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.reducer = GradReducer([p for _, p in named], group,
                                   None if bucket_cap_mb is None else int(bucket_cap_mb * MiB), "all_reduce",
                                   overlap, find_unused_parameters=find_unused_parameters,
                                   names=[n for n, _ in named])
        self._require_sync = True
        module._minidist_data_parallel = True  # a flag, not a reference: no cycle through the module tree

    @property
    def buckets(self):
        return self.reducer.buckets

    @property
    def events(self) -> list[tuple[str, float, float]]:
        """The last step's (what, start, end): compute, then each bucket's launch and completion, for timelines."""
        return self.reducer.events

    def forward(self, *args, **kwargs):
        self.reducer.prepare_backward(sync=self._require_sync)  # decided now: this backward syncs unless no_sync()
        return self.reducer.attach(self.module(*args, **kwargs))

    @contextmanager
    def no_sync(self):
        """Inside: forward/backward accumulate gradients locally, with no communication."""
        previous, self._require_sync = self._require_sync, False
        try:
            yield
        finally:
            self._require_sync = previous

    def register_comm_hook(self, state, hook) -> None:
        """Replace each bucket's all-reduce by `hook(state, bucket) -> Future` (DDP's interface and call).

        The buckets are rebuilt to hold whole parameters (a bucket may then exceed the cap by one parameter), so
        bucket.gradients() never reach outside bucket.buffer(). The hook gets a GradBucket (bucket.buffer(): the
        flat gradients, not yet divided by N) and returns a future
        (torch.futures.Future, or a minidist comm Work) whose value is the reduced, *averaged* buffer. Chapter 10's
        compression hooks (fp16, top-k, PowerSGD) and torch's own ddp_comm_hooks both plug in here.
        """
        if not callable(hook):
            raise ValueError(f"hook must be callable as hook(state, bucket), got {hook!r}")
        if self.reducer.op != "all_reduce":
            raise ValueError("a communication hook replaces an all-reduce; this reducer reduce-scatters")
        if self.reducer.open:
            raise RuntimeError("register_comm_hook between a forward and its backward: register it before training")
        self.reducer.relayout(whole_parameters=True)  # a hook sees every gradient whole, as DDP's hooks do
        self.reducer.comm_hook = (state, hook)

    def remove(self) -> nn.Module:
        """Unhook the module (it trains alone again, or can be wrapped anew); returns it."""
        self.reducer.remove()
        self.module._minidist_data_parallel = False
        return self.module
