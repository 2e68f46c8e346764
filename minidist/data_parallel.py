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
callback), so `optimizer.step()` right after `backward()` sees averaged gradients, as with DDP.

`no_sync()` skips communication for gradient accumulation: gradients accumulate locally in .grad over the micro-steps
and the next synchronized backward all-reduces the sum, once.
"""
import time
from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn

from . import comm

MiB = 1 << 20


def average_gradients_(params, group=None) -> None:
    """The naive algorithm, after backward: replace every .grad by its average over the group, one all-reduce each.

    Every rank must hold a gradient for the same parameters (call it after backward on every rank).
    """
    # <exercise average_gradients points=1>
    # hint: comm.all_reduce_sum(t, group) returns the sum over ranks in a new tensor.
    n = dist.get_world_size(group)
    for p in params:
        if p.grad is not None:
            p.grad.copy_(comm.all_reduce_sum(p.grad, group) / n)
    # </exercise>


def assign_buckets(numels: list[int], cap: int | None) -> list[list[tuple[int, int, int]]]:
    """Cut the flattened gradients into buckets of `cap` elements, walking the parameters in *reverse* order.

    Returns, for each bucket, its pieces (parameter index, start, stop) within that flattened parameter. A parameter
    may be split across two buckets, so every bucket but the last holds exactly `cap` elements and there are
    ceil(total / cap) buckets. `cap=None` gives one bucket per parameter (the naive algorithm). Empty parameters
    get no piece.
    """
    # <exercise assign_buckets points=2>
    # hint: keep the current bucket and how much room it has left; a parameter can fill the current bucket and
    #       continue in the next one, possibly several times.
    if cap is None:
        return [[(i, 0, numels[i])] for i in reversed(range(len(numels))) if numels[i]]
    buckets, current, room = [], [], cap
    for i in reversed(range(len(numels))):
        start = 0
        while start < numels[i]:
            take = min(room, numels[i] - start)
            current.append((i, start, start + take))
            start, room = start + take, room - take
            if room == 0:
                buckets.append(current)
                current, room = [], cap
    if current:
        buckets.append(current)
    return buckets
    # </exercise>


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
    """

    def __init__(self, module: nn.Module, group=None, bucket_cap_mb: float | None = 25, overlap: bool = True,
                 find_unused_parameters: bool = False):
        super().__init__()
        self.module, self.group, self.overlap = module, group, overlap
        self.find_unused_parameters = find_unused_parameters
        self.world = dist.get_world_size(group)
        broadcast_from_rank0_(module, group)
        self.params = [p for p in module.parameters() if p.requires_grad]
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) > 1:
            raise ValueError(f"DataParallel needs one dtype for all trainable parameters, "
                             f"found {sorted(map(str, dtypes))}")
        cap = None
        if bucket_cap_mb is not None:
            if bucket_cap_mb <= 0:
                raise ValueError(f"bucket_cap_mb must be positive (or None for one bucket per parameter), "
                                 f"got {bucket_cap_mb}")
            cap = max(1, int(bucket_cap_mb * MiB) // self.params[0].element_size()) if self.params else 1
        self.buckets = []  # bucket -> [(param index, start, stop, offset in the bucket)]
        self.pieces = [[] for _ in self.params]  # param index -> [(bucket, number of its elements there)]
        for b, bucket in enumerate(assign_buckets([p.numel() for p in self.params], cap)):
            offsets = [0] + [sum(stop - start for _, start, stop in bucket[:k + 1]) for k in range(len(bucket))]
            self.buckets.append([(i, start, stop, off) for (i, start, stop), off in zip(bucket, offsets)])
            for i, start, stop in bucket:
                self.pieces[i].append((b, stop - start))
        self._hooks = [p.register_post_accumulate_grad_hook(partial(self._grad_ready, i))
                       for i, p in enumerate(self.params)]
        self._require_sync, self._sync_now, self._step_open = True, True, False  # a backward needs a forward first
        self.events: list[tuple[str, float, float]] = []  # the last step's (what, start, end), for timelines

    def forward(self, *args, **kwargs):
        self._sync_now = self._require_sync  # decided at forward time: this backward syncs unless in no_sync()
        self._missing = [sum(stop - start for _, start, stop, _ in bucket) for bucket in self.buckets]
        self._arrived = [False] * len(self.params)
        self._next, self._inflight, self._queued, self._step_open = 0, [], False, True
        self._t_forward = time.perf_counter()
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self):
        """Inside: forward/backward accumulate gradients locally, with no communication."""
        previous, self._require_sync = self._require_sync, False
        try:
            yield
        finally:
            self._require_sync = previous

    def _grad_ready(self, i: int, param: torch.Tensor) -> None:
        """Hook: parameter i's gradient is fully accumulated for this backward."""
        if not self._sync_now:
            return
        if not self._step_open:
            raise RuntimeError("DataParallel: a second backward after one synchronized forward (retain_graph, two "
                               "losses, or the wrapped module called directly): run each step's forward through "
                               "DataParallel, and backward once")
        if not self._queued:  # once per backward: finish the reduction when the autograd engine is done
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._queued = True
        self._arrived[i] = True
        for b, count in self.pieces[i]:
            self._missing[b] -= count
        if self.overlap:
            self._launch_ready()

    def _launch_ready(self, everything: bool = False) -> None:
        while self._next < len(self.buckets) and (everything or self._missing[self._next] == 0):
            self._launch(self._next)
            self._next += 1

    def _launch(self, b: int) -> None:
        parts = []
        for i, start, stop, _ in self.buckets[b]:
            grad = self.params[i].grad
            parts.append(grad.detach().reshape(-1)[start:stop] if grad is not None else
                         torch.zeros(stop - start, dtype=self.params[i].dtype, device=self.params[i].device))
        flat = torch.cat(parts).div_(self.world)  # divide before summing, as DDP does: no fp16 overflow in the sum
        launched = time.perf_counter()
        out, work = comm.all_reduce_sum(flat, self.group, async_op=True)
        done = {}
        work.get_future().then(lambda _: done.setdefault("t", time.perf_counter()))
        self._inflight.append((b, out, work, launched, done))

    def _finish(self) -> None:
        """End of backward: launch what is left, wait for everything, write the averages into .grad."""
        self.events = [("forward + backward", self._t_forward, time.perf_counter())]
        if not all(self._arrived) and not self.find_unused_parameters:
            names = {id(p): n for n, p in self.module.named_parameters()}
            missing = [names[id(p)] for p, ok in zip(self.params, self._arrived) if not ok]
            raise RuntimeError(f"parameters {missing} received no gradient in this step; construct DataParallel "
                               f"with find_unused_parameters=True if this is expected")
        self._step_open = False  # this forward's gradients are being reduced: another backward needs a forward
        self._launch_ready(everything=True)  # first: every rank issues the buckets in the same order
        used = self._used_on_some_rank() if self.find_unused_parameters else [True] * len(self.params)
        for b, out, work, launched, done in self._inflight:
            work.wait()
            self.events.append((f"bucket {b}", launched, done.get("t", time.perf_counter())))
            for i, start, stop, offset in self.buckets[b]:
                p = self.params[i]
                if not used[i]:
                    continue  # no rank produced a gradient: leave .grad as it is, as one process would
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.view(-1)[start:stop].copy_(out[offset:offset + stop - start])
        self._inflight = []

    def _used_on_some_rank(self) -> list[bool]:
        """Which parameters hold a gradient on at least one rank (one small all-reduce).

        "Holds" rather than "got one in this backward": a gradient accumulated under no_sync() counts too.
        """
        local = [arrived or p.grad is not None for arrived, p in zip(self._arrived, self.params)]
        flags = torch.tensor(local, dtype=torch.int32, device=self.params[0].device)
        return (comm.all_reduce_sum(flags, self.group) > 0).tolist()
