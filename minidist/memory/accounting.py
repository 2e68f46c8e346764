"""Where the memory of training goes: the model (formulas) and the measurement (bytes each rank really holds).

Model states (Rajbhandari et al. 2020, "ZeRO"). Adam keeps, per parameter:
    mixed precision   2 (16-bit weights) + 2 (16-bit grads) + 12 (fp32 master weights, momentum, variance) = 16 bytes
    fp32              4 (weights) + 4 (grads) + 8 (momentum, variance)                                 = 16 bytes
With Ψ parameters, N data-parallel ranks and K = 12 bytes of optimizer state (mixed precision), each rank holds:
    stage 0 (DDP)                               16Ψ
    stage 1: shard the optimizer states         4Ψ + 12Ψ/N
    stage 2: ... and the gradients              2Ψ + 14Ψ/N
    stage 3: ... and the parameters             16Ψ/N
Stage 1 shards *optimizer states* (not gradients), and the 16 bytes are 2+2 in half precision plus 12 in fp32: mixing
up either (as the seed article's calculator does) misstates every row.

Activations (Korthikanti et al. 2022, "Reducing activation recomputation"). One transformer layer with sequence s,
micro-batch b, hidden h and a heads saves for backward, counted in values:
    attention  sbh (LayerNorm input) + sbh (QKV input) + 3sbh (Q, K, V) + a s^2 b (softmax output) + sbh (proj input)
    MLP        sbh (LayerNorm input) + sbh (fc input) + 4sbh (GELU input) + 4sbh (proj input)
    = 16sbh + a s^2 b values; with dropout add the masks (2sbh + a s^2 b elements, one byte each on a GPU) and the
dropped attention (a s^2 b values). In 16-bit with dropout this is the paper's s*b*h*(34 + 5*a*s/h) bytes.
"""
import math
from dataclasses import dataclass

import torch

BYTES_PER_PARAM = {  # precision -> (weights, gradients, optimizer states) bytes per parameter, for Adam
    "mixed": (2, 2, 12),
    "fp32": (4, 4, 8),
}
GB = 1e9


@dataclass(frozen=True)
class StateBytes:
    """Bytes of model states on one rank."""

    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def zero_state_bytes(num_params: float, world_size: int = 1, stage: int = 0, precision: str = "mixed") -> StateBytes:
    """Per-rank model-state bytes for Adam under ZeRO `stage` (0 = plain data parallel) on `world_size` ranks.

    Returns StateBytes(params, grads, optimizer): the bytes of weights, gradients and optimizer states one rank holds
    (floats: Ψ / N need not be whole). Graded: every stage 0-3, both precisions, N = 1, 3 and 64 against the ZeRO
    paper's table (7.5B parameters on 64 ranks: 120 / 31.4 / 16.6 / 1.9 GB), and the bad inputs checked above.
    """
    _check_positive(num_params=num_params, world_size=world_size)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    if precision not in BYTES_PER_PARAM:
        raise ValueError(f"precision must be one of {sorted(BYTES_PER_PARAM)}, got {precision!r}")
    # <exercise zero_state_bytes points=2>
    # hint: BYTES_PER_PARAM[precision] gives (weights, gradients, optimizer) bytes per parameter.
    # hint: each stage shards one more of the three, in the order of chapter 00's table (minidist/memory/accounting.py's
    #       docstring): first the optimizer states; a sharded state is split evenly over the N ranks.
    w, g, k = BYTES_PER_PARAM[precision]
    n = world_size
    return StateBytes(params=w * num_params / (n if stage >= 3 else 1),
                      grads=g * num_params / (n if stage >= 2 else 1),
                      optimizer=k * num_params / (n if stage >= 1 else 1))
    # </exercise>


def _check_positive(**values) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a non-negative number, got {v!r}")
    if "world_size" in values and (values["world_size"] < 1 or int(values["world_size"]) != values["world_size"]):
        raise ValueError(f"world_size must be a positive integer, got {values['world_size']!r}")


def zero_table(num_params: float, world_size: int, precision: str = "mixed") -> dict[int, StateBytes]:
    return {stage: zero_state_bytes(num_params, world_size, stage, precision) for stage in range(4)}


def format_zero_table(num_params: float, world_size: int, precision: str = "mixed") -> str:
    names = {0: "0 (DDP)", 1: "1 (optimizer)", 2: "2 (+ gradients)", 3: "3 (+ parameters)"}
    lines = [f"Model states per rank: {num_params:.4g} parameters, {world_size} ranks, {precision} Adam "
             f"(1 GB = 1e9 bytes)",
             f"{'ZeRO stage':<18}{'params GB':>11}{'grads GB':>11}{'optim GB':>11}{'total GB':>11}"]
    for stage, b in zero_table(num_params, world_size, precision).items():
        lines.append(f"{names[stage]:<18}" + "".join(f"{v / GB:>11.3g}" for v in
                                                     (b.params, b.grads, b.optimizer, b.total)))
    return "\n".join(lines)


def activation_bytes_per_layer(seq: int, batch: int, hidden: int, heads: int, bytes_per_value: int = 2,
                               dropout: bool = True, mask_bytes: int = 1) -> int:
    """Bytes one transformer layer saves for backward (see the module docstring for the terms).

    `mask_bytes` is the size of one dropout-mask element: 1 in the paper (a fused GPU kernel keeps a byte mask);
    PyTorch's CPU dropout multiplies by a scaled noise tensor and keeps it in the input's dtype.
    Graded: the paper's s*b*h*(34 + 5*a*s/h) in 16-bit with dropout, the fp32 count without dropout that
    SavedActivations measures on the tiny GPT, and the dropout terms with 1- and 4-byte masks.
    """
    _check_positive(seq=seq, batch=batch, hidden=hidden, heads=heads)
    # <exercise activation_bytes_per_layer points=2>
    # hint: add up chapter 00's table of saved tensors (also in minidist/memory/accounting.py's docstring) in values first
    #       (which tensors grow with s*b*h, which with a*s^2*b?), then turn values into bytes.
    # hint: dropout adds a mask per dropout layer (mask_bytes per element) and one more saved tensor: which?
    sbh, as2b = seq * batch * hidden, heads * seq * seq * batch
    total = bytes_per_value * (16 * sbh + as2b)
    if dropout:
        total += mask_bytes * (2 * sbh + as2b) + bytes_per_value * as2b
    return total
    # </exercise>


# Measurement.

def _unique_storages(tensors):
    """(pointer, bytes) of each distinct storage behind `tensors`: views and tied weights are counted once."""
    seen = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return seen


def measure_state_bytes(model: torch.nn.Module, optimizer=None) -> StateBytes:
    """Bytes this rank holds in parameters, gradients and optimizer state, by walking the tensors.

    Parameters and their .grad come from the model (a sharded model, fully_shard's, holds its shards there).
    Optimizer state counts the per-parameter tensors (Adam's moments); the 0-dim `step` counters (4 bytes per
    parameter tensor, not per parameter) are left out, as the formula leaves them out. An optimizer that holds more
    (fp32 master weights, gradient shards: ZeroOptimizer, MixedPrecisionOptimizer) lists it in a `held_tensors()`
    method returning {"grads": [...], "optimizer": [...]}, which is counted instead of its `state`.
    """
    params = list(model.parameters())
    if hasattr(optimizer, "held_tensors"):
        held = optimizer.held_tensors()
    else:
        held = {"grads": [], "optimizer": [] if optimizer is None else [
            t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]}
    return StateBytes(params=sum(_unique_storages(params).values()),
                      grads=sum(_unique_storages([p.grad for p in params] + held["grads"]).values()),
                      optimizer=sum(_unique_storages(held["optimizer"]).values()))


class SavedActivations:
    """Counts the bytes autograd saves for backward inside a `with` block.

    Each distinct storage is counted once (q, k and v are views of one qkv tensor); tensors of `exclude` (parameters
    and buffers of a module, say) are not activations and are skipped.
    """

    def __init__(self, exclude: torch.nn.Module | None = None):
        tensors = [] if exclude is None else [*exclude.parameters(), *exclude.buffers()]
        self._excluded = set(_unique_storages(tensors))
        self._saved: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self._excluded:
            self._saved[ptr] = t.untyped_storage().nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self._saved.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
