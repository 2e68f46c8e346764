"""Where this rank's tensors sit inside the global tensors, for every parallelism minidist has: boxes.

A sharded checkpoint stores the *global* tensors (the ones a single process would hold) in pieces. Every piece is a
box of a global tensor: `offsets` (its first index along each dimension) and `lengths` (its extent along each),
torch.distributed.checkpoint's ChunkStorageMetadata. What each rank holds of a global tensor of shape (d0, d1, ...)
is a list of boxes, each with a `take` that finds the box's elements inside the rank's local tensor:

    replicated       DataParallel, a ZeRO model, TP's norms:   one box, the whole tensor (written once, by one rank)
    column-parallel  rows [r*out/N, (r+1)*out/N) of (out, in); a fused q|k|v holds one row box in each third;
                     a vocabulary padded to a multiple of N keeps only its real rows (the padding is no one's data)
    row-parallel     columns [r*in/N, (r+1)*in/N) of (out, in)
    dim-0 shards     FSDP's parameters (and their optimizer states): rows [lo, hi) of the global tensor, one box
    flat shards      ZeRO's master weights and optimizer states: elements [lo, hi) of the flattened
                     tensor, which is not a box: flat_boxes cuts it into at most 2d - 1 boxes (a partial first row,
                     whole rows, a partial last row, recursively)
    pipeline stage   whole tensors, named as the whole model names them (Stage.global_names)

An optimizer's per-element states (Adam's moments, fp32 master weights) share their parameter's boxes; per-tensor
scalars (Adam's step) are replicated boxes of shape (). Everything is named as torch names it: the model's state_dict
keys, and optimizer states as DCP's flattened optimizer state dict does ("optim.state.<parameter>.<state>").
"""
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn


def flat_boxes(shape, start: int, stop: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The boxes (offsets, lengths) that hold elements [start, stop) of a row-major tensor of `shape`, flattened.

    The boxes come in flat order, each holds consecutive elements, and a run of whole rows is one box: within one
    row, recurse into the row; else a partial first row (recursively), one box of whole rows, a partial last row
    (recursively). A 0-d tensor (shape ()) has one element, whose box is ((), ()). An empty range gives [].
    Graded: by hand (a 1-d range, a range inside one row, a 2-d and a 3-d range cut at both ends, whole rows, the
    0-d tensor, the empty range), and for random shapes and ranges: the boxes, in order, list exactly the elements
    start..stop-1 in flat order, with at most 2 * ndim - 1 boxes.
    """
    # <exercise flat_boxes points=3>
    # hint: along dimension 0 a "row" holds prod(shape[1:]) elements; which rows do start and stop - 1 fall in?
    # hint: a box that holds one row of a recursive answer gets offset (row, *offsets) and lengths (1, *lengths).
    if start >= stop:
        return []
    if len(shape) == 0:
        return [((), ())]
    if len(shape) == 1:
        return [((start,), (stop - start,))]
    row = math.prod(shape[1:])
    first, last = start // row, (stop - 1) // row
    if first == last:
        return [((first, *o), (1, *n)) for o, n in flat_boxes(shape[1:], start - first * row, stop - first * row)]
    boxes = []
    if start % row:
        boxes += flat_boxes(shape, start, (first + 1) * row)
        first += 1
    whole_end = stop // row
    if whole_end > first:
        boxes.append(((first, *[0] * (len(shape) - 1)), (whole_end - first, *shape[1:])))
    if stop % row:
        boxes += flat_boxes(shape, whole_end * row, stop)
    return boxes
    # </exercise>


@dataclass
class Box:
    offsets: tuple
    lengths: tuple
    take: Callable  # local tensor -> the view of it that holds this box, shaped `lengths`


@dataclass
class Placement:
    """What this rank holds of one global tensor of `shape`: `boxes` (none: it holds nothing of it)."""
    shape: tuple
    boxes: list


def whole(t: torch.Tensor) -> Placement:
    return Placement(tuple(t.shape), [Box((0,) * t.dim(), tuple(t.shape), lambda x: x)])


def flat(shape, start: int, stop: int) -> Placement:
    """Elements [start, stop) of the flattened global tensor, held in a local 1-d tensor of stop - start elements."""
    boxes, at = [], 0
    for offsets, lengths in flat_boxes(tuple(shape), start, stop):
        size = math.prod(lengths)
        boxes.append(Box(offsets, lengths, lambda x, a=at, k=size, ln=lengths: x.reshape(-1)[a:a + k].view(ln)))
        at += size
    return Placement(tuple(shape), boxes)


def _rows(shape, local_rows: list[tuple[int, int, int]]) -> Placement:
    """Row boxes: (global first row, local first row, rows) for each, of a global tensor of `shape`."""
    rest = tuple(shape[1:])
    return Placement(tuple(shape), [Box((g, *[0] * len(rest)), (k, *rest), lambda x, lo=lo, k=k: x[lo:lo + k])
                                    for g, lo, k in local_rows if k > 0])


def column_rows(out_features: int, local_out: int, chunks: int, rank: int, valid_out: int) -> list[tuple]:
    """Which rows of a column-parallel weight (out_features x in, or its bias) rank `rank` holds, for a checkpoint
    that stores the *global* tensor: a list of (global first row, first row in the local shard, number of rows).

    The local shard has local_out rows. A fused layer (chunks = 3: q|k|v) is `chunks` blocks of out_features /
    chunks rows, each split evenly over the ranks; the shard holds the rank's slice of each block, in block order
    (tensor_parallel.shard_output_features). Otherwise (chunks = 1) the rows are padded to local_out * N, a
    vocabulary that N does not divide, and only the first valid_out rows of the shard are real (0 on a rank holding
    only padding): the padding is nobody's data and must not be saved. Graded: by hand (q|k|v on 2 and 3 ranks, a
    509-token vocabulary on 2 and 3 ranks, a rank of padding only), and the boxes of a tensor-parallel GPT on 2 ranks
    tiling each global tensor once with its values.
    """
    # <exercise column_rows points=2>
    # hint: where does block c begin in the global tensor, and where does this rank's slice of it begin within
    #       the block? And in the shard?
    per, block = local_out // chunks, out_features // chunks
    return [(c * block + rank * per, c * per, valid_out if chunks == 1 else per) for c in range(chunks)]
    # </exercise>


def tensor_parallel_placements(model: nn.Module) -> dict[int, Placement]:
    """id(parameter) -> its placement, for the layers tensor_parallel/ swapped in (chapter 04)."""
    from ..tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    out = {}
    for m in model.modules():
        if not isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            continue
        r = dist.get_rank(m.group)
        if isinstance(m, ColumnParallelLinear):
            rows = column_rows(m.out_features, m.local_out, m.chunks, r, m.valid_out)
            for t in (m.weight, m.bias):
                if t is not None:
                    out[id(t)] = _rows((m.out_features, *t.shape[1:]), rows)
        elif isinstance(m, RowParallelLinear):  # the bias is whole on every rank
            cols = m.weight.shape[1]
            out[id(m.weight)] = Placement((m.out_features, m.in_features),
                                          [Box((0, r * cols), tuple(m.weight.shape), lambda x: x)])
        else:
            valid = min(max(m.num_embeddings - m.start, 0), m.local_rows)
            out[id(m.weight)] = _rows((m.num_embeddings, m.embedding_dim), [(m.start, 0, valid)])
    return out


def fsdp_placements(model: nn.Module) -> dict[int, Placement]:
    """id(sharded parameter) -> its placement, for every fully_shard unit (chapters 05-06): its dim-0 rows."""
    out = {}
    for m in model.modules():
        unit = getattr(m, "fsdp_unit", None)
        if unit is not None and unit.count:
            if unit.gathered:
                raise ValueError(f"fully_shard unit {unit.name} is gathered: save or load between steps")
            for shard, shape, (lo, hi) in zip(unit.sharded, unit.shapes, unit.rows):
                out[id(shard)] = _rows(shape, [(lo, 0, hi - lo)])
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DataParallel (minidist's or torch's): its state_dict names are the model's."""
    from ..data_parallel import DataParallel
    while isinstance(model, (DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def model_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, Placement]]:
    """Global name -> (this rank's tensor, its placement), for every entry of the model's state_dict (a tied weight
    under each of its names, as state_dict lists it)."""
    model = unwrap(model)
    special = {**tensor_parallel_placements(model), **fsdp_placements(model)}
    rename = {}
    for prefix, m in model.named_modules():  # pipeline stages: their keys as the whole model names them
        for local, name in getattr(m, "global_names", {}).items():
            rename[f"{prefix}.{local}" if prefix else local] = name
    return {rename.get(k, k): (t, special.get(id(t)) or whole(t)) for k, t in model.state_dict(keep_vars=True).items()}


@dataclass
class Entry:
    """One optimizer-stepped tensor: its parameter's name, its placement, the tensor itself (shapes the states), the
    dict and key of its state in the optimizer, and the fp32 master copy when the optimizer keeps one apart."""
    name: str
    placement: Placement
    local: torch.Tensor
    states: dict
    key: torch.Tensor
    master: torch.Tensor | None = None
    save_master: bool = False           # False: the master equals the model's weights, rebuilt from them on load
    from_model: Callable | None = None  # () -> the master's values from the model
    trainable: bool = True              # False: a frozen parameter handed to the optimizer (it never gets states)


def optimizer_entries(model: nn.Module, optimizer) -> list[Entry]:
    """The optimizer's tensors: a torch optimizer on the model's (possibly sharded) parameters, a ZeroOptimizer
    (flat pieces of its fp32 master buffer), or a MixedPrecisionOptimizer (fp32 masters of a 16-bit model)."""
    from ..mixed_precision import MixedPrecisionOptimizer
    from ..zero import ZeroOptimizer
    tensors, names = model_tensors(model), {}
    for name, (t, _) in tensors.items():
        names.setdefault(id(t), name)

    def info(p):
        if id(p) not in names:
            raise ValueError(f"the optimizer holds a tensor of shape {tuple(p.shape)} that is not a parameter of "
                             f"the model: pass the model whose parameters it optimizes")
        return names[id(p)], tensors[names[id(p)]][1]
    if isinstance(optimizer, ZeroOptimizer):
        keep, ps = any(p.dtype != torch.float32 for p in optimizer.params), optimizer.params
        return [Entry(info(ps[i])[0], flat(ps[i].shape, lo, hi), piece, optimizer.optimizer.state, piece, piece, keep,
                      lambda p=ps[i], lo=lo, hi=hi: p.detach().reshape(-1)[lo:hi])
                for (i, lo, hi, _, _), piece in zip(optimizer.where, optimizer.pieces)]
    if isinstance(optimizer, MixedPrecisionOptimizer):
        return [Entry(*info(p), m, optimizer.optimizer.state, m, m, True, lambda p=p: p.detach().float())
                for p, m in zip(optimizer.params, optimizer.master)]
    if isinstance(optimizer, torch.optim.Optimizer):
        return [Entry(*info(p), p, optimizer.state, p, trainable=p.requires_grad)
                for g in optimizer.param_groups for p in g["params"]]
    raise ValueError(f"cannot checkpoint an optimizer of type {type(optimizer).__name__}: a torch.optim.Optimizer, "
                     f"minidist's ZeroOptimizer or MixedPrecisionOptimizer")


def state_placement(entry: Entry, key: str, value) -> Placement:
    """A state's placement: its parameter's when it has the parameter's shape, replicated when it is a scalar."""
    if torch.is_tensor(value) and value.shape == entry.local.shape:
        return entry.placement
    if torch.is_tensor(value) and value.dim() == 0:
        return whole(value)
    raise ValueError(f"optimizer state {key!r} of {entry.name} is neither per element nor a scalar tensor "
                     f"({type(value).__name__} {tuple(getattr(value, 'shape', ()))}): no layout for it")


def inner_param_groups(optimizer) -> list[dict]:
    """The param_groups whose hyperparameters a checkpoint keeps (a MixedPrecisionOptimizer's are its inner one's)."""
    inner = getattr(optimizer, "optimizer", None)
    return optimizer.param_groups if hasattr(optimizer, "param_groups") else inner.param_groups
