"""ZeRO stages 1 and 2: data parallelism that keeps 1/N of the optimizer (and of the gradients) on each rank.

Data parallelism keeps N identical copies of everything; ZeRO (Rajbhandari et al. 2020) partitions them. The trainable
parameters lie end to end in flat buffers cut into buckets (chapter 02's layout: reverse order, one set per dtype);
each bucket, zero-padded to a multiple of N, is cut into N equal chunks, and only rank r keeps the fp32 master weights
and optimizer states (Adam's moments) of chunk r of every bucket. A step has three phases:

    reduce-scatter gradients   rank r receives the average over ranks of its chunk of each bucket
    local update               the wrapped optimizer steps rank r's master chunks (gradients cast to fp32 for it)
    all-gather parameters      every rank receives everybody's updated chunks and copies them into its model

A ring reduce-scatter plus a ring all-gather send what one ring all-reduce sends, 2(N-1)/N * S bytes per rank: ZeRO
saves memory for the bytes of data parallelism, plus one small all-reduce per step (an int32 flag per tensor: which
ones had a gradient on some rank). With Ψ parameters in mixed precision (16-bit model and gradients, fp32 master
and moments: 2 + 2 + 12 bytes per parameter; padding adds at most N - 1 elements per bucket), each rank holds
    stage 1: full-size gradients, reduce-scattered after backward, in step()              4Ψ + 12Ψ/N bytes
    stage 2: each bucket reduce-scattered during backward as soon as it is complete
             (chapter 02's GradReducer hooks); only the shard is kept                     2Ψ + 14Ψ/N bytes
Stage 3 shards the parameters too: minidist.fsdp.fully_shard.

The wrapped optimizer steps *pieces* (each parameter's part in my chunks, views of the master buffer): a parameter with
no gradient in a step (agreed with the flags) is skipped as torch skips it, and an elementwise optimizer (SGD, Adam,
AdamW...) updates as on whole tensors (LAMB's per-tensor trust ratio would not). Weights changed in the model outside
the optimizer (model.load_state_dict after building it) are read back into the masters at the next step. Clip with
opt.clip_grad_norm_ (the norm of the sharded gradients); fp16 needs a LossScaler (ranks agree on inf/nan and skip
together). In stage 2 a rank's backward must reach a trainable parameter, unless the model is passed as `module`.
"""
import weakref

import torch
import torch.distributed as dist

from .. import comm
from ..data_parallel.buckets import MiB, layout
from ..data_parallel.reducer import GradReducer
from ..mixed_precision import LossScaler, clip_grad_norm_
from .phases import all_gather_parameters, reduce_scatter_gradients, shard_pieces, used_on_some_rank
from .state import ZeroState, hyper as _hyper, probe_state_keys, take_over


class ShardReducer(GradReducer):
    """Chapter 02's GradReducer in reduce-scatter mode for an optimizer, which never sees the forward pass: it re-arms
    itself after every backward and adds each backward's averaged shards to those no step consumed yet (gradient
    accumulation: every micro-step communicates, as ZeRO-2 must without full-size gradients to accumulate into)."""

    def __init__(self, params, group, cap_bytes):
        super().__init__(params, group, cap_bytes, op="reduce_scatter", find_unused_parameters=True)
        self.retired = False  # True once a newer ZeroOptimizer took these parameters' hooks
        self.clear()
        self.prepare_backward()

    def clear(self) -> None:
        self.accumulated, self.used = [None] * len(self.buckets), [False] * len(self.params)

    def finish_backward(self) -> None:
        super().finish_backward()  # self.shards: this backward's averaged shards, the full-size gradients dropped
        self.accumulated = [s if a is None else a.add_(s) for a, s in zip(self.accumulated, self.shards)]
        self.shards = [None] * len(self.buckets)
        self.prepare_backward()    # ready for the next backward

    def _used_on_some_rank(self, held: list[bool]) -> list[bool]:
        used = super()._used_on_some_rank(held)
        self.used = [a or b for a, b in zip(self.used, used)]
        return used


class ZeroOptimizer(ZeroState, torch.optim.Optimizer):
    """`optimizer_class(params, **defaults)`, partitioned over `group` (ZeRO `stage` 1 or 2).

        opt = ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage=2, lr=1e-3)
        loss_fn(model(x_of_this_rank), y).backward()    # stage 2: buckets reduce-scattered during backward
        opt.clip_grad_norm_(1.0)                         # optional: the global norm of the sharded gradients
        opt.step()                                       # every rank's model receives the same updated weights
        opt.zero_grad()

    It owns the gradient reduction (use it on a plain model, not a DataParallel) and broadcasts rank 0's weights first;
    a new ZeroOptimizer on the same parameters takes them over (the old one then refuses to step). `param_groups`
    hold the model's parameters (LR schedulers work on them; add_param_group after construction is refused);
    parameters frozen when it is built are never trained by it. `state_dict()` gathers the wrapped optimizer's state
    in its own format (collective), which `load_state_dict` takes from any world size or from the plain optimizer.
    bucket_cap_mb: bucket size in MiB. scaler: a LossScaler (needed for fp16 parameters). In stage 2 each backward
    before step() is a micro-step; pass the model as `module` and its outputs go through the reducer's sink (as in
    DataParallel), so a rank whose backward reaches no parameter (an empty batch) reduce-scatters zeros, not hangs.
    """

    def __init__(self, params, optimizer_class, *, stage: int = 1, group=None, bucket_cap_mb: float = 25,
                 scaler: LossScaler | None = None, module: torch.nn.Module | None = None, **defaults):
        if stage not in (1, 2):
            raise ValueError(f"ZeroOptimizer implements stages 1 and 2, got stage={stage!r}; stage 3 shards the "
                             f"parameters too, which needs the forward pass: use minidist.fsdp.fully_shard")
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise ValueError(f"optimizer_class must be a torch.optim.Optimizer class, got {optimizer_class!r}")
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
        super().__init__(params, defaults)
        self.stage, self.group, self.optimizer_class, self.scaler = stage, group, optimizer_class, scaler
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        everything = [p for g in self.param_groups for p in g["params"]]
        if scaler is None and any(p.dtype == torch.float16 for p in everything):
            raise ValueError("fp16 parameters need loss scaling: pass scaler=LossScaler() and call backward on "
                             "opt.scaler.scale_loss(loss) (or use bf16, which needs none)")
        with torch.no_grad():
            for p in everything:
                p.copy_(comm.broadcast(p.detach(), 0, group))  # every replica starts from rank 0's weights
        self.params = [p for p in everything if p.requires_grad and p.numel() > 0]  # GradReducer's filter
        cap = int(bucket_cap_mb * MiB)
        self.reducer = ShardReducer(self.params, group, cap) if stage == 2 else None
        if self.reducer is not None:
            self.params = self.reducer.params  # one list: the reducer's parameter indices are ours
        take_over(self.params, self.reducer)  # the hooks of an earlier stage-2 ZeroOptimizer on them, if any
        if module is not None and self.reducer is not None:  # the outputs' sink: every backward reduce-scatters
            ref = weakref.ref(self.reducer)  # the model must not keep a replaced optimizer alive; remove() drops it
            self.reducer._hooks.append(module.register_forward_hook(
                lambda _m, _i, out: out if (r := ref()) is None or r.retired else r.attach(out)))
        self.buckets, self.offsets = (self.reducer.buckets, self.reducer.offsets) if stage == 2 else \
            layout(self.params, cap)
        self._partition()
        self.index = {id(p): k for k, p in enumerate(everything)}  # numbering of torch's state dicts
        owner = {id(p): k for k, g in enumerate(self.param_groups) for p in g["params"]}  # parameter -> its group
        self.group_of = [owner[id(p)] for p in self.params]
        inner_groups = [_hyper(g) | {"params": [piece for (i, *_), piece in zip(self.where, self.pieces)
                                                if self.group_of[i] == k]}
                        for k, g in enumerate(self.param_groups)]
        self.optimizer = optimizer_class(inner_groups, **defaults)
        for outer, inner in zip(self.param_groups, self.optimizer.param_groups):  # the full hyperparameters
            outer.update(_hyper(inner))
        self.keys = probe_state_keys(optimizer_class, self.optimizer.param_groups, defaults)  # per group
        self.skipped, self._found_inf = 0, None  # _found_inf: None until phase 1 ran in this step

    def _partition(self) -> None:
        """Cut every padded bucket into N chunks; this rank's chunks live end to end in one master buffer (fp32, or
        fp64 if the model has fp64 parameters: never less precise than the model)."""
        self.segments, self.chunks, self.where = [], [], []  # where: (param, start, stop, bucket, offset) per piece
        for b, bucket in enumerate(self.buckets):
            segs = []  # (param index, first element in the param, position in the bucket), in buffer order
            for i in bucket.params:
                _, offset = self.offsets[i]
                lo, hi = max(offset, bucket.start), min(offset + self.params[i].numel(), bucket.stop)
                segs.append((i, lo - offset, hi - offset, lo - bucket.start))
            chunk, pieces = shard_pieces([hi - lo for _, lo, hi, _ in segs], self.rank, self.world)
            self.segments.append(segs)
            self.chunks.append(chunk)
            self.where += [(segs[k][0], segs[k][1] + start, segs[k][1] + stop, b, offset)
                           for k, start, stop, offset in pieces]
        self.starts = [sum(self.chunks[:b]) for b in range(len(self.buckets))]  # bucket b's chunk in the master
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        self.master = torch.zeros(sum(self.chunks), dtype=dtype, device=self.params[0].device if self.params else None)
        self.pieces = [self.master[self.starts[b] + offset:self.starts[b] + offset + hi - lo].copy_(
                       self.params[i].detach().reshape(-1)[lo:hi]) for i, lo, hi, b, offset in self.where]
        self._seen = self._model_versions()  # the masters hold the model's weights as they are now

    @property
    def comm_device(self) -> torch.device:
        """Where this optimizer's collectives run: the model's device (the master may be offloaded to the host)."""
        return self.params[0].device if self.params else self.master.device

    # The step, phase by phase.

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        found_inf = self.unscale_()           # phase 1 (unless clip_grad_norm_ ran it): my gradient pieces
        self._found_inf = None
        if self.scaler is not None:
            self.scaler.update(found_inf)
        if found_inf:                         # every rank found it: all skip, the weights stay as they are
            self.skipped += 1
        else:
            self.local_update()               # phase 2
            self.all_gather_parameters()      # phase 3
        for piece in self.pieces:
            piece.grad = None                 # the gradient pieces live only inside the step
        return loss

    def unscale_(self) -> bool:
        """Phase 1, once per step: my averaged gradient chunks become my pieces' gradients, in the master's dtype (None
        where no rank had one); with a scaler, unscaled, and True if any rank found an inf or nan."""
        if self._found_inf is None:
            self._refuse_late_parameters()
            grads, used = self.reduce_scatter_gradients()
            for (i, lo, hi, b, offset), piece in zip(self.where, self.pieces):
                usable = used[i] and grads[b] is not None
                piece.grad = (grads[b][offset:offset + hi - lo].to(self.master.device, self.master.dtype)  # ZeRO-
                              if usable else None)             # Offload: the gradient goes to the master's device
            found = self.scaler is not None and self.scaler.unscale_(
                [piece.grad for piece in self.pieces if piece.grad is not None], agree=True, group=self.group)
            self._found_inf = found
        return self._found_inf

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the gradients to a global L2 norm of `max_norm` (summed over every rank's pieces: the padding and
        parameters without a gradient count nothing); returns the norm before clipping. Call it before step()."""
        self.unscale_()
        return clip_grad_norm_([p.grad for p in self.pieces if p.grad is not None], max_norm, sharded=True,
                               group=self.group)

    def reduce_scatter_gradients(self) -> tuple[list, list[bool]]:
        """My averaged gradient chunk of every bucket, and which parameters had a gradient. Stage 2 did it during
        backward (the reducer's shards); stage 1 does it now, packing the full-size gradients in buckets."""
        if self.stage == 2:
            if self.reducer.retired:
                raise RuntimeError("this ZeroOptimizer's parameters were taken over by a newer ZeroOptimizer on the "
                                   "same parameters: step the new one")
            return self.reducer.accumulated, self.reducer.used
        used = used_on_some_rank(self.params, self.group)
        return reduce_scatter_gradients([self._pack(b) for b in range(len(self.buckets))], self.group), used

    def _pack(self, b: int) -> torch.Tensor:
        """Bucket b's gradients in one zero-padded flat buffer of N * chunk elements: one cat of views of the gradients
        (no zero-fill, then a copy per parameter), zeros only where a gradient is missing and in the padding."""
        parts = [self.params[i].grad.reshape(-1)[lo:hi] if self.params[i].grad is not None else
                 torch.zeros(hi - lo, dtype=self.buckets[b].dtype, device=self.comm_device)
                 for i, lo, hi, _ in self.segments[b]]
        padding = self.world * self.chunks[b] - sum(hi - lo for _, lo, hi, _ in self.segments[b])
        if padding:
            parts.append(torch.zeros(padding, dtype=self.buckets[b].dtype, device=self.comm_device))
        return torch.cat(parts)

    def local_update(self) -> None:
        """Phase 2: step the wrapped optimizer on this rank's pieces (their gradients set by phase 1)."""
        self._sync_from_model()
        for outer, inner in zip(self.param_groups, self.optimizer.param_groups):  # e.g. an LR scheduler's lr
            inner.update(_hyper(outer))
        self.optimizer.step()

    def all_gather_parameters(self) -> None:
        """Phase 3: every rank's updated chunks, cast to the model's dtype, gathered and copied into the model."""
        shards = [self.master[s:s + c].to(self.comm_device, b.dtype)   # offloaded: the updated shards come back
                  for s, c, b in zip(self.starts, self.chunks, self.buckets)]
        fulls = all_gather_parameters(shards, self.group)
        into, values, strided = [], [], set()  # each segment of each bucket straight into its parameter: one copy
        for segs, full in zip(self.segments, fulls):
            for i, lo, hi, at in segs:
                if self.params[i].is_contiguous():
                    into.append(self.params[i].view(-1)[lo:hi])
                    values.append(full[at:at + hi - lo])
                else:
                    strided.add(i)  # no flat view of it: gathered whole below
        torch._foreach_copy_(into, values)
        if strided:
            for i, flat in enumerate(self._unbucket(fulls)):
                if i in strided:
                    self.params[i].copy_(flat.view(self.params[i].shape))
        self._seen = self._model_versions()

    def _unbucket(self, fulls: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each parameter's flattened values from the full flat buckets (a parameter may span several)."""
        parts = sorted((i, lo, full[at:at + hi - lo]) for segs, full in zip(self.segments, fulls)
                       for i, lo, hi, at in segs)  # by parameter, then by position within it
        return [torch.cat([t for j, _, t in parts if j == i]) for i in range(len(self.params))]

    def _model_versions(self) -> list[tuple[int, int]]:
        """What tells whether a parameter was changed since: its version counter (every in-place write bumps it) and
        its memory (`p.data = ...` replaces it)."""
        return [(p._version, p.data_ptr()) for p in self.params]

    def _sync_from_model(self) -> None:
        """Read back into my pieces the model weights changed outside this optimizer since its last all-gather (a
        model.load_state_dict, a manual edit): where the model differs from the master rounded to the model's dtype,
        the model wins; elsewhere the master keeps the bits the model's dtype cannot hold. Parameters whose version
        and memory are as the all-gather left them are skipped: most steps read nothing back."""
        changed = [now != seen for now, seen in zip(self._model_versions(), self._seen)]
        with torch.no_grad():
            for (i, lo, hi, _, _), piece in zip(self.where, self.pieces):
                if not changed[i]:
                    continue
                model = self.params[i].detach().reshape(-1)[lo:hi].to(piece.device)
                if model.dtype == piece.dtype:  # the master holds nothing more than the model
                    piece.copy_(model)
                else:
                    piece.copy_(torch.where(piece.to(model.dtype) == model, piece, model.to(piece.dtype)))
