"""The gradient-reduction engine: buckets filled during backward and reduced as soon as they are complete.

Data parallelism (chapter 02) all-reduces gradients; ZeRO stage 2 (chapter 05) reduce-scatters them. Both need the
same machinery, which lives here once (PyTorch's DDP calls it the Reducer):

  layout     the trainable parameters, walked in *reverse* order (backward produces the last layer's gradients
             first), packed into one flat buffer per dtype (so LayerNorm can stay fp32 next to bf16 weights) and cut
             into buckets of `cap` bytes; each parameter's gradient is a contiguous slice of its flat buffer.
  all_reduce p.grad *is* a view into the flat buffer: reducing a bucket in place reduces the gradients themselves,
             with no concatenation or copy per step (DDP's gradient_as_bucket_view).
  reduce_scatter  each bucket (padded to a multiple of N) is reduce-scattered: rank r keeps `shards[b]`, its 1/N
             of bucket b, and the full-size gradients are dropped (ZeRO-2's memory saving).

One backward, phase by phase:
  prepare_backward()   at forward: reset the readiness counts (and, through an output sink, make sure the end of
                       backward is always reached, even on a rank whose backward touches no parameter)
  grad_ready(i)        hook, when parameter i's gradient is complete: count it (once), and launch every bucket
                       that is now full, *in bucket order*, so all ranks issue the same collectives in the same order
  launch(b)            start bucket b's collective asynchronously (divided by N first: an average, and no fp16
                       overflow in the sum)
  finish_backward()    autograd-engine callback at the end of backward: launch what is left, wait for everything
  remove()             take the hooks off (the module can then be wrapped again)

A parameter's hook can fire more than once in one backward (a weight shared by two segments under reentrant
activation checkpointing). So the first backward launches nothing early and learns how many times each hook fires;
later backwards launch a bucket when every gradient in it has fired that many times (DDP's static_graph does this).
"""
import time
from functools import partial

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_unflatten

from .. import comm
from .buckets import MiB, Bucket, assign_buckets, launch_ready_buckets, layout  # noqa: F401
from .shards import pack_bucket


class GradBucket:
    """What a communication hook sees of one bucket (the interface of torch.distributed.GradBucket)."""

    def __init__(self, reducer, bucket, buf):
        self._reducer, self._bucket, self._buf = reducer, bucket, buf

    def index(self) -> int:
        return self._bucket.index

    def buffer(self) -> torch.Tensor:
        """The bucket's flat gradients (a view into the gradients themselves, summed over nothing yet)."""
        return self._buf

    def is_last(self) -> bool:
        return self._bucket.index == len(self._reducer.buckets) - 1

    def parameters(self) -> list:
        return [self._reducer.params[i] for i in self._bucket.params]

    def gradients(self) -> list:
        return [self._reducer.grad_view(i) for i in self._bucket.params]


class _HookWork:
    """A hook's future (torch.futures.Future or a minidist Work): waiting writes its value into the bucket."""

    def __init__(self, future, buf):
        self.future, self.buf, self.completed_at = future, buf, None
        if isinstance(future, torch.futures.Future):  # note when it completes, for the timeline
            future.then(lambda _: setattr(self, "completed_at", self.completed_at or time.perf_counter()))

    def wait(self):
        value = self.future.wait()
        value = value[0] if isinstance(value, (list, tuple)) else value
        if value is not None and value.data_ptr() != self.buf.data_ptr():
            self.buf.copy_(value.reshape(self.buf.shape))
        self.completed_at = self.completed_at or getattr(self.future, "completed_at", None) or time.perf_counter()
        return self.buf


class _OutputSink(torch.autograd.Function):
    """Identity on the module's outputs whose backward runs first in every backward through them: it tells the
    reducer that a backward has begun, so the end-of-backward reduction is queued in the outer backward."""

    @staticmethod
    def forward(ctx, reducer, _anchor, *outputs):
        ctx.reducer = reducer
        return tuple(o.clone() for o in outputs)  # new tensors, as DDP's sink makes: free to modify in place

    @staticmethod
    def backward(ctx, *grads):
        ctx.reducer.backward_started()
        return (None, None, *grads)


class GradReducer:
    """Reduce the gradients of `params` over `group` during backward (see the module docstring for the phases).

    op: "all_reduce" (data parallel) or "reduce_scatter" (ZeRO-2). cap_bytes: bucket size (None: one bucket per
    parameter). overlap: launch buckets from the hooks during backward (False: all at the end). average: divide by N.
    """

    def __init__(self, params, group=None, cap_bytes: int | None = 25 * MiB, op: str = "all_reduce",
                 overlap: bool = True, average: bool = True, find_unused_parameters: bool = False, names=None):
        if op not in ("all_reduce", "reduce_scatter"):
            raise ValueError(f"op must be 'all_reduce' or 'reduce_scatter', got {op!r}")
        if cap_bytes is not None and cap_bytes <= 0:
            raise ValueError(f"bucket size must be positive (or None for one bucket per parameter), got {cap_bytes}")
        params = list(params)
        names = list(names) if names is not None else [f"parameter {i}" for i in range(len(params))]
        if len(names) != len(params):
            raise ValueError(f"GradReducer: {len(names)} names for {len(params)} parameters")
        kept = [(p, n) for p, n in zip(params, names) if p.requires_grad and p.numel() > 0]  # nothing to reduce in
        self.params, self.names = [p for p, _ in kept], [n for _, n in kept]               # an empty parameter
        self.group, self.op, self.overlap, self.average = group, op, overlap, average
        self.find_unused_parameters = find_unused_parameters
        self.world = dist.get_world_size(group)
        self.cap_bytes = cap_bytes
        self.relayout(whole_parameters=False)
        self.sync, self.open, self.inflight, self.events = True, False, [], []
        self.comm_hook = None  # (state, hook(state, GradBucket) -> future of the reduced buffer), as DDP's
        self._anchor = torch.zeros((), requires_grad=True)
        self._hooks = [p.register_post_accumulate_grad_hook(partial(self.grad_ready, i))
                       for i, p in enumerate(self.params)]

    def relayout(self, whole_parameters: bool) -> None:
        """(Re)build the buckets and the flat buffers; gradients already held are moved into the new buffers.
        whole_parameters=True keeps every parameter inside one bucket (what a communication hook needs)."""
        self.buckets, self.offsets = layout(self.params, self.cap_bytes, whole_parameters)
        self.bucket_of = {}  # param index -> the buckets holding a piece of it
        for b in self.buckets:
            for i in b.params:
                self.bucket_of.setdefault(i, []).append(b)
        sizes = {}
        for b in self.buckets:
            sizes[b.dtype] = max(sizes.get(b.dtype, 0), b.stop)
        device = self.params[0].device if self.params else torch.device("cpu")
        self.flat = {dtype: torch.zeros(n, dtype=dtype, device=device) for dtype, n in sizes.items()} \
            if self.op == "all_reduce" else {}
        for i, p in enumerate(self.params):
            if self.op == "all_reduce" and p.grad is not None:
                p.grad = self.grad_view(i).copy_(p.grad)
        self.shards = [None] * len(self.buckets)  # reduce_scatter: this rank's averaged shard of each bucket
        self.expected = None   # hook firings per parameter in one backward: learned in the first one

    # Phases of one backward.

    def prepare_backward(self, sync: bool = True) -> None:
        """At forward: a backward is expected; reduce in it unless `sync` is False (no_sync accumulation)."""
        self.sync, self.open, self.queued, self.inflight = sync, True, False, []
        self.fired = [0] * len(self.params)
        self.next = 0  # the next bucket to launch
        for b in self.buckets:
            b.pending = sum(self.expected[i] for i in b.params) if self.expected else None
        self.t_forward = time.perf_counter()

    def attach(self, outputs):
        """Route the module's outputs through the sink (see _OutputSink); returns them unchanged in value."""
        flat, spec = tree_flatten(outputs)
        floats = [k for k, o in enumerate(flat) if torch.is_tensor(o) and o.is_floating_point()]
        slots = [k for k in floats if flat[k].requires_grad] or floats  # detached outputs stay so, unless all are
        if not slots or not torch.is_grad_enabled():
            return outputs
        sunk = _OutputSink.apply(self, self._anchor, *[flat[k] for k in slots])
        for k, o in zip(slots, sunk):
            flat[k] = o
        return tree_unflatten(flat, spec)

    def backward_started(self) -> None:
        if self.sync and torch.autograd._is_checkpoint_valid():  # not in autograd.grad / backward(inputs=): no .grad
            self._check_open()
            self._queue_finish()

    def grad_ready(self, i: int, param: torch.Tensor) -> None:
        """Hook: parameter i's gradient is fully accumulated (for this use of it)."""
        if not self.sync:
            return
        self._check_open()
        self._queue_finish()  # normally done by the sink already; needed when the loss bypassed the outputs
        self.fired[i] += 1
        if self.expected and self.fired[i] > self.expected[i]:
            raise RuntimeError(f"DataParallel: {self.names[i]} received its gradient {self.fired[i]} times in this "
                               f"backward but {self.expected[i]} in the first, which decided when its bucket is "
                               f"reduced; a graph that changes like this between steps needs overlap=False")
        self._adopt(i)
        if self.expected is None:
            return  # first backward: learn the firing counts, launch everything at the end
        for b in self.bucket_of[i]:
            b.pending -= 1
        if self.overlap:
            launch_ready_buckets([b.pending for b in self.buckets], self.next, self.launch)

    def launch(self, b: int) -> None:
        """Start bucket b's collective asynchronously (in bucket order: every rank issues the same sequence)."""
        if b != self.next:
            raise RuntimeError(f"bucket {b} launched out of order (bucket {self.next} is next)")
        bucket = self.buckets[b]
        for i in bucket.params:
            if not self.fired[i]:
                self._adopt(i)  # no gradient in this backward: what it holds (no_sync), or zeros
        buf = self._bucket_buffer(bucket)
        if self.comm_hook is not None and self.op == "all_reduce":  # the hook reduces (and averages) the bucket
            state, hook = self.comm_hook
            work = _HookWork(hook(state, GradBucket(self, bucket, buf)), buf)
        elif self.op == "all_reduce":
            if self.average:
                buf.div_(self.world)
            work = comm.all_reduce_(buf, self.group, async_op=True)
        else:
            if self.average:
                buf.div_(self.world)
            self.shards[b] = buf.new_empty(buf.numel() // self.world)
            work = comm.reduce_scatter_into_(self.shards[b], buf, self.group, async_op=True)
        self.inflight.append((b, time.perf_counter(), work))
        self.next += 1

    def finish_backward(self) -> None:
        """End of backward: launch what is left, wait for everything, leave the reduced gradients in place."""
        compute_end = time.perf_counter()
        missing = [self.names[i] for i in range(len(self.params)) if not self.fired[i]]
        if missing and not self.find_unused_parameters and len(missing) < len(self.params):
            raise RuntimeError(f"parameters {missing} received no gradient in this step; construct DataParallel "
                               f"with find_unused_parameters=True if this is expected")
        self.open = False
        if self.expected is None:
            self.expected = [max(1, f) for f in self.fired]
        held = [f > 0 or p.grad is not None for f, p in zip(self.fired, self.params)]  # before launch adopts them
        while self.next < len(self.buckets):
            self.launch(self.next)
        used = self._used_on_some_rank(held) if self.find_unused_parameters else [True] * len(self.params)
        self.events = [("forward + backward", self.t_forward, compute_end)]
        for b, launched, work in self.inflight:
            work.wait()
            self.events.append((f"bucket {b}", launched, work.completed_at))
        self.inflight = []
        for i, p in enumerate(self.params):
            if self.op == "reduce_scatter" or not used[i]:
                p.grad = None  # reduce_scatter: the shards hold the result; unused everywhere: as one process

    # Helpers.

    def grad_view(self, i: int) -> torch.Tensor:
        dtype, offset = self.offsets[i]
        p = self.params[i]
        return self.flat[dtype][offset:offset + p.numel()].view(p.shape)

    def _adopt(self, i: int) -> None:
        """Make parameter i's gradient (or zeros) part of its bucket(s)."""
        p = self.params[i]
        if self.op == "reduce_scatter":
            return  # copied into the bucket buffer at launch
        view = self.grad_view(i)
        if p.grad is None:
            view.zero_()
        elif p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad)  # autograd allocated a fresh gradient (after zero_grad(set_to_none=True))
        p.grad = view

    def _bucket_buffer(self, bucket: Bucket) -> torch.Tensor:
        if self.op == "all_reduce":
            return self.flat[bucket.dtype][bucket.start:bucket.stop]
        return pack_bucket(bucket, self.params, self.offsets, self.bucket_of, self.world)

    def _device(self):
        return self.params[0].device

    def _used_on_some_rank(self, held: list[bool]) -> list[bool]:
        """Which parameters hold a gradient on at least one rank (one small all-reduce, after every bucket)."""
        flags = torch.tensor(held, dtype=torch.int32, device=self._device())
        return (comm.all_reduce_sum(flags, self.group) > 0).tolist()

    def _check_open(self) -> None:
        if not self.open:
            raise RuntimeError("DataParallel: a second backward after one synchronized forward (retain_graph, two "
                               "losses, or the wrapped module called directly): run each step's forward through "
                               "DataParallel, and backward once")

    def _queue_finish(self) -> None:
        if not self.queued:  # once per backward: finish when the autograd engine is done
            torch.autograd.Variable._execution_engine.queue_callback(self.finish_backward)
            self.queued = True

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
