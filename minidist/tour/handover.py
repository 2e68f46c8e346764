"""The reference for resharding checks: the full training state handed over in memory, no checkpoint involved.

`full_state(run)` gathers a run's whole state with each technique's *own* code (FSDP's full_state_dict and its unit
layout, ZeroOptimizer.state_dict, tensor_parallel's full_parameters, the pipeline's stages); `seed(run, state)`
gives a freshly built run at another world size that state, again with each technique's own code (fully_shard of a
model holding the full weights, ZeroOptimizer.load_state_dict, parallelize and local_shard). A checkpoint saved on N
ranks and loaded on M must give exactly what this handover gives: the same weights, the same optimizer states, and
then the same training, bit for bit.
"""
import torch
import torch.distributed as dist

from .. import comm
from ..fsdp import full_state_dict
from ..fsdp.state import gather_full
from ..tensor_parallel.plans import full_parameters, local_shard

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element states (plus its scalar "step")


def _units(model):
    return [m.fsdp_unit for m in model.modules() if getattr(m, "fsdp_unit", None) is not None and m.fsdp_unit.count]


def _names(model) -> dict[int, str]:
    names = {}
    for name, t in model.state_dict(keep_vars=True).items():
        names.setdefault(id(t), name)
    return names


def _fsdp_states(model, opt) -> dict:
    """{name: {"step", "exp_avg", "exp_avg_sq"}} of the full tensors: each moment is shaped like its parameter's
    dim-0 shard, and gathers into the full tensor as full_state_dict gathers the weights (fsdp.gather_full)."""
    names, out = _names(model), {}
    for unit in _units(model):
        for key in MOMENTS:
            local = [opt.state[p][key] if p in opt.state else torch.zeros_like(p) for p in unit.sharded]
            for p, full in zip(unit.sharded, gather_full(unit, local)):
                if p in opt.state:
                    out.setdefault(names[id(p)], {"step": opt.state[p]["step"].clone()})[key] = full.clone()
    return out


def _tp_states(model, opt) -> dict:
    """The same for tensor parallelism: each moment put in .grad, and full_parameters(grads=True) gathers it."""
    params = dict(model.named_parameters())
    out = {name: {"step": opt.state[p]["step"].clone()} for name, p in params.items() if p in opt.state}
    for key in MOMENTS:
        for p in params.values():
            p.grad = opt.state[p][key] if p in opt.state else torch.zeros_like(p)
        for name, full in full_parameters(model, grads=True).items():
            if name in out:
                out[name][key] = full
    for p in params.values():
        p.grad = None
    return out


def _plain_states(model, opt) -> dict:
    return {name: {k: v.clone() for k, v in opt.state[p].items()} for name, p in model.named_parameters()
            if p in opt.state}


def full_state(run) -> tuple[dict, dict]:
    """(full weights by state_dict name, full AdamW states by parameter name) of `run` (collective)."""
    if run.strategy == "fsdp":
        return full_state_dict(run.model), _fsdp_states(run.model, run.opt)
    if run.strategy == "tp":  # full_parameters names parameters once: a tied one also under its other names
        full, names = full_parameters(run.model), {id(p): n for n, p in run.model.named_parameters()}
        return ({k: full[names[id(t)]] if id(t) in names else t.detach().clone()
                 for k, t in run.model.state_dict(keep_vars=True).items()}, _tp_states(run.model, run.opt))
    if run.strategy == "zero2":
        names = [name for name, _ in run.model.named_parameters()]
        state = run.opt.state_dict()["state"]
        return ({k: v.clone() for k, v in run.model.state_dict().items()},
                {names[i]: {k: v.clone() for k, v in s.items()} for i, s in state.items()})
    if run.strategy == "pp":
        return pipeline_state(run)
    model = getattr(run.model, "module", run.model)  # DataParallel's module
    if hasattr(run.opt, "master"):  # MixedPrecisionOptimizer: AdamW steps the fp32 masters
        masters = dict(zip(map(id, run.opt.params), run.opt.master))
        return ({k: v.clone() for k, v in model.state_dict().items()},
                {name: {k: v.clone() for k, v in run.opt.optimizer.state[masters[id(p)]].items()} |
                 {"master": masters[id(p)].detach().clone()} for name, p in model.named_parameters()})
    return {k: v.clone() for k, v in model.state_dict().items()}, _plain_states(model, run.opt)


def pipeline_state(run) -> tuple[dict, dict]:
    """Every stage's weights and AdamW states, broadcast from the rank that trains it (into the whole model that
    every rank built): what one process holding all the stages would have."""
    from ..pipeline.stages import split_gpt
    p, rank, names, states = comm.group_size(None), dist.get_rank(), _names(run.whole), {}
    for s, stage in enumerate(split_gpt(run.whole, p)):
        for q in stage.parameters():
            comm.broadcast_(q.data, src=s % p)
            mine = run.opt.state.get(q) if rank == s % p else None
            if q.requires_grad and (names[id(q)] not in states):
                values = {k: (mine[k] if mine else torch.zeros_like(q)).clone() for k in MOMENTS} | {
                    "step": (mine["step"] if mine else torch.zeros(())).to(q.device, copy=True)}
                for v in values.values():
                    comm.broadcast_(v, src=s % p)
                states[names[id(q)]] = values | {"step": values["step"].cpu()}
    return {k: v.clone() for k, v in run.whole.state_dict().items()}, states


def load_full_weights(model, weights: dict) -> None:
    """A dense model's weights from a full state dict; a tied weight may come under one of its names only."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if model.lm_head.weight is model.wte.weight else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"full weights do not fit the model: missing {missing}, unexpected {unexpected}")


def seed_optimizer(run, states: dict) -> None:
    """Give `run`'s fresh optimizer the full `states`, cut with each technique's own layout (collective for ZeRO)."""
    if run.strategy == "zero2":
        index = {name: i for i, (name, _) in enumerate(run.model.named_parameters())}
        groups = run.opt.state_dict()["param_groups"]
        run.opt.load_state_dict({"state": {index[n]: s for n, s in states.items()}, "param_groups": groups})
        return
    names = _names(run.model)
    if run.strategy == "fsdp":
        for unit in _units(run.model):
            for p, (lo, hi) in zip(unit.sharded, unit.rows):
                if names[id(p)] in states:
                    s = states[names[id(p)]]
                    run.opt.state[p] = {"step": s["step"].clone()} | {k: s[k][lo:hi].clone() for k in MOMENTS}
        return
    for name, p in run.model.named_parameters():
        if name in states:
            s = states[name]
            cut = (lambda t: local_shard(run.model, name, t).clone()) if run.strategy == "tp" else torch.clone
            run.opt.state[p] = {"step": s["step"].clone()} | {k: cut(s[k]) for k in MOMENTS}
