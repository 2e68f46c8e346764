"""Fully sharded data parallel (ZeRO stage 3, FSDP): parameters sharded at rest, gathered one unit at a time.

ZeRO-3 (Rajbhandari et al. 2020) partitions the parameters too; PyTorch's FSDP (Zhao et al. 2023) groups them in
*units*: `fully_shard(block)` for each block, then `fully_shard(model)` for the rest (embeddings, final norm). As in
FSDP2, each parameter becomes this rank's dim-0 shard of the original, with its name and ndim: rows
[r*ceil(d0/N), (r+1)*ceil(d0/N)) (fewer, or none, on the last ranks when N does not divide d0), in fp32: the shard is
the master copy the optimizer steps. The shards are views of one flat buffer with a slot of ceil(d0/N) rows per
parameter (the padding), so the all-gather is one collective: rank-major out, then *copy-out* splits it into the
full-shape parameters; backward's *copy-in* lays each rank's rows of every gradient in that rank's slots (the layout:
state.shard_parameters). A unit's life in one step runs through an explicit training state (state.TrainingState),
which decides what each hook does, in methods named after the phases:

    pre_forward    -> FORWARD: unshard (all-gather, cast to param_dtype), prefetch the next unit's, wrap the inputs
    post_forward   -> IDLE: reshard (unless reshard_after_forward=False), hook the outputs to call pre_backward
    pre_backward   -> PRE_BACKWARD (once): queue the end of backward; unshard again, prefetch backward's next unit
    post_backward  PRE_BACKWARD -> POST_BACKWARD: reduce-scatter the gradients (reduce_dtype, averaged); reshard
    end of backward (root)  every unit -> IDLE

Recomputation (torch.utils.checkpoint, either use_reentrant; memory.checkpoint_blocks) runs forward hooks again while
autograd runs backward: they then only make sure the unit is gathered, and reset, prefetch, queue and reshard nothing
(IDLE -> PRE_BACKWARD when backward reaches the unit through the recomputed graph: use_reentrant=True).

HSDP (replicate_group=): shard over `group` (within a node), replicate over replicate_group (across nodes); gradients
are reduce-scattered over `group`, then all-reduced over replicate_group: + 2(R-1)/R * bΨ/N per rank, on that axis.

One unit (plus the prefetched one) is gathered at a time, and the prefetched all-gather runs while the current unit
computes. Per step each rank sends (N-1)/N * bΨ per all-gather and reduce-scatter (Ψ parameters of b bytes):
3(N-1)/N * bΨ, 1.5x data parallelism; 2(N-1)/N * bΨ with reshard_after_forward=False. Model states: 16Ψ/N per rank in
mixed precision (fp32 shard 4 + fp32 gradient shard 4 + Adam moments 8, over N), plus the gathered units.

Reshard frees the *storage* (autograd keeps the gathered weights it saved in forward); unshard refills the same
tensors before backward reads them and restores their version counters (else autograd sees an in-place change).
At the end of backward one all-reduce of an int32 flag per tensor tells which parameters had a gradient on some rank:
the others keep none (the optimizer leaves them alone), and every unit still gathered (a frozen one backward never
reached) is resharded. Clip with fsdp.clip_grad_norm_(model, max_norm), the norm over every rank's shards. Unlike
FSDP2: the root honours reshard_after_forward (FSDP2 keeps it gathered), a unit's parameters share a dtype, a
parameter shared by two units is refused, and a unit runs once per backward (a module applied twice, or two
forwards summed into one loss, is refused: each use would need its own gather and reduce-scatter).
"""
import itertools
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .. import comm
from .state import (PostBackward, TrainingState, backward_reached, claim, clip_grad_norm_, copy_out,  # noqa: F401
                    full_state_dict, in_backward, shard_parameters, unit_parameters)


def unshard_(full: torch.Tensor, shard: torch.Tensor, group=None) -> comm.Work:
    """Start gathering every rank's `shard` into `full` (N * shard.numel() elements, in shard's dtype), whose storage
    reshard_ emptied: give `full` its storage back, start the all-gather asynchronously, return its Work. Graded on 3
    ranks: the values, also through a view taken before the free; a second call issued while the first still runs."""
    # <exercise fsdp_unshard points=2>
    # hint: the parameters are views that autograd saved: refill the memory they all share, never replace `full`.
    # hint: return before the gather is done (the prefetch depends on it): an asynchronous minidist.comm collective
    #       that writes into a tensor you give it.
    full.untyped_storage().resize_(full.numel() * full.element_size())
    return comm.all_gather_into_(full, shard, group, async_op=True)
    # </exercise>


def reshard_(full: torch.Tensor) -> None:
    """Free the memory of `full` and of every view of it, keeping the tensors themselves (autograd holds them).
    Graded on 2 ranks: 0 bytes of storage after it, the views keep their shapes, and `full` can be gathered into
    again (through the package's unshard_)."""
    # <exercise fsdp_reshard points=1>
    # hint: the tensors must stay (autograd holds them): what holds the memory is the storage that `full` and all its
    #       views share.
    full.untyped_storage().resize_(0)
    # </exercise>


def reduce_scatter_grads(grads: list, numels: list[int], chunk: int, dtype, group=None, device=None) -> comm.Work:
    """Post-backward: start reducing a unit's gradients (`grads`: of its parameters in order, None for zeros; `numels`:
    their sizes), laid end to end in a zero-padded flat buffer of N * chunk elements of `dtype`, divided by N and
    reduce-scattered; the Work's wait() gives this rank's `chunk` elements (in `dtype`). Graded: on 3 ranks, with a
    None gradient and padding: the dtype and the values, exactly."""
    # <exercise fsdp_post_backward points=2>
    # hint: a None gradient still owns its slot (zeros); divide before the 16-bit sum; return without waiting.
    n = dist.get_world_size(group)
    flat = torch.zeros(n * chunk, dtype=dtype, device=device)
    for g, start in zip(grads, itertools.accumulate([0, *numels])):
        if g is not None:
            flat[start:start + g.numel()] = g.reshape(-1)
    return comm.reduce_scatter_into_(flat.new_empty(chunk), flat.div_(n), group, async_op=True)
    # </exercise>


def prefetch_target(order: list, current):
    """The unit to prefetch when `current` starts computing: the one after it in `order` (forward: the order units
    ran forward; backward: the reverse of the order they finished forward), or None when current is last or not in
    the order (a unit the first step never saw). Graded: by hand, both ends and an unknown unit included."""
    # <exercise fsdp_prefetch points=1>
    # hint: the orders come from the first step: a unit outside it, and the last unit, have nothing to prefetch.
    if current not in order or order.index(current) + 1 == len(order):
        return None
    return order[order.index(current) + 1]
    # </exercise>


class FSDPUnit:
    """What fully_shard attaches to a module: its parameters (those no inner unit took), sharded, and the lifecycle."""

    def __init__(self, module: nn.Module, group, replicate_group, param_dtype, reduce_dtype, reshard_after_forward):
        self.module, self.group, self.reshard_after_forward = module, group, reshard_after_forward
        self.replicate_group = replicate_group  # HSDP: the same shards on every rank of it (None: plain FSDP)
        self.name = type(module).__name__  # fully_shard names it after its path in the outermost module
        self.n, self.rank = dist.get_world_size(group), dist.get_rank(group)
        inner = [m.fsdp_unit for m in module.modules() if getattr(m, "fsdp_unit", None)]
        params, self.slots = unit_parameters(module, inner)  # slots: (module, attribute, index of the parameter)
        self.parent = None
        self.param_dtype = param_dtype or (params[0].dtype if params else torch.float32)
        self.reduce_dtype = reduce_dtype or self.param_dtype
        shard_parameters(self, params)
        claim(params, self.sharded + self.full)
        self.gathered, self.work, self.rs_work, self.queued, self.held = False, None, None, False, []
        self.training_state = TrainingState.IDLE
        self.order_pre, self.order_post, self.events, self.frozen, self.peak, self.units = [], [], [], False, 0, None
        self.uses, self.backward_use, self.in_backward = 0, None, True  # grad-mode forwards; the one backward runs
        for u in inner:
            u.parent = u.parent or self
        module.register_forward_pre_hook(self.pre_forward, with_kwargs=True)
        module.register_forward_hook(self.post_forward)
        module.fsdp_unit = self

    def _set_slots(self, tensors) -> None:
        for m, attr, i in self.slots:
            m._parameters[attr] = tensors[i]  # what the module computes with: the gathered or the sharded tensor

    @property
    def root(self) -> "FSDPUnit":
        return self if self.parent is None else self.parent.root

    def unshard(self, async_op: bool = False) -> None:
        """All-gather my parameters in param_dtype into the gathered tensors (async: return at once, prefetch)."""
        if not self.gathered and self.work is None and self.count:
            self.issued = time.perf_counter()
            self.work = unshard_(self.gather_buf, self.flat_shard.to(self.param_dtype), self.group)
            self.root._note_memory()
        if not async_op:
            self.wait_unshard()

    def wait_unshard(self) -> None:
        if self.work is not None:
            self.work.wait()
            version = self.full_flat._version
            self.full_flat.untyped_storage().resize_(self.full_flat.numel() * self.full_flat.element_size())
            copy_out(self.gather_buf, self, into=self.padded)  # rank-major -> each parameter's rows, in place
            reshard_(self.gather_buf)
            torch._C._autograd._unsafe_set_version_counter((self.full_flat,), (version,))  # see the docstring
            self.root.events.append((f"all-gather {self.name}", self.issued, self.work.completed_at))
            self.work, self.gathered = None, True
            self._set_slots(self.full)

    def reshard(self) -> None:
        """Free the gathered parameters; the module holds its shards again."""
        if self.gathered:
            reshard_(self.full_flat)
            self.gathered = False
            self._set_slots(self.sharded)

    def pre_forward(self, module, args, kwargs):
        if in_backward():  # recomputation: backward needs me gathered, and nothing else may change
            if self.training_state is TrainingState.IDLE:  # use_reentrant=True: backward reaches me only here
                self.training_state, self.started = TrainingState.PRE_BACKWARD, time.perf_counter()
            self.unshard()
        else:
            root = self.root
            root.order_pre += [] if root.frozen or self in root.order_pre else [self]  # the first step records it
            self.training_state, root.queued = TrainingState.FORWARD, False  # (a failed backward forgotten)
            self.uses, self.backward_use = self.uses + torch.is_grad_enabled(), None
            self._unshard_prefetching(root.order_pre)
        flat, spec = tree_flatten((args, kwargs))
        flat = [x.to(self.param_dtype) if torch.is_tensor(x) and x.is_floating_point() else x for x in flat]
        slots = [k for k, x in enumerate(flat) if torch.is_tensor(x) and x.requires_grad and torch.is_grad_enabled()]
        for k, x in zip(slots, PostBackward.apply(self, *[flat[k] for k in slots]) if slots else ()):
            flat[k] = x
        return tree_unflatten(flat, spec)

    def post_forward(self, module, args, output):
        root, use = self.root, self.uses
        if not in_backward():  # (a recomputation stays gathered for the backward that runs it)
            root.events.append((f"forward {self.name}", self.started, time.perf_counter()))
            root.order_post += [] if root.frozen or self in root.order_post else [self]
            root.frozen = root.frozen or self is root  # the order is known once the root's first forward is over
            self.training_state = TrainingState.IDLE
            if self.reshard_after_forward or not torch.is_grad_enabled():
                self.reshard()
        for t in (t for t in tree_flatten(output)[0] if torch.is_tensor(t) and t.requires_grad):
            t.register_hook(lambda grad: self.pre_backward(use))  # backward is about to reach this use of the unit
        return output

    def pre_backward(self, use: int) -> None:
        if not backward_reached(self, use):
            return  # another output of mine, or a recomputed one: done once per backward
        root = self.root
        if not root.queued:  # the first unit backward reaches: the root finishes everything at the end
            torch.autograd.Variable._execution_engine.queue_callback(root._finish_backward)
            root.queued = True
        self._unshard_prefetching([u for u in root.order_post[::-1] if u.in_backward])

    def _unshard_prefetching(self, order: list) -> None:
        """Unshard me, having started the all-gather of the unit computing after me in `order` (once it is known)."""
        self.unshard(async_op=True)  # (in flight already if it was prefetched)
        nxt = prefetch_target(order, self) if self.root.frozen else None
        if nxt is not None:
            nxt.unshard(async_op=True)
        self.wait_unshard()
        self.started = time.perf_counter()

    def post_backward(self) -> None:
        """Start the reduce-scatter of my gradients (in reduce_dtype, averaged; waited for at the end) and reshard."""
        if self.training_state is not TrainingState.PRE_BACKWARD:
            return
        self.training_state = TrainingState.POST_BACKWARD
        self.root.events.append((f"backward {self.name}", self.started, time.perf_counter()))
        self.held = [p.grad is not None for p in self.full]  # which parameters had a gradient here
        if any(p.requires_grad for p in self.full):
            self.rs_issued = time.perf_counter()
            pieces = [None if p.grad is None else p.grad[r * k:(r + 1) * k] for r in range(self.n)  # copy-in:
                      for p, k in zip(self.full, self.pads)]  # rank r's rows of every gradient, in its slots
            self.rs_work = reduce_scatter_grads(pieces, self.sizes * self.n, self.chunk, self.reduce_dtype,
                                                self.group, self.flat_shard.device)
        for p in self.full:
            p.grad = None
        self.reshard()

    def _finish_backward(self) -> None:
        """Root, end of backward: post_backward where still due (the root's inputs need none); which parameters had
        a gradient on some rank (one all-reduce of int32 flags); every gradient shard; every unit resharded."""
        units = [u for u in self.order_pre if u.root is self] or [self]
        for u in reversed(units):
            u.post_backward()
        done = {u: u.training_state is TrainingState.POST_BACKWARD for u in units}
        held = [h for u in units for h in (u.held if done[u] else [False] * u.count)]
        flags = comm.all_reduce_sum(torch.tensor(held, dtype=torch.int32, device=self.flat_shard.device), self.group)
        if self.replicate_group is not None:  # HSDP: had a gradient on some rank of some replica
            flags = comm.all_reduce_sum(flags, self.replicate_group)
        used = (flags > 0).tolist()
        for u in units:
            u._collect_grads(used[:u.count])
            used = used[u.count:]
            u.wait_unshard()  # a prefetched unit backward never reached (frozen below the trainable ones)
            u.reshard()
            u.in_backward, u.backward_use = done[u], None  # backward prefetches only units it reached
            u.training_state = TrainingState.IDLE
        self.queued = False

    def _collect_grads(self, used: list[bool]) -> None:
        """Add my averaged gradient shard to my pieces' gradients (views of it after zero_grad); a parameter no rank
        had a gradient for keeps none, as on one process."""
        if self.rs_work is None:
            return
        shard = self.rs_work.wait()  # averaged over my shard group, in reduce_dtype
        if self.replicate_group is not None:  # HSDP: then averaged over the replicas of my shard
            shard = comm.all_reduce_sum(shard, self.replicate_group).div_(dist.get_world_size(self.replicate_group))
        shard = shard.to(self.flat_shard.dtype)
        self.root.events.append((f"reduce-scatter {self.name}", self.rs_issued, self.rs_work.completed_at))
        self.rs_work = None
        for p, o, u in zip(self.sharded, self.offsets, used):
            if p.requires_grad and u:
                piece = shard[o:o + p.numel()].view(p.shape)
                p.grad = piece if p.grad is None else p.grad.add_(piece)

    def _note_memory(self) -> None:
        """Root: the most bytes of gathered parameters held at once (the units listed once the order is frozen)."""
        units = self.units or [m.fsdp_unit for m in self.module.modules() if getattr(m, "fsdp_unit", None)]
        self.units, held = units if self.frozen else None, [t for u in units for t in (u.full_flat, u.gather_buf)]
        self.peak = max(self.peak, sum(t.untyped_storage().nbytes() for t in held))


def fully_shard(module: nn.Module, group=None, *, replicate_group=None, param_dtype=None, reduce_dtype=None,
                reshard_after_forward: bool = True) -> nn.Module:
    """Shard the parameters of `module` that no inner fully_shard call took over `group`; returns the module.

    Apply it to each block, then to the root. Build the optimizer on module.parameters() afterwards: they are this
    rank's dim-0 shards (fp32, the names and ndim of the originals; views of the unit's flat shard). param_dtype: the
    dtype of gathered parameters (compute and all-gather; floating-point inputs are cast to it); reduce_dtype: of the
    gradient reduce-scatter (default: param_dtype). replicate_group: HSDP (hybrid sharding): the ranks that hold the
    same shards as this one (shard within a node, replicate across nodes); gradients are reduce-scattered over
    `group`, then all-reduced over replicate_group. Every rank then averages over both: |group| * |replicate_group|.
    """
    if getattr(module, "fsdp_unit", None) is not None:
        raise ValueError(f"{type(module).__name__} is already sharded by fully_shard")
    if any(d is not None and not d.is_floating_point for d in (param_dtype, reduce_dtype)):
        raise ValueError(f"param_dtype and reduce_dtype must be floating-point, got {param_dtype}, {reduce_dtype}")
    FSDPUnit(module, group, replicate_group, param_dtype, reduce_dtype, reshard_after_forward)
    for name, m in module.named_modules():  # names for timelines, as the outermost call sees them
        if getattr(m, "fsdp_unit", None) is not None:
            m.fsdp_unit.name = name or "root"
    return module
