"""Activation checkpointing: keep a segment's input, drop what it saved for backward, recompute it in backward.

Backward needs the activations forward computed (chapter 00: a transformer layer saves 16sbh + as^2b values). With
checkpointing (Chen et al. 2016, "Training deep nets with sublinear memory cost") a segment runs its forward under
no_grad, so nothing inside it is saved; only its *input* is kept. When backward reaches the segment, it runs the
segment's forward again, this time recording the graph, and backpropagates through that fresh graph:

    forward    out = segment(x)            with no_grad: keep x (and the random-number state), save nothing else
    backward   out' = segment(x) again     with grad, the saved random state replayed, then backward(out', grad)

Replaying the random state makes dropout draw the same mask twice, so the gradients are *bit-identical* to training
without checkpointing (the same operations on the same values), not merely close. Autocast is replayed as well.

Cost, per transformer layer (s sequence, b micro-batch, h hidden, a heads; bytes in 16-bit, 1-byte dropout masks,
Korthikanti et al. 2022, "Reducing activation recomputation in large transformer models"):

    policy      what is recomputed                     saved per layer          extra compute
    none        nothing                                sbh(34 + 5as/h)          0
    selective   the core attention (q k^T, softmax,    34 sbh                   two (b, a, s, s) matmuls: 4 b s^2 h
                dropout, @ v): its s^2 tensors
    full        the whole layer                        2 sbh (its input)        one more forward of every layer

Full checkpointing costs one more forward: a step goes from forward + backward (1 + 2) to 1 + 1 + 2, a third more
FLOPs. Selective recomputes only what is large but cheap: the a s^2 b tensors take as much memory as 5as/h of the
34 sbh, yet cost a few percent of the layer's FLOPs.

`checkpoint_blocks(model, policy)` applies a policy to a model without touching its code: it finds the transformer
blocks (the longest nn.ModuleList: GPT's `blocks`, Llama's `model.layers`, GPT-2's `transformer.h`) and replaces,
on each instance, `forward` (full) or the attention's `attend` method (selective) by a checkpointed call. State-dict
keys do not change. Checkpointing is a *reentrant* autograd Function here (as torch.utils.checkpoint with
use_reentrant=True): its backward calls torch.autograd.backward again, a backward nested inside the outer one, which
accumulates the parameters' gradients into .grad (DataParallel's hooks handle that). So it works only under a
plain .backward(): torch.autograd.grad or backward(inputs=...) would not see those gradients, and are refused. torch's
*non-reentrant* version (use_reentrant=False) records nothing special in forward but saved-tensor hooks, and
recomputes when backward first unpacks a saved tensor, inside the one backward: the same values, and autograd.grad
works. Recomputation reruns the forward's side effects: a module updating buffers in forward (BatchNorm's running
statistics, num_batches_tracked) updates them twice per step, as under torch's checkpoint.
"""
import functools
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .accounting import activation_bytes_per_layer

POLICIES = ("full", "selective")


def capture_state(tensors) -> dict:
    """What the recomputation must replay, taken when a checkpointed segment's forward starts: a dict
        "cpu":      the CPU's random-number state (a snapshot: later draws must not change it)
        "devices":  {device: its random-number state} for every non-CPU device holding one of `tensors` (CPU: {})
        "autocast": (device type, enabled, dtype): autocast's setting for the type of those devices ("cpu" if none)
    as replayed(state) restores it. Graded: a dropout block recomputed with it gives bit-identical gradients, also
    under CPU autocast in bf16; the snapshot unchanged by later draws; the autocast entry in and out of autocast."""
    # <exercise capture_state points=2>
    # hint: each device type has its own module for its generator (torch.get_device_module), and its own autocast
    #       switch: ask about the device type the segment runs on, not the default one.
    devices = sorted({t.device for t in tensors if torch.is_tensor(t) and t.device.type != "cpu"}, key=str)
    kind = devices[0].type if devices else "cpu"
    return {"cpu": torch.get_rng_state(),
            "devices": {d: torch.get_device_module(d.type).get_rng_state(d) for d in devices},
            "autocast": (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))}
    # </exercise>


@contextmanager
def replayed(state: dict):
    """Inside: the random state and autocast of `state`; on leaving, the random streams continue as before, so the
    recomputation draws no number that training would otherwise have drawn."""
    devices = list(state["devices"])
    kind, enabled, dtype = state["autocast"]
    with torch.random.fork_rng(devices=[d.index for d in devices], device_type=devices[0].type if devices else "cuda"):
        torch.set_rng_state(state["cpu"])
        for d, s in state["devices"].items():
            torch.get_device_module(d.type).set_rng_state(s, d)
        with torch.autocast(kind, dtype=dtype, enabled=enabled):
            yield


def recompute_gradients(fn, inputs: list, state: dict, grad_outputs: tuple) -> list:
    """The backward of a checkpointed segment: gradients of `inputs` (None where an input is not a tensor or needs
    no gradient), given the gradients of the segment's outputs; the parameters used by `fn` get theirs accumulated
    into their .grad on the way.

    fn(*inputs) is the segment (a tensor or a tuple of tensors out); `state` is capture_state()'s, taken when forward
    ran: recompute inside `replayed(state)` so dropout draws the same masks. The recomputation must record a graph
    of its own, starting from inputs that are *not* connected to the outer graph. Outputs that need no gradient, or
    whose gradient is None, are left out of the backward. Graded: for a transformer block with dropout, the input's
    gradient and every parameter's bit-identical to no checkpointing, and the training's random stream left where it
    was (the recomputation draws no number from it); for a segment with a tensor input that needs no gradient and a
    non-tensor input (both get None) and a tuple output whose second element's gradient is None, the input's and the
    weight's gradients bit-identical to no checkpointing.
    """
    # <exercise recompute_gradients points=3>
    # hint: replayed(state) (from minidist.memory.recompute import replayed) restores forward's random state and
    #       autocast inside its `with` block, and leaves the random stream as it found it.
    # hint: give fn copies of the tensor inputs cut from the outer graph (detach) that require a gradient exactly
    #       when the originals do; the gradients end up in their .grad.
    # hint: forward ran under no_grad: the recomputation must turn gradients back on.
    # hint: torch.autograd.backward(tensors, grad_tensors) backpropagates through several outputs at once.
    detached = [x.detach().requires_grad_(x.requires_grad) if torch.is_tensor(x) else x for x in inputs]
    with torch.enable_grad(), replayed(state):
        outputs = fn(*detached)
    outputs = (outputs,) if torch.is_tensor(outputs) else tuple(outputs)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad and g is not None]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return [x.grad if torch.is_tensor(x) and x.requires_grad else None for x in detached]
    # </exercise>


class Recompute(torch.autograd.Function):
    """forward: run the segment without recording anything, keep its inputs; backward: recompute_gradients."""

    @staticmethod
    def forward(ctx, run, _anchor, *inputs):
        ctx.run, ctx.state = run, capture_state(inputs)
        ctx.slots = [i for i, x in enumerate(inputs) if torch.is_tensor(x)]
        ctx.others = [None if torch.is_tensor(x) else x for x in inputs]
        ctx.save_for_backward(*(inputs[i] for i in ctx.slots))  # the only activations the segment keeps
        with torch.no_grad():
            out = run(*inputs)
        if not (torch.is_tensor(out) or isinstance(out, tuple) and all(torch.is_tensor(o) for o in out)):
            raise ValueError(f"a checkpointed segment must return a tensor or a tuple of tensors, got {type(out)}")
        return out

    @staticmethod
    def backward(ctx, *grads):
        if not torch.autograd._is_checkpoint_valid():  # autograd.grad or backward(inputs=...): see the module docstring
            raise RuntimeError("a checkpointed segment recomputes with a nested backward that accumulates into .grad: "
                               "it works under loss.backward() only, not torch.autograd.grad or backward(inputs=...)")
        inputs = list(ctx.others)
        for i, x in zip(ctx.slots, ctx.saved_tensors):
            inputs[i] = x
        return (None, None, *recompute_gradients(ctx.run, inputs, ctx.state, grads))


def checkpoint(fn, *args, **kwargs):
    """fn(*args, **kwargs), checkpointed: its activations are recomputed in backward instead of kept.

    Tensors anywhere in the arguments (nested in lists, dicts, keyword arguments) are the segment's inputs. An
    empty tensor that requires a gradient rides along (the anchor), so the segment is part of the graph, and its
    parameters get gradients, even when no input requires one (the first layer after a frozen embedding).
    Without grad mode (evaluation), fn simply runs. fn runs twice in training: its side effects (buffer updates)
    happen twice.
    """
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    flat, spec = tree_flatten((args, kwargs))

    def run(*leaves):
        a, k = tree_unflatten(list(leaves), spec)
        return fn(*a, **k)
    anchor = torch.empty(0, requires_grad=True)
    return Recompute.apply(run, anchor, *flat)


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks: its longest nn.ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks to checkpoint")
    return max(lists, key=len)


def _checkpoint_method(module: nn.Module, name: str) -> None:
    """Replace module.<name> on this instance by a checkpointed call of the method it had (keeping, to restore, an
    instance attribute it may already have had)."""
    original = getattr(module, name)
    own = (module.__dict__[name],) if name in module.__dict__ else ()  # () when the class's method was used
    setattr(module, name, functools.wraps(original)(functools.partial(checkpoint, original)))
    module._minidist_checkpointed = (name, own)


def checkpoint_blocks(model: nn.Module, policy: str = "full") -> nn.Module:
    """Apply activation checkpointing to every transformer block of `model`, in place; returns the model.

    policy "full": each block's forward is recomputed in backward (only block inputs are kept);
    "selective": each block's core attention (a module's `attend(q, k, v)` method, the GPT's) is recomputed.
    A recomputed segment must have no side effects: a Hugging Face model's KV cache is turned off
    (config.use_cache = False, as HF's own gradient checkpointing does), or the recomputation would append to it.
    """
    if policy not in POLICIES:
        raise ValueError(f"checkpointing policy must be one of {POLICIES}, got {policy!r}")
    if any(getattr(m, "_minidist_checkpointed", None) for m in model.modules()):
        raise ValueError("this model is already checkpointed: call uncheckpoint(model) first")
    if getattr(getattr(model, "config", None), "use_cache", False):
        model.config.use_cache = False  # a KV cache filled in forward would be filled again by the recomputation
        model._minidist_use_cache = True  # restored by uncheckpoint
    blocks = find_blocks(model)
    for block in blocks:
        if policy == "full":
            _checkpoint_method(block, "forward")
            continue
        attention = [m for m in block.modules() if callable(getattr(m, "attend", None))]
        if not attention:
            raise ValueError(f"selective checkpointing recomputes the core attention, a method attend(q, k, v); "
                             f"{type(block).__name__} has no submodule with one")
        for m in attention:
            _checkpoint_method(m, "attend")
    return model


def uncheckpoint(model: nn.Module) -> nn.Module:
    """Undo checkpoint_blocks: every module runs the methods it had before again (its own instance attributes
    included), and a Hugging Face model's KV cache setting is restored."""
    for m in model.modules():
        name, own = m.__dict__.pop("_minidist_checkpointed", (None, ()))
        if name:
            delattr(m, name)
            if own:
                setattr(m, name, own[0])
    if model.__dict__.pop("_minidist_use_cache", False):
        model.config.use_cache = True
    return model


def saved_bytes_per_layer(policy: str, seq: int, batch: int, hidden: int, heads: int, bytes_per_value: int = 2,
                          dropout: bool = True, mask_bytes: int = 1) -> int:
    """Bytes one transformer layer keeps for backward under `policy` ("none", "selective", "full").

    none: chapter 00's memory.activation_bytes_per_layer (with the same arguments). selective: the same without the
    terms that grow with a s^2 b (they are recomputed). full: the layer's input only, s b h values. Arguments as
    activation_bytes_per_layer's (positive integers; mask_bytes: one dropout-mask element). An unknown policy is a
    ValueError. Graded: the paper's 34 sbh and 2 sbh in 16-bit with dropout, none equal to chapter 00's formula,
    selective in fp32 with dropout and 4-byte masks, the fp32 counts without dropout that SavedActivations measures
    on the tiny GPT (plus LayerNorm statistics) for all three policies, and the ValueError.
    """
    if policy not in ("none", *POLICIES):
        raise ValueError(f"policy must be 'none', 'full' or 'selective', got {policy!r}")
    everything = activation_bytes_per_layer(seq, batch, hidden, heads, bytes_per_value, dropout, mask_bytes)
    # <exercise saved_bytes_per_layer points=1>
    # hint: which of chapter 00's terms grow with a * s^2 * b, and how many bytes does each take per element?
    if policy == "none":
        return everything
    if policy == "full":
        return bytes_per_value * seq * batch * hidden
    as2b = heads * seq * seq * batch
    return everything - bytes_per_value * as2b - (mask_bytes * as2b + bytes_per_value * as2b if dropout else 0)
    # </exercise>
