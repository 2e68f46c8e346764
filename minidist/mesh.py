"""The device mesh: the world's ranks laid out as a grid with named axes, and one process group per row of each axis.

    grid = torch.arange(world).view(dp, pp, cp, tp)    # tp varies fastest: tensor-parallel peers are neighbours
    tp groups: grid[d, p, c, :]    cp groups: grid[d, p, :, t]    pp groups: grid[d, :, c, t]    dp groups: grid[:, p, c, t]

Tensor parallelism talks the most (every layer), so its peers get consecutive ranks, which on a real cluster sit on
the same node; context parallelism next (every attention layer), then pipeline (activations at stage boundaries);
data parallelism talks the least (once a step), so its peers are the farthest apart.

A rank's data-parallel group holds the ranks that have the *same* coordinates on every other axis and a *different*
dp coordinate: replicas of the same model shard. (The seed article built it from ranks with the same dp coordinate,
which is the model-parallel group instead: those ranks hold different shards of one replica.)

`Mesh.build(dp=2, tp=2)` uses the standard axes; `Mesh.from_axes([("dp", 2), ("ep", 2), ("tp", 2)])` any names, slowest
first. `torch.distributed.new_group` must be called by every rank for every group, in the same order, even for groups
the rank is not in; both do that, which is why a mesh is built collectively and passed around, never global. Each
group is named after its axis in the byte ledger, and `mesh.device_mesh()` wraps the very same groups in a
`torch.distributed.DeviceMesh`, so PyTorch's references (FSDP2, DTensor tensor parallel) run on them.
"""
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .comm.ledger import name_group

AXES = ("dp", "pp", "cp", "tp")  # the standard axes, slowest-varying first


def _check_axes(axes: list[tuple[str, int]]) -> None:
    names = [name for name, _ in axes]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"mesh axis names must be distinct and at least one, got {names}")
    for name, size in axes:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"mesh size {name}={size!r} must be a positive integer")


def mesh_groups(dp: int = 1, pp: int = 1, cp: int = 1, tp: int = 1, *, axes=None) -> dict[str, list[list[int]]]:
    """The ranks of every group along each axis, without creating any process group (pure, testable anywhere).

    `axes` ([(name, size), ...], slowest first) replaces the standard (dp, pp, cp, tp) layout.
    """
    axes = list(axes) if axes is not None else list(zip(AXES, (dp, pp, cp, tp)))
    _check_axes(axes)
    sizes = [size for _, size in axes]
    grid = torch.arange(int(torch.tensor(sizes).prod())).view(*sizes)
    # Move the axis of interest last, flatten the others: each row is one group.
    return {name: grid.movedim(i, -1).reshape(-1, sizes[i]).tolist() for i, (name, _) in enumerate(axes)}


def coordinates(rank: int, dp: int = 1, pp: int = 1, cp: int = 1, tp: int = 1, *, axes=None) -> dict[str, int]:
    """Coordinates of `rank` in the grid, one per axis; a rank outside the grid is refused."""
    axes = list(axes) if axes is not None else list(zip(AXES, (dp, pp, cp, tp)))
    _check_axes(axes)
    world = int(torch.tensor([size for _, size in axes]).prod())
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank {rank!r} is not in a mesh of {world} ranks ({dict(axes)})")
    coords, rest = {}, rank
    for name, size in reversed(axes):  # the last axis varies fastest
        coords[name], rest = rest % size, rest // size
    return {name: coords[name] for name, _ in axes}


@dataclass(frozen=True)
class Mesh:
    """This rank's place in the grid and its process group along each axis."""

    shape: dict            # axis -> size, slowest first
    rank: int
    coords: dict = field(repr=False)
    groups: dict = field(repr=False)   # axis -> ProcessGroup this rank belongs to
    members: dict = field(repr=False)  # axis -> global ranks in that group, in group-rank order

    @classmethod
    def build(cls, dp: int = 1, pp: int = 1, cp: int = 1, tp: int = 1) -> "Mesh":
        """Create every group of the (dp, pp, cp, tp) grid (collective: all ranks call it with the same sizes)."""
        return cls.from_axes(list(zip(AXES, (dp, pp, cp, tp))))

    @classmethod
    def from_axes(cls, axes: list[tuple[str, int]]) -> "Mesh":
        """Create every group of a grid with any named axes, slowest first (collective)."""
        axes = list(axes)
        _check_axes(axes)
        world, total = dist.get_world_size(), int(torch.tensor([s for _, s in axes]).prod())
        if total != world:
            sizes = " x ".join(f"{n}={s}" for n, s in axes if s > 1 or len(axes) < len(AXES)) or "1"
            raise ValueError(f"mesh {sizes} = {total} ranks, but the world has {world}")
        rank = dist.get_rank()
        groups, members = {}, {}
        for axis, rows in mesh_groups(axes=axes).items():
            for ranks in rows:  # every rank creates every group, in the same order
                group = dist.new_group(ranks)
                if rank in ranks:
                    groups[axis], members[axis] = group, ranks
                    name_group(group, axis)
        return cls(dict(axes), rank, coordinates(rank, axes=axes), groups, members)

    def __getattr__(self, axis: str) -> int:  # mesh.dp, mesh.tp, ...: the size of that axis
        shape = self.__dict__.get("shape", {})
        if axis in shape:
            return shape[axis]
        if axis in AXES:  # a standard axis this mesh does not have has size 1
            return 1
        raise AttributeError(axis)

    def group(self, axis: str) -> dist.ProcessGroup:
        return self.groups[self._check(axis)]

    def size(self, axis: str) -> int:
        return self.shape[self._check(axis)]

    def local_rank(self, axis: str) -> int:
        """This rank's index within its group along `axis` (its coordinate on that axis)."""
        return self.coords[self._check(axis)]

    def device_mesh(self, device_type: str | None = None, axes: tuple[str, ...] | None = None):
        """A torch.distributed DeviceMesh over the same process groups (axes default: all, in mesh order)."""
        from torch.distributed.device_mesh import DeviceMesh
        from .launch import device
        axes = tuple(axes or self.shape)
        for a in axes:
            self._check(a)
        # The sub-grid this rank belongs to: fix every other axis at this rank's coordinate.
        grid = torch.arange(int(torch.tensor(list(self.shape.values())).prod()))
        grid = grid.view(*self.shape.values())
        index = tuple(slice(None) if a in axes else self.coords[a] for a in self.shape)
        sub = grid[index].permute(*[[a for a in self.shape if a in axes].index(a) for a in axes])
        return DeviceMesh.from_group([self.groups[a] for a in axes], device_type or device().type, mesh=sub,
                                     mesh_dim_names=axes)

    def _check(self, axis: str) -> str:
        if axis not in self.shape:
            raise ValueError(f"unknown mesh axis {axis!r}; the axes are {tuple(self.shape)}")
        return axis
