"""The (dp, pp, cp, tp) mesh: group membership by hand-derived expectation, and on real ranks."""
import pytest
import torch.distributed as dist

from minidist import Mesh, launch
from minidist.mesh import coordinates, mesh_groups


def test_membership_2x2x2():
    g = mesh_groups(dp=2, pp=2, tp=2)
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["pp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_membership_3x1x2():
    g = mesh_groups(dp=3, pp=1, tp=2)
    assert g["tp"] == [[0, 1], [2, 3], [4, 5]]
    assert g["pp"] == [[0], [1], [2], [3], [4], [5]]
    assert g["dp"] == [[0, 2, 4], [1, 3, 5]]


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (4, 1, 1, 1), (1, 4, 1, 1), (1, 1, 1, 4), (2, 3, 1, 1),
                                   (3, 2, 1, 2), (2, 2, 1, 3), (2, 1, 2, 2), (1, 2, 3, 2)])
def test_every_axis_partitions_the_world(shape):
    world = shape[0] * shape[1] * shape[2] * shape[3]
    for axis, size in zip(("dp", "pp", "cp", "tp"), shape):
        rows = mesh_groups(*shape)[axis]
        assert sorted(r for row in rows for r in row) == list(range(world))
        assert all(len(row) == size for row in rows)
        for row in rows:  # a group's members differ only in that axis' coordinate, which runs 0..size-1
            coords = [coordinates(r, *shape) for r in row]
            assert [c[axis] for c in coords] == list(range(size))
            others = [{k: v for k, v in c.items() if k != axis} for c in coords]
            assert all(o == others[0] for o in others)


def test_the_data_parallel_group_holds_replicas_not_a_model_parallel_group():
    # The seed article grouped ranks that share a dp coordinate: that is a model-parallel group.
    g = mesh_groups(dp=2, pp=1, tp=2)
    assert [0, 2] in g["dp"]          # rank 0 and rank 2 hold the same shard in different replicas
    assert [0, 1] not in g["dp"]      # ranks 0 and 1 share dp coordinate 0: they are tensor-parallel peers
    assert [0, 1] in g["tp"]


@pytest.mark.parametrize("shape", [(0, 1, 1, 1), (1, -2, 1, 1), (1, 1, 1, 1.5), (1, 1, True, 1)])
def test_bad_sizes(shape):
    with pytest.raises(ValueError, match="must be a positive integer"):
        mesh_groups(*shape)


def test_named_axes_beyond_the_standard_four():
    g = mesh_groups(axes=[("dp", 2), ("ep", 2), ("tp", 2)])
    assert g["ep"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert coordinates(5, axes=[("dp", 2), ("ep", 2), ("tp", 2)]) == {"dp": 1, "ep": 0, "tp": 1}
    with pytest.raises(ValueError, match="must be distinct"):
        mesh_groups(axes=[("dp", 2), ("dp", 2)])


def build_and_report(dp, pp, tp):
    mesh = Mesh.build(dp=dp, pp=pp, tp=tp)
    out = {}
    for axis in ("dp", "pp", "tp"):
        group = mesh.group(axis)
        members = [None] * mesh.size(axis)
        dist.all_gather_object(members, dist.get_rank(), group=group)
        out[axis] = (members, mesh.local_rank(axis), dist.get_rank(group))
    return out


@pytest.mark.parametrize("shape", [(2, 1, 2), (1, 2, 2), (3, 1, 1), (1, 1, 3)])
def test_groups_on_real_ranks(shape):
    world = shape[0] * shape[1] * shape[2]
    per_rank = launch(build_and_report, world, *shape)
    expected = mesh_groups(dp=shape[0], pp=shape[1], tp=shape[2])
    for rank, report in enumerate(per_rank):
        for axis, (members, local, group_rank) in report.items():
            assert members in expected[axis] and rank in members
            assert local == group_rank == members.index(rank)


def cp_mesh_and_device_mesh():
    """A (dp, cp, tp) = (1, 2, 2) mesh: ledger records name their axis; DeviceMesh runs on the same groups."""
    import torch
    from minidist import comm
    mesh = Mesh.build(cp=2, tp=2)
    x = torch.ones(4)
    with comm.ByteLedger() as ledger:
        comm.all_reduce_sum(x, mesh.group("tp"))
        comm.all_reduce_sum(x, mesh.group("cp"))
        comm.all_reduce_sum(x)
    dm = mesh.device_mesh(axes=("cp", "tp"))
    t = torch.full((1,), float(dist.get_rank()))
    dist.all_reduce(t, group=dm.get_group("tp"))  # torch's mesh dimension "tp": the same ranks as minidist's
    return [r.axis for r in ledger.records], mesh.coords, dm.mesh.tolist(), t.item(), (mesh.cp, mesh.tp, mesh.dp)


def test_context_parallel_axis_named_records_and_device_mesh():
    for rank, (axes, coords, dm, tp_sum, sizes) in enumerate(launch(cp_mesh_and_device_mesh, 4)):
        assert axes == ["tp", "cp", "world"]
        assert coords == {"dp": 0, "pp": 0, "cp": rank // 2, "tp": rank % 2}
        assert dm == [[0, 1], [2, 3]]
        assert tp_sum == sum(range(rank - rank % 2, rank - rank % 2 + 2))
        assert sizes == (2, 2, 1)


def wrong_product():
    Mesh.build(dp=2, pp=2, tp=2)


def test_sizes_must_multiply_to_the_world():
    with pytest.raises(Exception, match=r"mesh dp=2 x pp=2 x tp=2 = 8 ranks, but the world has 4"):
        launch(wrong_product, 4)


def test_unknown_axis():
    mesh = Mesh({"dp": 1, "pp": 1, "tp": 1}, 0, {"dp": 0, "pp": 0, "tp": 0}, {}, {})
    with pytest.raises(ValueError, match="unknown mesh axis 'cp'"):
        mesh.size("cp")
