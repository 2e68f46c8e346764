"""Around fully_shard (units.py): which parameters a unit takes, and what one does with a sharded model.

A unit takes the parameters of its module that no inner unit took, and refuses the mistakes that would otherwise
fail later and far away: a parameter tied across two units, a module inside a unit built first (the root wrapped
before its blocks: every rank would shard pieces of different sizes). full_state_dict and clip_grad_norm_ are
collectives over the units' group: every rank calls them. The gradients of a sharded model are the pieces
each rank holds (no padding, each element on exactly one rank), so their global norm is the square root of the sum
over ranks of each rank's squared norm: mixed_precision.clip_grad_norm_(sharded=True). torch.nn.utils.clip_grad_norm_
on model.parameters() would see this rank's pieces only, and each rank would clip by a different factor.
"""
import enum
import weakref

import torch
import torch.nn as nn

from .. import comm
from ..mixed_precision import clip_grad_norm_ as _clip

class TrainingState(enum.Enum):
    """Where a unit is in a training step; it decides what each hook does (units.py's docstring has the table)."""
    IDLE = "idle"                    # between steps, or between a unit's forward and its backward
    FORWARD = "forward"              # its forward is running (pre_forward ran, post_forward not yet)
    PRE_BACKWARD = "pre-backward"    # backward reached its outputs: gathered until its gradients are done
    POST_BACKWARD = "post-backward"  # its gradients are reduce-scattered; it waits for the end of backward


def in_backward() -> bool:
    """Is the autograd engine running (a forward hook firing now is a recomputation: activation checkpointing)?"""
    return torch._C._current_graph_task_id() != -1


class PostBackward(torch.autograd.Function):
    """Identity on a unit's inputs; its backward runs once gradients reach them: the unit's backward is complete."""

    @staticmethod
    def forward(ctx, unit, *inputs):
        ctx.unit = unit
        return tuple(x.view_as(x) for x in inputs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.unit.post_backward()
        return (None, *grads)


_SHARDED = weakref.WeakValueDictionary()  # id -> every parameter a unit has sharded (to refuse one tied across units)
_PIECES = weakref.WeakValueDictionary()   # id -> the shards and gathered parameters units put in modules


def unit_parameters(module: nn.Module, inner: list) -> tuple[list[nn.Parameter], list[tuple]]:
    """The parameters of `module` outside the `inner` units' modules, each once, and the slots that hold them:
    (module, attribute, index into the parameters). Refuses the mistakes above, and mixed dtypes."""
    inside = {m for u in inner for m in u.module.modules()}
    params, slots = {}, []
    for name, m in module.named_modules():
        for attr, p in (m.named_parameters(recurse=False) if m not in inside else []):
            if _PIECES.get(id(p)) is p:  # the shard of an enclosing unit, which was built first
                raise ValueError(f"{name}.{attr} is already sharded by an enclosing fully_shard unit: apply "
                                 f"fully_shard to the inner modules (the blocks) first, then to the root")
            if _SHARDED.get(id(p)) is p:  # a parameter another unit took: tied across units
                raise ValueError(f"parameter {name}.{attr} is already sharded by another fully_shard unit: "
                                 f"shard a module holding all its users as one unit")
            slots.append((m, attr, params.setdefault(p, len(params))))
    if len({p.dtype for p in params}) > 1:
        raise ValueError(f"the parameters of a fully_shard unit must share a dtype, got "
                         f"{sorted({str(p.dtype) for p in params})}")
    return list(params), slots


def claim(params: list[nn.Parameter], pieces: list[nn.Parameter]) -> None:
    """Record a new unit's original parameters and the tensors it puts in their place (see unit_parameters)."""
    _SHARDED.update({id(p): p for p in params})
    _PIECES.update({id(p): p for p in pieces})


def _units(module: nn.Module) -> list:
    return [m.fsdp_unit for m in module.modules() if getattr(m, "fsdp_unit", None) is not None]


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """{name: full tensor} with the names of the unwrapped module's state_dict, on every rank (collective): the
    fp32 shards of every unit gathered (never the param_dtype copies, even while a unit is gathered)."""
    full = {}
    for unit in _units(module):
        if unit.count:
            gathered = comm.all_gather_cat(unit.flat_shard, unit.group)
            for s, p, q in zip(unit.starts, unit.sharded, unit.full):
                full[id(p)] = full[id(q)] = gathered[s:s + q.numel()].view(q.shape)  # shard, or the gathered copy
    return {name: full.get(id(t), t).detach().clone() for name, t in module.state_dict(keep_vars=True).items()}


def clip_grad_norm_(module: nn.Module, max_norm: float) -> float:
    """Scale the gradients of the sharded `module` (its root unit's) so that their global L2 norm, over every rank's
    pieces, is at most `max_norm`; returns the norm before clipping (collective). Call it between backward and step."""
    if getattr(module, "fsdp_unit", None) is None:
        raise ValueError(f"clip_grad_norm_ needs the root of a fully_shard model, got a {type(module).__name__} "
                         f"without a unit")
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return _clip(grads, max_norm, sharded=True, group=module.fsdp_unit.group)
