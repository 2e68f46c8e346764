"""Reading a checkpoint someone else wrote: every file it names stays inside its directory, and every file that cannot
be read says which file it is and what is wrong with it.

A checkpoint is data from a stranger as soon as it was downloaded, copied or written by another program. Two kinds
of trouble, both refused before anything is loaded into a model:

    path traversal   metadata.json (and DCP's pickled .metadata, its `relative_path`) name the files that hold the
                     chunks; those names are joined to the checkpoint's directory. "../elsewhere/x.safetensors", an
                     absolute path or a symbolic link out of the directory would read any file the user can read.
                     A chunk file must be a plain file name (no directory part) that resolves inside the directory.
    damage           a file cut short by a full disk or an interrupted copy, or a foreign file under the expected
                     name: safetensors says "invalid header length", json a line and a column, pickle "ran out of
                     input", none of them the file's name. CorruptCheckpoint names the file and the problem.
"""
import io
import json
import os
import pickle
from contextlib import contextmanager

import torch


class CorruptCheckpoint(ValueError):
    """A checkpoint file is unreadable, damaged or not what its name says; the message names the file."""


class CorruptPickle(CorruptCheckpoint, pickle.UnpicklingError):
    """A pickled checkpoint file (DCP's .metadata) that cannot be unpickled, or names a class that is refused."""


def member(where: str, name, listed_in: str) -> str:
    """The path of chunk file `name` of the checkpoint in directory `where`, once checked that `name` (as the file
    `listed_in` gives it) is a plain file name that stays inside `where`; CorruptCheckpoint otherwise."""
    plain = isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
    if not plain:
        raise CorruptCheckpoint(f"{listed_in} names the chunk file {name!r}: refused, a chunk file must be a plain "
                                f"file name inside the checkpoint directory {where} (no directory part, no '..')")
    path = os.path.join(where, name)
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(where):
        raise CorruptCheckpoint(f"{listed_in} names the chunk file {name!r}, a link to {os.path.realpath(path)}: "
                                f"refused, outside the checkpoint directory {where}")
    return path


def check_files(meta: dict, where: str, listed_in: str) -> None:
    """Every chunk file the metadata names is a plain name inside `where` (member), before anything is read."""
    for key, entry in meta["tensors"].items():
        for chunk in entry["chunks"]:
            member(where, chunk["file"], listed_in)
            if chunk.get("byte_range") is None and not chunk["file"].endswith(".safetensors"):  # minidist's format
                raise CorruptCheckpoint(f"{listed_in}: the chunk file {chunk['file']!r} of {key} is not a "
                                        f".safetensors file")


def read_json(path: str) -> dict:
    """metadata.json, checked to have the fields load reads: CorruptCheckpoint naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CorruptCheckpoint(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}): not a minidist "
                                f"checkpoint's metadata") from None
    except json.JSONDecodeError as e:
        cut = " (the file ends there: truncated?)" if e.pos >= len(e.doc.rstrip()) else ""
        raise CorruptCheckpoint(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}{cut}") from None
    if problem := _metadata_problem(meta):
        raise CorruptCheckpoint(f"{path}: {problem}: not a minidist checkpoint's metadata, or a damaged one")
    return meta


def _metadata_problem(meta) -> str | None:
    if not isinstance(meta, dict) or not isinstance(meta.get("tensors"), dict):
        return "no 'tensors' object at the top level"
    for key, entry in meta["tensors"].items():
        if not isinstance(entry, dict) or not {"shape", "dtype", "chunks"} <= entry.keys():
            return f"tensor {key!r} lacks its shape, dtype or chunks"
        if not isinstance(entry["chunks"], list) or not all(
                isinstance(c, dict) and {"offsets", "lengths", "file"} <= c.keys() for c in entry["chunks"]):
            return f"a chunk of tensor {key!r} lacks its offsets, lengths or file"
    return None


@contextmanager
def open_safetensors(path: str, listed_in: str):
    """safetensors' safe_open on `path`, its errors naming the file (a truncated file: 'incomplete metadata')."""
    from safetensors import SafetensorError, safe_open
    try:
        handle = safe_open(path, framework="pt")
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{path}: missing (listed in {listed_in})") from None
    except SafetensorError as e:
        raise CorruptCheckpoint(f"{path}: not a readable safetensors file ({e}): truncated or damaged") from None
    with handle as f:
        yield f


def get_slice(f, path: str, key: str):
    """Tensor `key` of the open safetensors file `f` (at `path`), as a lazy slice; CorruptCheckpoint if absent."""
    from safetensors import SafetensorError
    try:
        return f.get_slice(key)
    except SafetensorError as e:
        raise CorruptCheckpoint(f"{path}: {e} (the metadata says it holds a chunk of {key})") from None


def torch_load(path: str, data: bytes | None = None, what: str = "file"):
    """torch.load(weights_only=True) of `path` (or of `data`, bytes read from it), its errors naming the file."""
    try:
        return torch.load(io.BytesIO(data) if data is not None else path, weights_only=True)
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{path}: missing") from None
    except Exception as e:  # noqa: BLE001  (pickle, zip and unpickler errors: each its own class)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptCheckpoint(f"{path}: cannot read this {what} ({type(e).__name__}: {first[:200]}): truncated, "
                                f"damaged or not written by torch.save") from None
