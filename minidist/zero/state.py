"""The bookkeeping around ZeroOptimizer (optimizer.py): its state dicts, which parameters' hooks it owns, what it holds.

State dicts are gathered into the wrapped optimizer's *own* format, so a checkpoint moves between world sizes and
between ZeroOptimizer and the plain optimizer: each per-element state (Adam's moments) is laid out in the buckets as
the gradients are, all-gathered, and cut back into whole tensors; per-tensor states (Adam's `step`) are the same on
every piece of a tensor and travel in one all-reduce. Which states are which is asked of the wrapped optimizer on a
toy tensor, once per parameter group (a group's hyperparameters can create states the defaults do not: SGD's
momentum, Adam's amsgrad).
"""
import numbers
import weakref

import torch

from .. import comm
from .phases import all_gather_parameters

_REDUCER_OF = weakref.WeakValueDictionary()  # id(parameter) -> the ShardReducer whose hooks are on it


def take_over(params: list[torch.Tensor], reducer=None) -> None:
    """Remove the hooks an earlier stage-2 ZeroOptimizer left on `params` (a rebuilt optimizer, a re-run cell): they
    would fire first, drop the gradients and leave the new optimizer reducing zeros; the old one refuses to step from
    then on. Then record `reducer` (stage 2) as theirs. (An entry lives as long as its reducer, which holds the
    parameter: ids are not reused meanwhile.)"""
    for old in {id(r): r for p in params if (r := _REDUCER_OF.get(id(p))) is not None}.values():
        old.remove()
        old.retired = True
    if reducer is not None:
        _REDUCER_OF.update({id(p): reducer for p in params})


def hyper(param_group: dict) -> dict:
    """A parameter group's hyperparameters (everything but its parameters)."""
    return {k: v for k, v in param_group.items() if k != "params"}


IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")  # how it runs, not which states it keeps


def probe_state_keys(optimizer_class, groups: list[dict], defaults: dict) -> list[dict[str, list[str]]]:
    """For each parameter group, the wrapped optimizer's states by kind: "elementwise" (a value per element) and
    "scalars" (one per tensor: a 0-dim tensor or a number), found by one step on a toy tensor with its
    hyperparameters."""
    out = []
    for group in groups:
        toy = torch.zeros(2)
        toy.grad = torch.zeros(2)
        kept = {k: v for k, v in hyper(group).items() if k not in IMPLEMENTATION}  # the toy lives on the CPU
        probe = optimizer_class([kept | {"params": [toy]}], **{k: v for k, v in defaults.items()
                                                                if k not in IMPLEMENTATION})
        probe.step()
        state = probe.state[toy]
        kinds = {"elementwise": [k for k, v in state.items() if torch.is_tensor(v) and v.shape == toy.shape],
                 "scalars": [k for k, v in state.items() if (torch.is_tensor(v) and v.dim() == 0)
                             or isinstance(v, numbers.Real)]}
        if other := set(state) - set(kinds["elementwise"]) - set(kinds["scalars"]):
            raise ValueError(f"ZeroOptimizer cannot shard the {optimizer_class.__name__} states {sorted(other)}: "
                             f"neither one value per element nor one number per tensor")
        kinds["type"] = {k: "tensor" if torch.is_tensor(state[k]) else type(state[k]) for k in kinds["scalars"]}
        out.append(kinds)
    return out


class ZeroState:
    """ZeroOptimizer's bookkeeping methods: state dicts, gradients, groups, memory (the attributes are
    ZeroOptimizer's)."""

    def _refuse_late_parameters(self) -> None:
        managed = {id(p) for p in self.params}
        late = [tuple(p.shape) for g in self.param_groups for p in g["params"]
                if p.grad is not None and p.numel() > 0 and id(p) not in managed]
        if late:
            raise ValueError(f"{len(late)} parameters of shapes {late[:4]} have gradients but were frozen when this "
                             f"ZeroOptimizer was built, so it does not train them: build it after unfreezing them")

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)  # the model's gradients (full size in stage 1)
        if self.reducer is not None:
            self.reducer.clear()        # stage 2: the accumulated shards
        for piece in self.pieces:       # phase 1 run by clip_grad_norm_ without a step: forgotten
            piece.grad = None
        self._found_inf = None

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "optimizer"):  # torch's __init__ adds the first groups through here
            raise ValueError("ZeroOptimizer cannot add a parameter group once built (its buckets and shards are laid "
                             "out then): build a new one with every group")
        super().add_param_group(param_group)

    def state_dict(self) -> dict:
        """The wrapped optimizer's state_dict for all the model's parameters, gathered from the shards (collective;
        the master weights under the key "master" when the model's dtype is not the master's)."""
        self._sync_from_model()
        keys = [k for kinds in self.keys for k in kinds["elementwise"]]
        mixed = any(p.dtype != self.master.dtype for p in self.params)
        keys = list(dict.fromkeys(keys)) + (["master"] if mixed else [])
        full = {}
        for key in keys:
            shards = [torch.zeros(c, dtype=self.master.dtype, device=self.comm_device) for c in self.chunks]
            for (i, lo, hi, b, offset), piece in zip(self.where, self.pieces):
                value = piece if key == "master" else self.optimizer.state.get(piece, {}).get(key)
                if value is not None:
                    shards[b][offset:offset + hi - lo] = value
            full[key] = self._unbucket(all_gather_parameters(shards, self.group))
        scalars = list(dict.fromkeys(k for kinds in self.keys for k in kinds["scalars"]))
        counts = torch.zeros(len(self.params), 1 + len(scalars), dtype=torch.float64)
        for (i, *_), piece in zip(self.where, self.pieces):
            if piece in self.optimizer.state:
                state = self.optimizer.state[piece]
                counts[i] += torch.tensor([1.0] + [float(state.get(k, 0)) for k in scalars], dtype=torch.float64)
        counts, state = comm.all_reduce_sum(counts.to(self.comm_device), self.group).cpu(), {}  # scalars: shared
        for i, p in enumerate(self.params):
            kinds, has = self.keys[self.group_of[i]], counts[i, 0].item() > 0  # has: the optimizer stepped it
            entry = {k: full[k][i].view(p.shape).clone() for k in keys
                     if k == "master" or (has and k in kinds["elementwise"])}
            for j, k in enumerate(scalars):
                if has and k in kinds["scalars"]:
                    value = counts[i, 1 + j].item() / counts[i, 0].item()
                    kind = kinds["type"][k]
                    entry[k] = torch.tensor(value) if kind == "tensor" else kind(value)
            if entry:
                state[self.index[id(p)]] = entry
        return {"state": state, "param_groups": [hyper(g) | {"params": [self.index[id(p)] for p in g["params"]]}
                                                 for g in self.param_groups]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict of this optimizer (any world size) or of the plain wrapped optimizer: keep my pieces, and
        give the model the loaded master weights (collective: an all-gather)."""
        groups, saved_states = state_dict["param_groups"], state_dict["state"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError(f"the state dict has parameter groups of {[len(g['params']) for g in groups]} tensors, "
                             f"this optimizer {[len(g['params']) for g in self.param_groups]}")
        for p in self.params:
            for k, v in saved_states.get(self.index[id(p)], {}).items():
                if torch.is_tensor(v) and v.dim() > 0 and v.numel() != p.numel():
                    raise ValueError(f"state {k!r} of parameter {self.index[id(p)]} has shape {tuple(v.shape)}, the "
                                     f"parameter {tuple(p.shape)}")
        for outer, saved in zip(self.param_groups, groups):
            outer.update(hyper(saved))
        self.optimizer.state.clear()
        for (i, lo, hi, b, offset), piece in zip(self.where, self.pieces):
            saved, kinds = saved_states.get(self.index[id(self.params[i])], {}), self.keys[self.group_of[i]]
            piece.copy_(saved.get("master", self.params[i].detach()).reshape(-1)[lo:hi])  # the model's, or saved
            if not saved:
                continue
            self.optimizer.state[piece] = {k: saved[k].reshape(-1)[lo:hi].to(piece.dtype, copy=True)
                                           for k in kinds["elementwise"] if k in saved} | {
                k: saved[k].clone().float() if torch.is_tensor(saved[k]) else saved[k]
                for k in kinds["scalars"] if k in saved}
        with torch.no_grad():
            self.all_gather_parameters()

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        """For memory.measure_state_bytes, what I hold beyond the model: gradient shards (and my gradient pieces
        inside a step), the master buffer, the wrapped optimizer's per-element states."""
        grads = [s for s in (self.reducer.accumulated if self.reducer else []) if s is not None]
        grads += [p.grad for p in self.pieces if p.grad is not None]
        states = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
        return {"grads": grads, "optimizer": [self.master, *states]}
