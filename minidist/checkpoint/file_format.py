"""A sharded checkpoint on disk: the metadata, the files, the atomic commit, and DCP's own format.

    path/metadata.json          {"format": "minidist", "version": 2, "world_size": N, "tensors": {key: {"shape",
                                "dtype", "chunks": [{"offsets", "lengths", "rank", "file"}]}}, "extra": [files],
                                "tied": [[the names of one tied tensor], ...], "optimized": [parameter names]}
    path/rankRRRRR.safetensors  the chunks rank R wrote, each under its tensor's name; a second box of the same tensor
                                goes to rankRRRRR-1.safetensors. Every header also records the boxes' offsets under
                                "DCP_SHARDING_INFO", the convention of DCP's HuggingFaceStorageReader: DCP reads these
                                files as they are. (safetensors: a JSON header, then the raw bytes; no pickle, and a
                                reader can memory-map it and take a slice of one tensor without reading the rest)
    path/optimizer.pt           the optimizer's class and hyperparameters (param_groups without parameters), rank 0's
    path/extra-RRRRR.pt         rank R's `extra`

Durability and atomicity: every file is fsynced by its writer, the metadata is written last, the directory's entries
are fsynced, and the directory is renamed into place last of all (commit), then the rename fsynced: a checkpoint is
either whole where resolve() looks or not there, for readers that go through resolve() (between commit's two renames
`path` itself does not exist). A directory written by DCP's dcp.save (its FileSystemWriter: `.metadata` and `.distcp`
files, each chunk pickled by torch.save) is read through the same plan, one whole chunk at a time; its pickled
`.metadata` through an unpickler that builds DCP's metadata classes only.
"""
import io
import json
import math
import os
import pickle
import shutil
from collections import defaultdict

import torch
from safetensors.torch import save_file

from .files import (CorruptCheckpoint, CorruptPickle, check_files, get_slice, member, open_safetensors, read_json,
                    torch_load)
from .layout import inner_param_groups

METADATA = "metadata.json"


def commit(staged: str, path: str) -> None:
    """Make the complete checkpoint directory `staged` the checkpoint at `path`, replacing the one there, if any.

    The invariant: at every moment a whole checkpoint (the old or the new one) is where `resolve(path)` looks,
    which is `path`, or `path + ".old"` when `path` does not exist. A `path.old` may be left over from a commit that
    crashed earlier, and may then be the only whole checkpoint there is. Move directories with os.replace, delete
    them with shutil.rmtree. Graded: afterwards, path holds the new checkpoint and neither staged nor path.old exists
    (with no previous checkpoint, with one, with one and a stale path.old besides, and with only a path.old, as an
    interrupted commit leaves it); starting from a previous checkpoint, and from only a path.old, a crash injected
    at each of its os.replace / os.rename / shutil.rmtree calls in turn leaves a whole checkpoint (old or new) where
    resolve finds it.
    """
    # <exercise atomic_commit points=2>
    # hint: a rename is atomic within one filesystem: a directory is at its old name or at its new one, never between.
    # hint: you cannot rename staged onto an existing directory: the old one must go aside first. Where can it go
    #       that resolve still finds it?
    old = path + ".old"
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(staged, path)
    shutil.rmtree(old, ignore_errors=True)
    # </exercise>


def resolve(path: str) -> str:
    """The directory holding the checkpoint saved at `path`: path itself, or path.old if a commit was interrupted."""
    for where in (path, path + ".old"):
        if os.path.isfile(os.path.join(where, METADATA)) or os.path.isfile(os.path.join(where, ".metadata")):
            return where
    raise FileNotFoundError(f"no checkpoint at {path}: no {METADATA} (nor DCP's .metadata) there or in {path}.old")


def read_metadata(path: str) -> dict:
    """The checkpoint's metadata: {"tensors": {key: {"shape", "dtype", "chunks": [{"offsets", "lengths", "file"}]}},
    "tied": [[names of one tensor], ...], "optimized": [parameters the optimizer held]} (path: as saved or resolved)."""
    where = resolve(path)
    listed_in = os.path.join(where, METADATA if os.path.isfile(os.path.join(where, METADATA)) else ".metadata")
    meta = read_json(listed_in) if listed_in.endswith(METADATA) else _dcp_metadata(where)
    check_files(meta, where, listed_in)  # chunk files: plain names inside `where`, refused before anything is read
    return meta


class _DcpMetadataUnpickler(pickle.Unpickler):
    """DCP pickles its .metadata; plain pickle.load (DCP's FileSystemReader) runs whatever a crafted file names.
    This one builds only DCP's metadata classes, torch's sizes, dtypes and layouts, and paths."""
    ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
               ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")} | {
        ("torch.distributed.checkpoint.metadata", n) for n in ("Metadata", "MetadataIndex", "StorageMeta",
                                                                "TensorStorageMetadata", "BytesStorageMetadata",
                                                                "ChunkStorageMetadata", "TensorProperties",
                                                                "_MEM_FORMAT_ENCODING")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED or module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"DCP metadata may not refer to {module}.{name}: refused (not a checkpoint's)")


def _dcp_metadata(path: str) -> dict:
    """DCP's own metadata (dcp.save with its default FileSystemWriter) in minidist's form: chunks are byte ranges."""
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
    with open(os.path.join(path, ".metadata"), "rb") as f:
        try:
            md, tensors = _DcpMetadataUnpickler(f).load(), {}
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise CorruptPickle(f"{path}/.metadata: cannot read DCP's metadata ({type(e).__name__}: {e}): "
                                f"truncated, damaged or refused") from None
    if not isinstance(md, Metadata):
        raise CorruptCheckpoint(f"{path}/.metadata holds a {type(md).__name__}, not DCP's Metadata")
    for key, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            infos = [md.storage_data[MetadataIndex(key, c.offsets)] for c in m.chunks]
            if any(getattr(info, "transform_descriptors", None) for info in infos):
                raise ValueError(f"{path}: {key} was written with DCP storage transforms (compression): unsupported")
            tensors[key] = {"shape": list(m.size), "dtype": str(m.properties.dtype).removeprefix("torch."),
                            "chunks": [{"offsets": list(c.offsets), "lengths": list(c.sizes), "file": i.relative_path,
                                        "byte_range": [i.offset, i.length]} for c, i in zip(m.chunks, infos)]}
    return {"format": "torch.distributed.checkpoint", "world_size": None, "tensors": tensors}


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def global_plan(described: list[list[dict]]) -> dict[str, dict]:
    """The metadata's tensors from every rank's boxes: one writer per distinct box (largest boxes first, each to the
    least loaded of its holders), its file, and checks that every tensor is covered exactly once."""
    holders, info = defaultdict(list), {}
    for rank, items in enumerate(described):
        for it in items:
            ident = (it["key"], tuple(it["offsets"]), tuple(it["lengths"]))
            holders[ident].append(rank)
            seen = info.setdefault(it["key"], (it["shape"], it["dtype"]))
            if seen != (it["shape"], it["dtype"]):
                raise ValueError(f"ranks disagree on {it['key']}: shape, dtype {seen} against "
                                 f"{(it['shape'], it['dtype'])}")
    size = {i: math.prod(i[2]) * torch.empty(0, dtype=getattr(torch, info[i[0]][1])).element_size() for i in holders}
    load, files, tensors = [0] * len(described), defaultdict(int), {}
    for ident in sorted(holders, key=lambda i: (-size[i], i)):
        rank = min(holders[ident], key=lambda r: (load[r], r))
        load[rank] += size[ident]
        k, files[(rank, ident[0])] = files[(rank, ident[0])], files[(rank, ident[0])] + 1
        entry = tensors.setdefault(ident[0], {"shape": info[ident[0]][0], "dtype": info[ident[0]][1], "chunks": []})
        entry["chunks"].append({"offsets": list(ident[1]), "lengths": list(ident[2]), "rank": rank,
                                "file": f"rank{rank:05d}{f'-{k}' if k else ''}.safetensors"})
    for key, entry in tensors.items():
        if problem := cover_problem([(c["offsets"], c["lengths"]) for c in entry["chunks"]], entry["shape"]):
            raise ValueError(f"the ranks' pieces of {key} {tuple(entry['shape'])} do not cover it exactly once: "
                             f"{problem} (a layout bug)")
    return dict(sorted(tensors.items()))


def cover_problem(boxes, shape) -> str | None:
    """Why `boxes` [(offsets, lengths)] do not cover a tensor of `shape` exactly once (None: they do): every box
    inside it, no two sharing an element, their sizes adding up to its size. Counting elements alone would pass an
    overlap and a gap of the same size. Overlaps are looked for among boxes whose first-dimension ranges meet."""
    shape = tuple(shape)
    for off, ln in boxes:
        if len(off) != len(shape) or any(o < 0 or n < 0 or o + n > s for o, n, s in zip(off, ln, shape)):
            return f"box {tuple(off)} + {tuple(ln)} does not lie inside {shape}"
    live = [b for b in boxes if all(n > 0 for n in b[1])]
    active = []  # boxes whose rows reach past the start of the current one
    for off, ln in sorted(live, key=lambda b: tuple(b[0])):
        active = [(o, n) for o, n in active if not shape or o[0] + n[0] > off[0]]
        for o, n in active:
            if all(max(a, b) < min(a + m, b + k) for a, m, b, k in zip(o, n, off, ln)):
                return f"boxes {tuple(o)} + {tuple(n)} and {tuple(off)} + {tuple(ln)} overlap"
        active.append((off, ln))
    covered = sum(math.prod(ln) for _, ln in boxes)
    return None if covered == math.prod(shape) else f"the boxes hold {covered} of its {math.prod(shape)} elements"


def finish(staged: str, path: str, tensors: dict, world_size: int, **more) -> None:
    """Rank 0, once every rank's files are in `staged` (each fsynced by its writer): write the metadata, make the
    directory's entries durable, then commit it to `path` and make the rename durable."""
    meta = {"format": "minidist", "version": 2, "world_size": world_size, "tensors": tensors,
            "extra": sorted(f for f in os.listdir(staged) if f.startswith("extra-")), **more}
    with open(os.path.join(staged, METADATA), "w") as f:
        json.dump(meta, f, indent=1)
    fsync(os.path.join(staged, METADATA))
    fsync(staged)  # the files' names in the directory, before the rename can make them a checkpoint
    commit(staged, path)
    fsync(os.path.dirname(os.path.abspath(path)))


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_files(staged: str, tensors: dict, items: dict, rank: int, optimizer, extra: bytes | None) -> None:
    """This rank's files: its chunks (one safetensors file per file name), its extra (as extra_bytes gave it), rank 0
    the optimizer's class and hyperparameters. Each file is fsynced."""
    files = defaultdict(dict)
    for key, entry in tensors.items():
        for c in entry["chunks"]:
            if c["rank"] == rank:
                files[c["file"]][key] = (items[(key, tuple(c["offsets"]), tuple(c["lengths"]))][1], c["offsets"])
    for name, chunks in sorted(files.items()):
        _write_file(os.path.join(staged, name), chunks)
    if extra is not None:
        with open(os.path.join(staged, f"extra-{rank:05d}.pt"), "wb") as f:
            f.write(extra)
        fsync(os.path.join(staged, f"extra-{rank:05d}.pt"))
    if rank == 0 and optimizer is not None:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in inner_param_groups(optimizer)]
        torch.save({"class": optimizer_class(optimizer), "param_groups": groups}, os.path.join(staged, "optimizer.pt"))
        fsync(os.path.join(staged, "optimizer.pt"))


def _write_file(filename: str, chunks: dict) -> None:
    """One safetensors file (copies: safetensors refuses views sharing a buffer), DCP's offsets in its header."""
    offsets = {key: {"saved_offsets": off} for key, (_, off) in chunks.items()}
    save_file({key: t.to("cpu", copy=True).contiguous() for key, (t, _) in chunks.items()}, filename,
              metadata={"DCP_SHARDING_INFO": json.dumps(offsets)})
    fsync(filename)


def read_pieces(where: str, reads: list[dict]) -> None:
    """Read every planned slice: safetensors through its memory map; a DCP chunk whole (it is pickled), once. Each
    stored chunk must have the shape and dtype the metadata gives it (copy_ would broadcast and cast)."""
    by_file = defaultdict(list)
    for r in reads:
        by_file[r["file"]].append(r)
    listed_in = os.path.join(where, METADATA if os.path.isfile(os.path.join(where, METADATA)) else ".metadata")
    with torch.no_grad():
        for name, group in by_file.items():
            path = member(where, name, listed_in)  # also checked by read_metadata: here, whatever built the plan
            if name.endswith(".safetensors"):
                with open_safetensors(path, listed_in) as f:
                    for r in group:
                        piece = get_slice(f, path, r["key"])
                        _copy(r, piece.get_shape(), piece[r["source"]], name)
                continue
            cache = {}
            with open(path, "rb") as f:
                for r in group:
                    offset, length = r["byte_range"]
                    if offset not in cache:
                        f.seek(offset)
                        cache[offset] = torch_load(path, f.read(length), f"DCP chunk of {r['key']}")
                    _copy(r, list(cache[offset].shape), cache[offset][r["source"]], name)


def _copy(r: dict, stored_shape, part: torch.Tensor, name: str) -> None:
    if list(stored_shape) != list(r["chunk"][1]) or dtype_name(part) != r["dtype"]:
        raise ValueError(f"{name}: {r['key']} is stored as {dtype_name(part)} {tuple(stored_shape)}, the metadata "
                         f"says {r['dtype']} {tuple(r['chunk'][1])}: a damaged or mismatched checkpoint")
    r["dst"][r["target"]].copy_(part)


def extra_bytes(extra) -> bytes | None:
    """`extra` as torch.save writes it, once checked that torch.load(weights_only=True) reads it back (else load,
    not save, would fail: a committed checkpoint no one can resume from)."""
    if extra is None:
        return None
    buffer = io.BytesIO()
    torch.save(extra, buffer)
    try:
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle.UnpicklingError and friends)
        why = next((ln.split(":", 1)[1].strip()[:100] for ln in str(e).splitlines() if "Unpickler error" in ln),
                   str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise ValueError(f"extra cannot be read back with torch.load(weights_only=True) ({why}): keep it to "
                         f"tensors, numbers, strings, lists, tuples and dicts") from e
    return buffer.getvalue()


def param_groups(where: str, optimizer) -> list[dict] | None:
    """The saved hyperparameters, once checked they fit `optimizer` (its class, its number of groups)."""
    if optimizer is None or not os.path.isfile(os.path.join(where, "optimizer.pt")):
        return None
    saved, mine = torch_load(os.path.join(where, "optimizer.pt"), what="optimizer file"), inner_param_groups(optimizer)
    name = optimizer_class(optimizer)
    if saved.get("class", name) != name:
        raise ValueError(f"the checkpoint's optimizer is {saved['class']}, this one {name}: its states and "
                         f"hyperparameters would not fit")
    if len(saved["param_groups"]) != len(mine):
        raise ValueError(f"the checkpoint's optimizer has {len(saved['param_groups'])} parameter groups, this one "
                         f"{len(mine)}")
    return saved["param_groups"]


def optimizer_class(optimizer) -> str:
    """The class of the torch optimizer doing the update (a ZeroOptimizer's or MixedPrecisionOptimizer's inner one)."""
    inner = getattr(optimizer, "optimizer", None)
    return type(inner if isinstance(inner, torch.optim.Optimizer) else optimizer).__name__


def identity(where: str) -> tuple:
    """(device, inode) of the directory `where` (() if gone): the same at start and end, a load read one checkpoint."""
    try:
        st = os.stat(where)
    except FileNotFoundError:
        return ()
    return st.st_dev, st.st_ino
