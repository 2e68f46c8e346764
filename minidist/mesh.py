"""The device mesh: the world's ranks laid out as a (dp, pp, tp) grid, and one process group per row of each axis.

    grid = torch.arange(world).view(dp, pp, tp)      # tp varies fastest: tensor-parallel peers are neighbours
    tp groups: grid[d, p, :]    pp groups: grid[d, :, t]    dp groups: grid[:, p, t]

Tensor parallelism talks the most (every layer), so its peers get consecutive ranks, which on a real cluster sit on
the same node; data parallelism talks the least (once a step), so its peers are the farthest apart.

A rank's data-parallel group holds the ranks that have the *same* pipeline and tensor coordinates and a *different*
dp coordinate: replicas of the same model shard. (The seed article built it from ranks with the same dp coordinate,
which is the model-parallel group instead: those ranks hold different shards of one replica.)

`torch.distributed.new_group` must be called by every rank for every group, in the same order, even for groups the
rank is not in; `Mesh.build` does that, which is why a mesh is built collectively and passed around, never global.
"""
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

AXES = ("dp", "pp", "tp")


def mesh_groups(dp: int, pp: int, tp: int) -> dict[str, list[list[int]]]:
    """The ranks of every group along each axis, without creating any process group (pure, testable anywhere)."""
    for name, size in zip(AXES, (dp, pp, tp)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh size {name}={size!r} must be a positive integer")
    grid = torch.arange(dp * pp * tp).view(dp, pp, tp)
    # Move the axis of interest last, flatten the others: each row is one group.
    return {axis: grid.movedim(i, -1).reshape(-1, grid.shape[i]).tolist() for i, axis in enumerate(AXES)}


def coordinates(rank: int, dp: int, pp: int, tp: int) -> dict[str, int]:
    """(dp, pp, tp) coordinates of `rank` in the grid."""
    return {"dp": rank // (pp * tp), "pp": (rank // tp) % pp, "tp": rank % tp}


@dataclass(frozen=True)
class Mesh:
    """This rank's place in the (dp, pp, tp) grid and its process group along each axis."""

    dp: int
    pp: int
    tp: int
    rank: int
    coords: dict = field(repr=False)
    groups: dict = field(repr=False)   # axis -> ProcessGroup this rank belongs to
    members: dict = field(repr=False)  # axis -> global ranks in that group, in group-rank order

    @classmethod
    def build(cls, dp: int = 1, pp: int = 1, tp: int = 1) -> "Mesh":
        """Create every group of the grid (collective: all ranks must call it with the same sizes)."""
        world = dist.get_world_size()
        if dp * pp * tp != world:
            raise ValueError(f"mesh dp={dp} x pp={pp} x tp={tp} = {dp * pp * tp} ranks, "
                             f"but the world has {world}")
        rank = dist.get_rank()
        groups, members = {}, {}
        for axis, rows in mesh_groups(dp, pp, tp).items():
            for ranks in rows:  # every rank creates every group, in the same order
                group = dist.new_group(ranks)
                if rank in ranks:
                    groups[axis], members[axis] = group, ranks
        return cls(dp, pp, tp, rank, coordinates(rank, dp, pp, tp), groups, members)

    def group(self, axis: str) -> dist.ProcessGroup:
        return self.groups[self._check(axis)]

    def size(self, axis: str) -> int:
        return getattr(self, self._check(axis))

    def local_rank(self, axis: str) -> int:
        """This rank's index within its group along `axis` (its coordinate on that axis)."""
        return self.coords[self._check(axis)]

    def _check(self, axis: str) -> str:
        if axis not in AXES:
            raise ValueError(f"unknown mesh axis {axis!r}; the axes are {AXES}")
        return axis
