"""Sharded checkpoints: each rank writes its own pieces, one metadata file says where every piece of every global
tensor lies, and any layout at any world size reads back exactly the pieces it needs. Resharding is a property of
the format, not a conversion step (the idea of torch.distributed.checkpoint, DCP, and of ByteCheckpoint, 2024, at
scale; why checkpoints must be frequent and cheap to write: Mohan et al. 2021, "CheckFreq").

Saving `model.state_dict()` from rank 0 cannot work once anything is sharded: rank 0 holds only its shard of a ZeRO
optimizer, of an FSDP unit, of a tensor-parallel layer, and only its own pipeline stage. Instead, each global
tensor (the one a single process would hold) is stored as chunks, boxes (offsets, lengths) of it, in the files of
the ranks that held them; path/metadata.json lists every tensor's shape, dtype and chunks (checkpoint/file_format.py has
the files, checkpoint/layout.py the boxes of each parallelism). `extra` (step, RNG states, sampler position, loss
scaler: what resuming needs besides tensors) is kept per rank.

save (collective; every rank calls it):
    plan     every rank lists its boxes; they are all-gathered, and a box several ranks hold (replicas) gets one
             writer, the least loaded: each state-dict entry is written once (a tied weight under each name)
    write    into path.partial/, each rank only the chunks it was given
    agree    every rank learns whether every write succeeded: one failure, and every rank raises, path untouched
    commit   rank 0 writes metadata.json, then renames (commit): a crash at any moment leaves a whole checkpoint
load (no communication): every rank reads metadata.json, intersects each box it holds with the saved chunks of the
same tensor (read_plan) and reads those slices only, through safetensors' memory map: a rank reads the bytes it
holds, never its neighbours'. Pickled files (optimizer.pt, extra) are read with weights_only=True. A directory
written by DCP's own dcp.save loads too (its chunks are read whole: DCP pickles each one).
"""
import json
import os
import random
import shutil
from collections import defaultdict

import torch
import torch.distributed as dist

from .. import comm
from ..launch import device
from .file_format import (commit, cover_problem, dtype_name, extra_bytes, finish, global_plan,  # noqa: F401
                          identity, param_groups, read_metadata, read_pieces, resolve, torch_load, write_files)
from .layout import inner_param_groups, model_tensors, optimizer_entries, state_placement, whole


def read_plan(chunks, offsets, lengths) -> list[tuple[int, tuple, tuple]]:
    """Which parts of which saved chunks fill the box (offsets, lengths) of a global tensor.

    `chunks`: the saved boxes of that tensor, [(offsets, lengths), ...]. Returns, for each chunk that shares at
    least one element with the box, in chunk order: (chunk index, the shared part as a tuple of slices into the
    chunk, the same part as a tuple of slices into the box), both counted from their own first element, one slice
    per dimension. A 0-d tensor's box is ((), ()): it overlaps a chunk ((), ()) in its one element, giving (i, (), ()).
    Graded: by hand (a box inside one chunk, across two and four chunks, touching a chunk edge without overlap, the
    0-d case, an empty box: []) and on random 1-3-d boxes: the parts copied from their chunks fill the box.
    """
    # <exercise read_plan points=2>
    # hint: one dimension at a time: where do the ranges [a, a + m) and [b, b + n) overlap, and when not at all?
    # hint: the same global index g is g - (chunk offset) inside the chunk and g - (box offset) inside the box.
    plan = []
    for i, (c_off, c_len) in enumerate(chunks):
        lo = [max(a, b) for a, b in zip(c_off, offsets)]
        hi = [min(a + m, b + k) for a, m, b, k in zip(c_off, c_len, offsets, lengths)]
        if all(low < high for low, high in zip(lo, hi)):
            plan.append((i, tuple(slice(low - a, high - a) for low, high, a in zip(lo, hi, c_off)),
                         tuple(slice(low - b, high - b) for low, high, b in zip(lo, hi, offsets))))
    return plan
    # </exercise>


def rng_state() -> dict:
    """This rank's random generators, for `extra`: torch's (CPU, and the accelerator's if any) and Python's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device().type != "cpu":
        state["device"] = torch.get_device_module(device().type).get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "device" in state:
        torch.get_device_module(device().type).set_rng_state(state["device"])


# Saving.

def _local_items(model, optimizer) -> tuple[dict[tuple, tuple[dict, torch.Tensor]], dict]:
    """(key, offsets, lengths) -> (its description, the view of this rank's tensor that holds it); and what the
    metadata records besides: {"tied": [names of one tensor, ...], "optimized": [parameters in the optimizer]}."""
    items, tensors = {}, model_tensors(model)

    def add(key, t, placement):
        for box in placement.boxes:
            items[(key, tuple(box.offsets), tuple(box.lengths))] = (
                {"key": key, "shape": list(placement.shape), "dtype": dtype_name(t), "offsets": list(box.offsets),
                 "lengths": list(box.lengths)}, box.take(t.detach()))
    for key, (t, placement) in tensors.items():
        add(key, t, placement)
    entries = optimizer_entries(model, optimizer) if optimizer is not None else []
    for e in entries:
        for k, value in e.states.get(e.key, {}).items():
            add(f"optim.state.{e.name}.{k}", value, state_placement(e, k, value))
        if e.master is not None and e.save_master:
            add(f"optim.state.{e.name}.master", e.master, e.placement)
    names = defaultdict(list)
    for key, (t, _) in tensors.items():
        names[id(t)].append(key)
    return items, {"tied": [n for n in names.values() if len(n) > 1], "optimized": sorted({e.name for e in entries})}


def _ranks() -> bool:
    """Whether a process group is up (without one, save and load work in this one process)."""
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _ranks() else 0


def _all_gather_json(obj) -> list:
    """Every rank's JSON-able `obj`, in rank order (uint8 tensors padded to the longest: gloo gathers equal sizes)."""
    if not _ranks():
        return [obj]
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(device())
    sizes = comm.all_gather_cat(torch.tensor([data.numel()], device=device())).tolist()
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device())
    padded[:data.numel()] = data
    rows = comm.all_gather_cat(padded).view(len(sizes), -1).cpu()
    return [json.loads(bytes(row[:size].tolist())) for row, size in zip(rows, sizes)]


def _agree(error: BaseException | None, what: str, path: str, staged: str | None = None) -> None:
    """Collective: if any rank has an `error`, raise on every rank, naming the ranks that failed (rank 0 first
    deletes the half-written `staged` directory)."""
    flag = [error is not None]
    flags = comm.all_gather_cat(torch.tensor(flag, dtype=torch.int32, device=device())).tolist() if _ranks() else flag
    failed = [r for r, f in enumerate(flags) if f]
    if failed:
        if staged and _rank() == 0:
            shutil.rmtree(staged, ignore_errors=True)
        detail = f": {type(error).__name__}: {error}" if error is not None else ""
        kind = ValueError if isinstance(error, ValueError) else RuntimeError  # bad input stays a ValueError
        raise kind(f"checkpoint.save({path!r}) failed while {what} on rank(s) {failed}{detail}; the checkpoint at "
                   f"{path} was left as it was") from error


def save(path: str, model, optimizer=None, extra=None) -> None:
    """Save `model` (and `optimizer`, and this rank's `extra`) at directory `path`, atomically. Collective: every rank
    of the default group calls it, with its own `extra` (None: nothing; it must load with weights_only=True). All
    ranks must see `path` (one shared directory: rank 0 commits the files every rank wrote)."""
    path = os.path.normpath(path)  # "ckpt/" would stage into ckpt/.partial, inside the checkpoint it replaces
    rank, staged, error, items, info, blob = _rank(), path + ".partial", None, {}, {}, None
    try:
        if rank == 0:
            shutil.rmtree(staged, ignore_errors=True)  # what an earlier crash left half-written
            os.makedirs(staged)
        items, info = _local_items(model, optimizer)
        blob = extra_bytes(extra)
    except Exception as e:  # noqa: BLE001  (every rank must reach the collectives below)
        error = e
    described = _all_gather_json(None if error else {"items": [d for d, _ in items.values()], **info})
    _agree(error, "describing its tensors and extra", path, staged)
    tensors = global_plan([d["items"] for d in described])
    try:
        write_files(staged, tensors, items, rank, optimizer, blob)
    except Exception as e:  # noqa: BLE001
        error = e
    _agree(error, "writing its files", path, staged)
    try:
        if rank == 0:  # metadata.json, then the atomic commit
            finish(staged, path, tensors, len(described), tied=sorted({tuple(n) for d in described for n in d["tied"]}),
                   optimized=sorted({n for d in described for n in d["optimized"]}))
    except Exception as e:  # noqa: BLE001
        error = e
    _agree(error, "committing", path)


# Loading.

def _saved_states(saved: dict) -> dict[str, dict[str, str]]:
    """{parameter name: {state name: key}} for the optimizer states in the checkpoint (state names have no dot)."""
    out = defaultdict(dict)
    for key in saved:
        if key.startswith("optim.state."):
            name, state = key[len("optim.state."):].rsplit(".", 1)
            out[name][state] = key
    return out


def _weights(meta: dict, model) -> list:
    """(key to read, this rank's tensor, its placement) for the model; a 16-bit weight saved next to its fp32
    master is read from the master when this model wants fp32 (the rounded copy would lose the low bits)."""
    saved, aliases = meta["tensors"], {n: g for g in meta.get("tied", []) for n in g}
    wanted = list(model_tensors(model).items())
    missing = [k for k, _ in wanted if k not in saved]
    if missing:
        raise ValueError(f"the checkpoint has no {missing[:5]}{' ...' if len(missing) > 5 else ''}: saved from "
                         f"another model? It holds {list(saved)[:5]} ...")
    out = []
    for key, (t, placement) in wanted:
        masters = [f"optim.state.{n}.master" for n in aliases.get(key, [key])]
        master = [m for m in masters if m in saved and saved[m]["dtype"] == dtype_name(t) != saved[key]["dtype"]]
        out.append((master[0] if master else key, t, placement))
    return out


def _optimizer(meta: dict, model, optimizer) -> tuple[list, list]:
    """(key, tensor to fill, placement) for the optimizer states, and (entry, state) to install. A tied weight's
    states may be saved under another of its names; a parameter the saving optimizer did not hold is refused."""
    saved, states = meta["tensors"], _saved_states(meta["tensors"])
    if not states:
        raise ValueError("the checkpoint holds no optimizer state: it was saved without an optimizer")
    aliases, held = {n: g for g in meta.get("tied", []) for n in g}, set(meta.get("optimized", states))
    on_device = any(g.get("fused") or g.get("capturable") for g in inner_param_groups(optimizer))  # torch's policy
    wanted, installs = [], []
    for e in optimizer_entries(model, optimizer):
        names = [e.name, *(n for n in aliases.get(e.name, []) if n != e.name)]
        found = next((n for n in names if n in states), None)
        if found is None and e.trainable and not held & set(names):
            also = f" (nor for {names[1:]}, its other names)" if names[1:] else ""
            raise ValueError(f"the checkpoint has no optimizer state for {e.name}{also}: its optimizer did not hold "
                             f"that parameter")
        state = {}
        for name, key in (states[found] if found else {}).items():
            shape, dtype = tuple(saved[key]["shape"]), getattr(torch, saved[key]["dtype"])
            if name == "master":
                if e.master is not None:
                    wanted.append((key, e.master, e.placement))
                continue
            state[name] = torch.zeros(e.local.shape if shape else (), dtype=dtype,
                                      device=e.local.device if shape or on_device else "cpu")
            wanted.append((key, state[name], e.placement if shape else whole(state[name])))
        installs.append((e, state, found is not None and "master" in states[found]))
    return wanted, installs


def _wanted(meta: dict, model, optimizer, allow_cast: bool = False) -> tuple[list, list]:
    """(key, this rank's tensor, its placement) for everything to read, and (entry, state) for the optimizer."""
    wanted, installs = _weights(meta, model), []
    if optimizer is not None:
        more, installs = _optimizer(meta, model, optimizer)
        wanted += more
    saved = meta["tensors"]
    for key, t, placement in wanted:
        if tuple(saved[key]["shape"]) != placement.shape:
            raise ValueError(f"{key}: the checkpoint holds shape {tuple(saved[key]['shape'])}, this model "
                             f"{placement.shape}")
        if saved[key]["dtype"] != dtype_name(t) and not allow_cast:
            raise ValueError(f"{key}: the checkpoint holds {saved[key]['dtype']}, this model {dtype_name(t)}: pass "
                             f"allow_cast=True to convert")
    return wanted, installs


def plan_load(path: str, model, optimizer=None, allow_cast: bool = False) -> list[dict]:
    """What this rank reads to load `path` into `model` (and `optimizer`), without reading it: for every piece,
    {"key", "file", "chunk": saved box (offsets, lengths), "dtype": saved, "source": slices of the chunk, "box": this
    rank's box, "target": slices of the box, "dst": the tensor view to fill, "nbytes"}."""
    meta = read_metadata(path)
    wanted, _ = _wanted(meta, model, optimizer, allow_cast)
    return _reads(meta, wanted)


def _reads(meta: dict, wanted: list) -> list[dict]:
    reads = []
    for key, t, placement in wanted:
        chunks = meta["tensors"][key]["chunks"]
        for box in placement.boxes:
            parts = read_plan([(c["offsets"], c["lengths"]) for c in chunks], box.offsets, box.lengths)
            got = [([s.start for s in dst], [s.stop - s.start for s in dst]) for _, _, dst in parts]
            if problem := cover_problem(got, box.lengths):
                raise ValueError(f"{key}: the checkpoint's chunks do not fill box {tuple(box.offsets)} + "
                                 f"{tuple(box.lengths)} this rank needs exactly once: {problem}")
            view = box.take(t.detach())
            reads += [{"key": key, "file": chunks[i]["file"], "chunk": (chunks[i]["offsets"], chunks[i]["lengths"]),
                       "dtype": meta["tensors"][key]["dtype"], "byte_range": chunks[i].get("byte_range"),
                       "source": src, "box": (box.offsets, box.lengths), "target": dst, "dst": view,
                       "nbytes": view[dst].numel() * view.element_size()} for i, src, dst in parts]
    return reads


def load(path: str, model, optimizer=None, allow_cast: bool = False):
    """Load the checkpoint at `path` into `model` (and `optimizer`), whatever world size and layout saved it; returns
    this rank's `extra` (rank 0's on a rank the saving run did not have; None if none was saved). Every rank reads
    only what it holds; no communication. A tensor saved in another dtype is refused unless `allow_cast`."""
    where = resolve(os.path.normpath(path))  # once: a commit running meanwhile may move path to path.old
    before, meta = identity(where), read_metadata(where)
    wanted, installs = _wanted(meta, model, optimizer, allow_cast)
    groups = param_groups(where, optimizer)
    extras = [os.path.join(where, f"extra-{r:05d}.pt") for r in (_rank(), 0)]
    found = [f for f in extras if os.path.isfile(f)]
    extra = torch_load(found[0], what="extra file") if found else None  # read before anything is changed
    read_pieces(where, _reads(meta, wanted))
    with torch.no_grad():
        for e, state, master_saved in installs:
            if e.master is not None and not master_saved:
                e.master.copy_(e.from_model())  # the fp32 master from the (just loaded) model
            e.states.pop(e.key, None)
            if state:
                e.states[e.key] = state
    for g, s in zip(inner_param_groups(optimizer) if groups else [], groups or []):
        g.update(s)
    if identity(where) != before:
        raise RuntimeError(f"the checkpoint at {where} was replaced while it was being loaded (a save committed to "
                           f"{path} meanwhile): the state read may mix the two; load again")
    return extra
