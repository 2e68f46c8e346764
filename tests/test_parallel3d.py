"""3D parallelism on a device mesh: group ranks by strides (exercise group_ranks), the tiny GPT on dp x pp x tp and
dp x cp x tp = 2 x 2 x 2 (8 ranks) and pp x cp = 2 x 2 (4 ranks), 5 AdamW steps against one process with every
axis's bytes counted against the formula, pp x cp's gradients after one step, and the example script's --strategy 3d.

8 ranks on 2 cores: the compositions run once each (about 1.5 s apiece); the per-axis behaviour is checked at
smaller sizes in the chapter's other tests (context parallelism at cp = 2, 3, 4; tensor and pipeline parallelism in
chapters 04 and 07)."""
import itertools
import math
import os
from fractions import Fraction
import subprocess
import sys

import pytest

from minidist import launch
from minidist.grading import implementation
from minidist.mesh import mesh_groups
from minidist.parallel3d import group_ranks
from minidist.tour.parallel3d import (ADAM_TOL, GRAD_TOL, SHAPES, bytes_by_axis, gradients_vs_one_process,
                                      mesh_vs_one_process, states_formula)

MESHES = [dict(dp=2, pp=2, cp=1, tp=2), dict(dp=3, pp=1, cp=2, tp=2), dict(dp=1, pp=2, cp=3, tp=1),
          dict(dp=2, pp=3, cp=2, tp=2), dict(dp=1, pp=1, cp=1, tp=1)]


@pytest.mark.exercise("group_ranks")
@pytest.mark.parametrize("shape", MESHES, ids=str)
def test_group_ranks_are_the_mesh_groups(shape):
    world, groups = 1, mesh_groups(**shape)
    for size in shape.values():
        world *= size
    for axis, rows in groups.items():
        for rank in range(world):
            expected = next(row for row in rows if rank in row)
            assert implementation("group_ranks")(rank, shape, axis) == expected


@pytest.mark.exercise("group_ranks")
@pytest.mark.parametrize("axes", [("dp", "cp"), ("pp", "tp"), ("dp", "pp", "cp")])
def test_flattened_groups_hold_the_ranks_that_differ_only_on_those_axes(axes):
    from minidist.mesh import coordinates
    shape = dict(dp=2, pp=3, cp=2, tp=2)
    for rank in range(24):
        got = implementation("group_ranks")(rank, shape, axes)
        mine = coordinates(rank, **shape)
        expected = [r for r in range(24) if all(coordinates(r, **shape)[a] == mine[a] for a in shape if a not in axes)]
        assert got == expected       # ascending: the group-rank order of a group built from them


def test_group_ranks_refuses_bad_input():
    with pytest.raises(ValueError, match="unknown mesh axes"):
        group_ranks(0, dict(dp=2, tp=2), "ep")
    with pytest.raises(ValueError, match="rank 4 is not in a mesh of 4"):
        group_ranks(4, dict(dp=2, tp=2), "dp")


def test_the_seed_articles_data_parallel_group_is_the_model_parallel_group():
    # The seed article grouped the ranks that share a dp coordinate: on dp x pp x tp = 2x2x2 that puts ranks 0-3
    # together, which hold *different* pieces of one replica. The replicas of rank 0's shard are ranks 0 and 4.
    shape = dict(dp=2, pp=2, cp=1, tp=2)
    assert group_ranks(0, shape, "dp") == [0, 4]
    assert group_ranks(0, shape, ("pp", "cp", "tp")) == [0, 1, 2, 3]


@pytest.mark.parametrize("name", list(SHAPES))
def test_the_meshes_train_like_one_process_and_send_the_formula_on_every_axis(name):
    shape = dict(dp=1, pp=1, cp=1, tp=1) | SHAPES[name]
    world = math.prod(shape.values())
    per_rank = launch(mesh_vs_one_process, world, SHAPES[name], count_bytes=True)
    assert max(r["diff"] for r in per_rank) <= ADAM_TOL
    assert max(r["divergence"] for r in per_rank) == 0
    counted, formula = bytes_by_axis(SHAPES[name], per_rank)
    assert counted == formula
    assert {a for a, b in counted.items() if b} == {a for a in ("pp", "cp", "tp") if shape[a] > 1} | {"dp"}
    assert max(abs(a - b) for a, b in itertools.pairwise(per_rank[0]["losses"])) > 0   # it trained
    # ZeRO-1: the replicas of a shard hold its AdamW moments once between them (8 bytes per parameter), not N times
    axes = ("dp", "cp") if shape["cp"] > 1 else ("dp",)
    for group in {tuple(group_ranks(r, shape, axes)) for r in range(world)}:
        assert sum(per_rank[r]["states"] for r in group) == 8 * per_rank[group[0]]["psi"]
    assert Fraction(sum(r["states"] for r in per_rank), world) == states_formula(per_rank)


def test_a_pipeline_with_context_parallelism_computes_one_process_gradients():
    # pp = 2 x cp = 2: ring attention inside pipeline stages, gradients averaged over cp, one step, no optimizer
    assert max(launch(gradients_vs_one_process, 4, dict(pp=2, cp=2))) <= GRAD_TOL


def test_a_batch_the_mesh_cannot_split_a_mesh_without_the_four_axes_and_several_chunks_per_rank_are_refused():
    def run():
        import torch
        from minidist.mesh import Mesh
        from minidist.models import GPT
        from minidist.parallel3d import ParallelRun
        from minidist.tour.parallel3d import CFG
        with pytest.raises(ValueError, match=r"needs a mesh with the axes \('dp', 'pp', 'cp', 'tp'\).*got \('cp',\)"):
            ParallelRun(GPT(CFG), Mesh.from_axes([("cp", 2)]), zero_stage=0)
        for name, m in (("interleaved", 2), ("zbv", 2), ("dualpipev", 4)):
            with pytest.raises(ValueError, match=f"one pipeline stage per rank: schedule '{name}' runs 2 chunks per "
                                                 f"rank, not supported"):
                ParallelRun(GPT(CFG), Mesh.build(pp=2), zero_stage=0, schedule=name, microbatches=m)
        run = ParallelRun(GPT(CFG), Mesh.build(dp=2), microbatches=2, zero_stage=0)
        with pytest.raises(ValueError, match="6 sequences does not split into dp=2 replicas x 2 micro-batches"):
            run.step(torch.zeros(6, 24, dtype=torch.long), torch.zeros(6, 24, dtype=torch.long))
        return True
    assert launch(run, 2) == [True, True]


def test_coordinates_refuse_a_rank_outside_the_mesh():
    from minidist.mesh import coordinates
    assert coordinates(3, dp=2, tp=2) == dict(dp=1, pp=0, cp=0, tp=1)
    for rank in (4, 9, -1):
        with pytest.raises(ValueError, match=f"rank {rank} is not in a mesh of 4 ranks"):
            coordinates(rank, dp=2, tp=2)


def test_the_example_script_trains_on_a_2x2x2_mesh():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "minidist.examples.train", "--strategy", "3d", "--dp", "2", "--pp",
                          "2", "--tp", "2", "--world-size", "8", "--steps", "2", "--batch-size", "8",
                          "--block-size", "16", "--quiet"], capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "replicas differ by 0" in out.stdout


def test_the_example_script_refuses_a_mesh_that_does_not_fit():
    from minidist.examples.train import main
    with pytest.raises(SystemExit, match="= 6 ranks, but the world has 4.*2 x cp = 6 chunks.*interleaved is not"):
        main(["--strategy", "3d", "--dp", "2", "--cp", "3", "--world-size", "4", "--schedule", "interleaved"])
