"""Offload: keep what training does not need right now off the accelerator, and bring it back when it does.

Two things are worth moving (ZeRO-Offload, Ren et al. 2021; ZeRO-Infinity, Rajbhandari et al. 2021):

  optimizer states   Mixed-precision Adam holds 16 bytes per parameter, 12 of them in fp32 (master weights and the
                     two moments) that only the optimizer step touches. ZeRO-Offload keeps the 16-bit weights and
                     gradients on the accelerator (2Ψ + 2Ψ bytes) and the 12Ψ, *and the update itself*, on the CPU:
                     each step the gradients go down (2Ψ bytes), the CPU runs Adam, the new weights come back (2Ψ).
                     Combined with ZeRO (chapter 05), each rank offloads only its 12Ψ/N.
  activations        A saved-tensor pack hook moves each tensor autograd saves for backward off the accelerator as
                     forward saves it; the unpack hook brings it back when backward needs it. The accelerator then
                     holds no activations between forward and backward, at the price of moving them twice.

Where they go is a storage *tier*:
  "cpu"   host memory (pinned when the data comes from an accelerator, so the copies can run at full speed). On a
          GPU this is the real thing; on a CPU-only machine host memory *is* the fast tier, and nothing is saved.
  "disk"  memory-mapped files (ZeRO-Infinity's NVMe tier): each offloaded storage is a file, and tensors computed on
          by the CPU (the optimizer's) are the mapping itself, so Adam updates the file. Real on any machine; what
          the CPU tests use, since the bytes then truly leave the process's memory (a file is deleted as soon as no
          tensor uses its storage).

Offloading changes where bytes live, never their values: training is bit-identical to training without it (the same
operations run on the same values; on a GPU the CPU's Adam may round differently from the GPU's kernels).
Bytes per tier are measured by walking the tensors and asking each storage where it lives (`bytes_by_location`):
a file-backed storage is on disk, a host storage is on "cpu", the rest on the fast device.
"""
import os
import tempfile
import weakref

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef

TIERS = ("cpu", "disk")


class HostTier:
    """Offloaded bytes in host memory."""

    name = "cpu"

    def allocate(self, nbytes: int, source: torch.device) -> torch.Tensor:
        """A uint8 CPU tensor of `nbytes`; pinned when the bytes come from an accelerator."""
        return torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=source.type != "cpu")


class DiskTier:
    """Offloaded bytes in memory-mapped files under `directory` (a fresh temporary directory by default).

    Each file gets a name no other tier or process can take (created exclusively, as tempfile.mkstemp does), so
    tiers sharing a directory never share a file; a tier lists, measures and deletes only its own files."""

    name = "disk"

    def __init__(self, directory: str | None = None):
        self.own = directory is None  # a temporary directory of our own: made when needed, gone with its last file
        self.directory, self.paths = directory, set()  # paths: this tier's live files

    def allocate(self, nbytes: int, source: torch.device) -> torch.Tensor:
        """A uint8 tensor of `nbytes` whose storage is a new file (removed when the storage is freed)."""
        if self.own and (self.directory is None or not os.path.isdir(self.directory)):
            self.directory = tempfile.mkdtemp(prefix="minidist-offload-")
        os.makedirs(self.directory, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f"{os.getpid()}-", suffix=".bin", dir=self.directory)  # O_EXCL: ours
        os.close(fd)
        t = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)  # the file grows to nbytes
        self.paths.add(path)
        weakref.finalize(t.untyped_storage(), _remove, path, self.own, self.paths)
        return t

    def files(self) -> list[str]:
        """This tier's files (a directory may be shared by tiers and ranks)."""
        return sorted(p for p in self.paths if os.path.exists(p))

    def bytes_on_disk(self) -> int:
        """Bytes in this tier's files: their sizes as the file system reports them (the bytes they hold, written or
        not; that what was offloaded is in them is checked by reading it back, not by this number)."""
        return sum(os.path.getsize(f) for f in self.files())

    def close(self) -> None:
        """Delete this tier's files now, even those still in use (their mappings stay valid until freed): for a
        process that ends with os._exit, which runs no finalizer."""
        for f in self.files():
            _remove(f, self.own, self.paths)


def _remove(path: str, own_directory: bool = False, paths: set | None = None) -> None:
    """Delete a tier file (forgetting it in `paths`), and its directory with its last file if the tier made it."""
    if paths is not None:
        paths.discard(path)
    try:
        os.remove(path)
        if own_directory:
            os.rmdir(os.path.dirname(path))
    except OSError:  # already gone, or other files remain
        pass


def make_tier(name: str, directory: str | None = None):
    """The tier called `name` ("cpu" or "disk")."""
    if name not in TIERS:
        raise ValueError(f"offload tier must be one of {TIERS}, got {name!r}")
    return HostTier() if name == "cpu" else DiskTier(directory)


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """Every byte of t's storage as a 1-D uint8 tensor (a view: no copy)."""
    with torch.no_grad():
        return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


# Activations.

def pack_saved(t: torch.Tensor, tier) -> tuple:
    """The body of the pack hook: copy t's whole storage onto `tier` and return what unpack_saved needs to rebuild t.

    Returns (stored, dtype, size, stride, storage_offset): `stored` is tier.allocate(nbytes, t.device) holding a copy
    of every byte of t's storage (storage_bytes(t)); the rest describes t as a view of that storage. Copying the
    whole storage (not just t's elements) lets views of one storage (q, k, v of one projection) share one copy.
    Graded, on a disk tier: for a contiguous fp32 tensor, a transposed view, a view with an offset, an empty tensor
    and an int64 tensor, the stored bytes equal the storage's and live in one of the tier's files, the other four
    values describe t exactly; and afterwards the tier's bytes_on_disk() is above 0.
    """
    # <exercise pack_saved points=2>
    # hint: storage_bytes(t) (from minidist.memory.offload import storage_bytes) gives the bytes to copy, as a view; the
    #       view's geometry comes from t itself.
    data = storage_bytes(t)
    stored = tier.allocate(data.numel(), t.device)
    stored.copy_(data)
    return stored, t.dtype, t.shape, t.stride(), t.storage_offset()
    # </exercise>


def unpack_saved(packed: tuple, device: torch.device) -> torch.Tensor:
    """The body of the unpack hook: the tensor pack_saved stored, rebuilt on `device` (a copy, in fast memory).

    Graded: after a round trip through pack_saved on a disk tier, for the tensors pack_saved is graded on, the same
    values (bit for bit), stride and dtype; the result in ordinary memory, not the tier's file, and (when it has
    elements) not sharing memory with the stored bytes.
    """
    # <exercise unpack_saved points=2>
    # hint: bring the bytes to the device first, then reinterpret them as the dtype and rebuild the view.
    # hint: .to(device) returns the very same tensor when it is already there (on a CPU): you need a copy.
    stored, dtype, size, stride, offset = packed
    return stored.to(device, copy=True).view(dtype).as_strided(size, stride, offset)
    # </exercise>


def _geometry(t: torch.Tensor) -> tuple:
    return t.dtype, t.shape, t.stride(), t.storage_offset()  # what rebuilds t from its storage's bytes


def _view_of(stored: torch.Tensor, dtype, size, stride, offset) -> torch.Tensor:
    return stored.view(dtype).as_strided(size, stride, offset)  # that tensor over the bytes `stored` (no copy)


class _Handle:
    """What autograd holds for one offloaded saved tensor."""

    __slots__ = ("packed", "device", "__weakref__")

    def __init__(self, packed, device):
        self.packed, self.device = packed, device


class offload_activations(torch.autograd.graph.saved_tensors_hooks):
    """`with offload_activations(tier, keep=model):` every tensor autograd saves for backward inside goes to `tier`
    and comes back in backward. Parameters and buffers of `keep` stay where they are (they live there anyway).

    Views of one storage saved at one version are stored once. A copy is taken when the tensor is saved, so an
    in-place write after that (h[t] = f(h[t - 1]) into one buffer) cannot reach what backward gets: it gets the
    values forward used, the right gradient, where plain autograd would refuse the program (its version check
    does not run on tensors that saved-tensor hooks hold). `held()` lists what autograd now holds for backward (the
    stored copies, and any tensor kept as it was), for bytes_by_location.
    """

    def __init__(self, tier, keep: nn.Module | None = None):
        self.tier = make_tier(tier) if isinstance(tier, str) else tier
        tensors = [] if keep is None else [*keep.parameters(), *keep.buffers()]
        self.keep = {t.untyped_storage().data_ptr() for t in tensors}
        self.seen: dict[tuple, tuple] = {}  # (storage pointer, version) -> weak refs to (that storage, its copy)
        self.handles = weakref.WeakSet()
        super().__init__(self._pack, self._unpack)

    def __enter__(self):
        super().__enter__()
        return self

    def _pack(self, t):
        key = (t.untyped_storage().data_ptr(), t._version)  # the version changes with every in-place write
        if key[0] in self.keep:
            return t
        original, stored = self.seen.get(key, (None, lambda: None))
        if original is not None and not original.expired() and stored() is not None:  # a view of a stored storage
            packed = (stored(), *_geometry(t))
        else:
            packed = pack_saved(t, self.tier)
            self.seen[key] = (StorageWeakRef(t.untyped_storage()), weakref.ref(packed[0]))
        handle = _Handle(packed, t.device)
        self.handles.add(handle)
        return handle

    @staticmethod
    def _unpack(handle):
        return handle if torch.is_tensor(handle) else unpack_saved(handle.packed, handle.device)

    def held(self) -> list[torch.Tensor]:
        return [h.packed[0] for h in self.handles]


# Optimizer states.

class OptimizerOffload:
    """ZeRO-Offload for an optimizer wrapper: its fp32 master weights and its optimizer's states live on `tier`, and
    the update runs there.

    The seam: `opt.optimizer` is the torch optimizer that steps fp32 tensors (MixedPrecisionOptimizer's masters,
    ZeroOptimizer's shard pieces), `opt.master` (a tensor or a list) what else holds them. The wrapper moves each
    gradient to its master's device before the step and copies the updated masters back into the 16-bit model,
    as both do. Every storage behind those tensors is moved once (views stay views: ZeroOptimizer's pieces share
    its master buffer), by re-pointing the tensors themselves (`t.data = ...`), so the optimizer and its wrapper keep
    their references. States created by a step (Adam's moments, on its first step, next to the masters) move right
    after it. ZeroOptimizer moves its gradient shards to the masters' device before the update and the updated shards
    back to the model's device (its comm_device) before its all-gather: on a GPU, NCCL takes no host tensors.
    """

    def __init__(self, opt, tier):
        self.tier = make_tier(tier) if isinstance(tier, str) else tier
        self.stored: dict[int, StorageWeakRef] = {}  # storage pointer -> that storage on the tier (weakly: a state
        master, inner = getattr(opt, "master", []), opt.optimizer  # replaced, its file goes with its last tensor)
        masters = [p for g in inner.param_groups for p in g["params"]]
        self.relocate(masters + ([master] if torch.is_tensor(master) else list(master)))
        self.relocate(states(inner))
        # States a step creates, and those load_state_dict puts in place of ours, move as soon as they exist. The
        # optimizer holds this (through its hooks), the tensors hold their bytes: a file lives as long as its tensors.
        self._hooks = [inner.register_step_post_hook(lambda optimizer, *_: self.relocate(states(optimizer))),
                       inner.register_load_state_dict_post_hook(lambda optimizer: self.relocate(states(optimizer)))]

    def relocate(self, tensors: list[torch.Tensor]) -> None:
        """Move the storages behind `tensors` onto the tier (those not there yet), re-pointing every tensor."""
        self.stored = {ptr: ref for ptr, ref in self.stored.items() if not ref.expired()}
        by_storage: dict[int, list[torch.Tensor]] = {}
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.stored:
                by_storage.setdefault(ptr, []).append(t)
        for members in by_storage.values():
            stored = pack_saved(members[0], self.tier)[0]  # the storage's bytes, copied onto the tier
            self.stored[stored.untyped_storage().data_ptr()] = StorageWeakRef(stored.untyped_storage())
            for t in members:
                t.data = _view_of(stored, *_geometry(t))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def states(optimizer) -> list[torch.Tensor]:
    """The per-element states of a torch optimizer (0-dim step counters left out)."""
    return [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]


def offload_optimizer(opt, tier) -> OptimizerOffload:
    """Put `opt`'s fp32 master weights and optimizer states on `tier` ("cpu", "disk", or a tier object)."""
    return OptimizerOffload(opt, tier)


def optimizer_tensors(model: nn.Module, opt=None) -> list[torch.Tensor]:
    """Every tensor of the model states: parameters, gradients, and what the optimizer holds beyond them (its
    `held_tensors()`: ZeroOptimizer's gradient shards, master buffer and states; MixedPrecisionOptimizer's masters
    and states), else its per-element states (0-dim step counters left out, as the formulas leave them out)."""
    params = list(model.parameters())
    out = params + [p.grad for p in params if p.grad is not None]
    if hasattr(opt, "held_tensors"):
        held = opt.held_tensors()
        return out + held["grads"] + held["optimizer"]
    if opt is not None:
        out += [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
    return out


def location(t: torch.Tensor, fast: torch.device) -> str:
    """Where t's bytes are: "disk" (a memory-mapped file), "fast" (the compute device), or "cpu" (host memory)."""
    if t.untyped_storage().filename is not None:
        return "disk"
    return "fast" if t.device == torch.device(fast) else "cpu"


def bytes_by_location(tensors, fast: torch.device) -> dict[str, int]:
    """Bytes of the distinct storages behind `tensors`, by location (views and shared storages counted once)."""
    seen, out = set(), {"fast": 0, "cpu": 0, "disk": 0}
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            out[location(t, fast)] += s.nbytes()
    return out
