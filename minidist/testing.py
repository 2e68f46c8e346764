"""How every chapter proves its technique: train it next to a reference and compare the weights.

`compare_with_reference` runs on every rank. Each rank builds the same model (same seed), keeps one untouched copy as
the *reference* and hands the other to the technique under test. Each step, the reference trains on the whole global
batch in this very process (the single-process answer), while the technique trains on this rank's slice of the same
batch and communicates. If the technique is right, the two end with the same weights, up to floating-point reduction
order. Passing a production implementation (PyTorch DDP, FSDP, ...) as `wrap` compares against it the same way.
"""
import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm import global_rank
from .launch import device
from .models import lm_loss


@dataclass
class Comparison:
    max_abs_diff: float          # largest |weight - reference weight| over all parameters after training
    worst_param: str             # the parameter where it occurs
    losses: list[float]          # the technique's loss on this rank's slice, per step
    reference_losses: list[float]


def on_device(fn):
    """Run a rank function with this rank's device as the default for new tensors and modules (its GPU under NCCL,
    the CPU under gloo), and bring tensors in its result back to the CPU so they can travel to the parent."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        dev = device()
        if dev.type == "cpu":  # the default already (and a device context slows every torch call down)
            result = fn(*args, **kwargs)
        else:
            with torch.device(dev):
                result = fn(*args, **kwargs)
        return torch.utils._pytree.tree_map(lambda v: v.cpu() if torch.is_tensor(v) else v, result)
    return run


def to_device(batch):
    """Every tensor of `batch` on this rank's device."""
    return tuple(t.to(device()) for t in batch)


def shard_batch(batch, rank: int, world_size: int):
    """This rank's contiguous slice of every tensor in `batch` along dim 0 (which must divide evenly)."""
    out = []
    for t in batch:
        if t.shape[0] % world_size:
            raise ValueError(f"global batch of {t.shape[0]} does not divide across {world_size} ranks")
        out.append(t.chunk(world_size)[rank])
    return tuple(out)


def sgd(lr: float = 0.1):
    return lambda params: torch.optim.SGD(params, lr=lr)


def adam(lr: float = 1e-3):
    return lambda params: torch.optim.Adam(params, lr=lr)


def compare_with_reference(build_model, wrap, batches, *, optimizer=sgd(), dist_optimizer=None, step=None,
                           loss_fn=lm_loss, params_of=None, group=None, seed: int = 0) -> Comparison:
    """Train `wrap(model)` on this rank's slices of `batches` next to an unwrapped reference on the full batches.

    build_model():            a fresh model (called once, after seeding, so every rank builds the same weights)
    wrap(model):              the technique under test; returns the module to train
    optimizer(params):        the optimizer for both (dist_optimizer(params), if given, for the technique's side)
    step(module, opt, batch): one training step of the technique on this rank's slice (default: forward, loss,
                              backward, opt.step(), opt.zero_grad())
    params_of(module):        name -> full tensor of the trained weights (default: the model's named_parameters;
                              sharded techniques gather theirs here)
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(seed)
    reference = build_model().to(device())
    model = copy.deepcopy(reference)
    wrapped = wrap(model)
    ref_opt = optimizer(reference.parameters())
    opt = (dist_optimizer or optimizer)(wrapped.parameters())
    step = step or _default_step(loss_fn)
    losses, ref_losses = [], []
    for batch in batches:
        batch = to_device(batch)
        ref_losses.append(_default_step(loss_fn)(reference, ref_opt, batch))
        losses.append(step(wrapped, opt, shard_batch(batch, rank, world)))
    trained = params_of(wrapped) if params_of else dict(model.named_parameters())
    diffs = {name: (trained[name].detach() - p.detach()).abs().max().item()
             for name, p in reference.named_parameters()}
    worst = max(diffs, key=diffs.get)
    return Comparison(diffs[worst], worst, losses, ref_losses)


def _default_step(loss_fn):
    def step(module, opt, batch):
        x, y = batch
        loss = loss_fn(module(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()
    return step


def replica_divergence(module: torch.nn.Module, group=None) -> float:
    """Largest difference, over all ranks, between a rank's parameters and rank 0's (0.0: bitwise in sync).

    Collective, and the same answer on every rank. Uses torch.distributed directly, so a ByteLedger measuring the
    technique does not see these checks.
    """
    worst = torch.zeros((), device=next(module.parameters()).device)
    for p in module.parameters():
        mine = p.detach().contiguous()
        first = mine.clone()
        dist.broadcast(first, src=global_rank(0, group), group=group)
        if mine.numel():
            worst = torch.maximum(worst, (mine - first).abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return worst.item()


def value_errors(*calls) -> list[str]:
    """The messages of the ValueErrors that `calls` raise, called in order (a call that raises none adds nothing, so a
    test that counts or compares the messages notices it; any other exception propagates)."""
    errors = []
    for call in calls:
        try:
            call()
        except ValueError as e:
            errors.append(str(e))
    return errors


def assert_replicas_in_sync(module: torch.nn.Module, group=None, atol: float = 0.0) -> None:
    """Raise AssertionError (on every rank) if some rank's parameters differ from rank 0's by more than `atol`."""
    diff = replica_divergence(module, group)
    if diff > atol:
        raise AssertionError(f"replicas out of sync: parameters differ from rank 0's by up to {diff:.3g} (atol {atol})")


# ---- printed checks: what a notebook shows is also what it asserts ------------------------------------------------
# A measured difference is printed as "7.5e-09" (one decimal, scientific): another machine sums in another order and
# prints other digits, so notebooks/sanitize.cfg hides exactly this format from nbval's comparison, while the call
# below raises when the tolerance is exceeded (nbval then fails the cell, whatever the sanitizer hides).

def measured(value) -> str:
    """A measured float as notebooks print it ("7.5e-09"): the format nbval's sanitizer replaces."""
    return f"{float(value):.1e}"


def within(value, tol: float, what: str = "difference") -> str:
    """Raise if `value` exceeds `tol` (NaN too); else return "7.5e-09 (tolerance 1e-06)" for the caller to print."""
    value = float(value)
    if not value <= tol:
        raise AssertionError(f"{what} {value:.3e} exceeds its tolerance {tol:g}")
    return f"{measured(value)} (tolerance {tol:g})"


def beyond(value, bound: float, what: str = "difference") -> str:
    """The other side of a check: a wrong method must miss by more than `bound`. Raise if it does not; else return
    "9.7e-03 (above 5e-05)"."""
    value = float(value)
    if not value > bound:
        raise AssertionError(f"{what} {value:.3e} was expected above {bound:g}")
    return f"{measured(value)} (above {bound:g})"


def equal(value, expected, what: str = "count") -> str:
    """Raise unless `value == expected` (byte counts, integers); else return "169,472 (formula 169,472)"."""
    if value != expected:
        raise AssertionError(f"{what} {value!r} != {expected!r}")
    return f"{_number(value)} (formula {_number(expected)})"


def _number(v) -> str:
    return f"{v:,}" if isinstance(v, int) else f"{v:,.2f}" if isinstance(v, float) else str(v)


# Structure, for the graders: was a collective started asynchronously, and how many bytes left this rank.

@contextmanager
def issue_log():
    """Inside, each collective minidist.comm issues appends to the yielded list how many asynchronous collectives
    issued before it were still running at that moment. Under a slow SimulatedLink, three collectives started back to
    back give [0, 1, 2]; three blocking ones, or three each waited on before the next, give [0, 0, 0]."""
    from .comm import backend
    log, works, real = [], [], backend.run

    def run(*args, **kwargs):
        log.append(sum(not w.is_completed() for w in works))
        out = real(*args, **kwargs)
        if isinstance(out, backend.Work):
            works.append(out)
        return out
    backend.run = run
    try:
        yield log
    finally:
        backend.run = real


@contextmanager
def bytes_sent():
    """Inside, under `comm.ring_backend()`: the yielded dict's "bytes" grows by every byte this rank sends, counted by
    minidist's ring, plus the input bytes of any torch.distributed collective called directly (unrecorded by the
    ledger, so a way around it would otherwise go unseen)."""
    from . import comm
    sent = {"bytes": 0}
    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
             "broadcast", "all_to_all", "all_to_all_single", "gather", "scatter", "reduce")
    real = {name: getattr(dist, name) for name in names}

    def raw(name):
        def call(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
            tensors += [t for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple)) for t in a
                        if torch.is_tensor(t)]
            sent["bytes"] += max((t.numel() * t.element_size() for t in tensors), default=0)
            return real[name](*args, **kwargs)
        return call
    ledger = comm.ByteLedger()
    for name in names:
        setattr(dist, name, raw(name))
    try:
        with ledger:
            yield sent
            comm.backend.drain()
    finally:
        for name in names:
            setattr(dist, name, real[name])
        sent["bytes"] += int(ledger.total_bytes())
