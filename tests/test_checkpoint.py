"""Sharded checkpoints (chapter 11): the read plan, flat pieces as boxes and the atomic commit (graded exercises);
resume bit-identical for DDP, ZeRO-2, FSDP and tensor parallelism; resharding 4 -> 2 and 3 ranks, tp 2 -> 1 and a
pipeline into one process; a failed save; DCP reading minidist's files and minidist reading DCP's; refusals by name."""
import itertools
import math
import os
import random
import shutil

import pytest
import torch

from minidist import launch
from minidist.checkpoint import save_load as checkpoint
from minidist.grading import implementation
from minidist.models import GPT, GPTConfig
from minidist.tour import checkpoint as tc


def _fill(shape, boxes_parts):
    """The global tensor rebuilt from parts: [(box offsets, box lengths, values)]."""
    out = torch.full(shape, float("nan"))
    for offsets, lengths, values in boxes_parts:
        out[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))] = values
    return out


@pytest.mark.exercise("read_plan")
def test_read_plan_by_hand():
    read_plan = implementation("read_plan")
    rows = [((0, 0), (2, 4)), ((2, 0), (2, 4))]  # a (4, 4) tensor saved as two row blocks
    assert read_plan(rows, (1, 1), (2, 2)) == [(0, (slice(1, 2), slice(1, 3)), (slice(0, 1), slice(0, 2))),
                                               (1, (slice(0, 1), slice(1, 3)), (slice(1, 2), slice(0, 2)))]
    assert read_plan(rows, (2, 0), (2, 4)) == [(1, (slice(0, 2), slice(0, 4)), (slice(0, 2), slice(0, 4)))]
    assert read_plan([((0,), (3,)), ((3,), (3,))], (3,), (2,)) == [(1, (slice(0, 2),), (slice(0, 2),))]  # edge only
    quarters = [((r, c), (2, 2)) for r in (0, 2) for c in (0, 2)]
    assert [i for i, _, _ in read_plan(quarters, (1, 1), (2, 2))] == [0, 1, 2, 3]
    assert read_plan([((), ())], (), ()) == [(0, (), ())]
    assert read_plan(rows, (0, 0), (0, 4)) == []  # an empty box needs nothing


@pytest.mark.exercise("read_plan")
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_read_plan_fills_random_boxes(ndim):
    read_plan, rng = implementation("read_plan"), random.Random(ndim)
    for _ in range(30):
        shape = [rng.randint(1, 6) for _ in range(ndim)]
        full = torch.arange(math.prod(shape), dtype=torch.float32).view(shape)
        cuts = [sorted({0, shape[d], *rng.sample(range(shape[d] + 1), min(2, shape[d] + 1))}) for d in range(ndim)]
        chunks = [tuple(zip(*[(lo, hi - lo) for lo, hi in box])) for box in
                  itertools.product(*[list(zip(c[:-1], c[1:])) for c in cuts])]
        offsets = [rng.randrange(s) for s in shape]
        lengths = [rng.randint(1, s - o) for s, o in zip(shape, offsets)]
        box = torch.full(lengths, float("nan"))
        for i, src, dst in read_plan(chunks, offsets, lengths):
            off, ln = chunks[i]
            box[dst] = full[tuple(slice(o, o + n) for o, n in zip(off, ln))][src]
        assert torch.equal(box, full[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))])


@pytest.mark.exercise("flat_boxes")
def test_flat_boxes_by_hand():
    flat_boxes = implementation("flat_boxes")
    assert flat_boxes((10,), 3, 7) == [((3,), (4,))]
    assert flat_boxes((3, 4), 5, 7) == [((1, 1), (1, 2))]                       # inside row 1
    assert flat_boxes((3, 4), 2, 11) == [((0, 2), (1, 2)), ((1, 0), (1, 4)), ((2, 0), (1, 3))]
    assert flat_boxes((3, 4), 4, 12) == [((1, 0), (2, 4))]                      # whole rows
    assert flat_boxes((2, 2, 3), 1, 11) == [((0, 0, 1), (1, 1, 2)), ((0, 1, 0), (1, 1, 3)),
                                           ((1, 0, 0), (1, 1, 3)), ((1, 1, 0), (1, 1, 2))]
    assert flat_boxes((), 0, 1) == [((), ())]
    assert flat_boxes((3, 4), 6, 6) == []


@pytest.mark.exercise("flat_boxes")
def test_flat_boxes_list_the_range_in_order():
    flat_boxes, rng = implementation("flat_boxes"), random.Random(0)
    for _ in range(200):
        shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 4)))
        full = torch.arange(math.prod(shape)).view(shape)
        start = rng.randrange(full.numel())
        stop = rng.randint(start, full.numel())
        boxes = flat_boxes(shape, start, stop)
        got = [full[tuple(slice(o, o + n) for o, n in zip(off, ln))].reshape(-1) for off, ln in boxes]
        assert torch.equal(torch.cat(got) if got else torch.zeros(0, dtype=full.dtype), torch.arange(start, stop))
        assert len(boxes) <= 2 * len(shape) - 1


@pytest.mark.exercise("column_rows")
@pytest.mark.parametrize("args, expected", [
    ((144, 72, 3, 0, 72), [(0, 0, 24), (48, 24, 24), (96, 48, 24)]),     # q|k|v of 48 each, 2 ranks
    ((144, 72, 3, 1, 72), [(24, 0, 24), (72, 24, 24), (120, 48, 24)]),
    ((144, 48, 3, 2, 48), [(32, 0, 16), (80, 16, 16), (128, 32, 16)]),   # 3 ranks
    ((509, 255, 1, 0, 255), [(0, 0, 255)]), ((509, 255, 1, 1, 254), [(255, 0, 254)]),   # vocabulary padded to 510
    ((509, 170, 1, 2, 169), [(340, 0, 169)]),                            # ... to 510 on 3 ranks
    ((5, 2, 1, 3, 0), [(6, 0, 0)]),                                      # 5 rows on 4 ranks: rank 3 holds padding
])
def test_column_rows_by_hand(args, expected):
    assert [tuple(r) for r in implementation("column_rows")(*args)] == expected


def tp_boxes_against_the_dense_model():
    """Each column/row-parallel tensor's boxes on this rank: the elements they cover, and whether every box's values
    (taken from the local shard) are the dense model's at the box."""
    import copy
    import minidist.checkpoint.layout as layout
    from minidist.models import GPT
    from minidist.tensor_parallel.plans import GPT_PLAN, parallelize
    from minidist.tour.checkpoint_runs import TP_CFG
    layout.column_rows = implementation("column_rows")    # what tensor_parallel_placements calls, here only
    torch.manual_seed(0)
    model = GPT(TP_CFG)
    dense = copy.deepcopy(model).state_dict()
    parallelize(model, None, GPT_PLAN)
    placements = layout.tensor_parallel_placements(model)
    covered, wrong = {}, []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in placements:
            continue
        place = placements[id(t)]
        covered[name] = sum(math.prod(b.lengths) for b in place.boxes)
        for b in place.boxes:
            region = dense[name][tuple(slice(o, o + n) for o, n in zip(b.offsets, b.lengths))]
            if region.shape != b.take(t.detach()).shape or not torch.equal(region, b.take(t.detach())):
                wrong.append(name)
    return covered, wrong, {n: dense[n].numel() for n in covered}


@pytest.mark.exercise("column_rows")
def test_tensor_parallel_boxes_tile_each_global_tensor_once():
    results = launch(tp_boxes_against_the_dense_model, 2)
    numels = results[0][2]
    assert "wte.weight" in numels and "blocks.0.attn.qkv.weight" in numels
    assert all(not wrong for _, wrong, _ in results)
    assert {n: sum(r[0][n] for r in results) for n in numels} == numels   # every element saved by exactly one rank


def _checkpoint_dir(path, value):
    os.makedirs(path)
    with open(os.path.join(path, "metadata.json"), "w") as f:
        f.write(value)


def _found(path):
    with open(os.path.join(checkpoint.resolve(path), "metadata.json")) as f:
        return f.read()


@pytest.mark.exercise("atomic_commit")
@pytest.mark.parametrize("before", ["nothing", "previous", "previous and a stale .old", "only a .old (interrupted)"])
def test_commit_replaces_the_checkpoint(tmp_path, before):
    commit, path, staged = implementation("atomic_commit"), str(tmp_path / "ckpt"), str(tmp_path / "ckpt.partial")
    if before.startswith("previous"):
        _checkpoint_dir(path, "old")
    if ".old" in before:
        _checkpoint_dir(path + ".old", "older")
    _checkpoint_dir(staged, "new")
    commit(staged, path)
    assert _found(path) == "new" and checkpoint.resolve(path) == path
    assert not os.path.exists(staged) and not os.path.exists(path + ".old")


class Crash(Exception):
    pass


@pytest.mark.exercise("atomic_commit")
@pytest.mark.parametrize("before", ["previous", "only a .old (interrupted)"])
def test_a_crash_anywhere_in_commit_leaves_a_whole_checkpoint(tmp_path, monkeypatch, before):
    commit = implementation("atomic_commit")
    real = {"replace": os.replace, "rename": os.rename, "rmtree": shutil.rmtree}
    for crash_at in range(1, 6):
        where = tmp_path / str(crash_at)
        path = str(where / "ckpt")
        _checkpoint_dir(path if before == "previous" else path + ".old", "old")
        _checkpoint_dir(path + ".partial", "new")
        calls = []

        def counting(name):
            def call(*args, **kwargs):
                calls.append(name)
                if len(calls) == crash_at:
                    raise Crash(name)
                return real[name](*args, **kwargs)
            return call
        for name in real:
            monkeypatch.setattr(os if name != "rmtree" else shutil, name, counting(name))
        try:
            commit(path + ".partial", path)
        except Crash:
            pass
        finally:
            monkeypatch.undo()
        assert _found(path) in ("old", "new"), f"crash at call {crash_at} ({calls}) left no whole checkpoint"


def test_refusals_name_the_problem(tmp_path):
    model, opt = GPT(GPTConfig(n_layer=1, n_embd=16)), None
    checkpoint.save(str(tmp_path / "a"), model)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        checkpoint.load(str(tmp_path / "a"), model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match=r"checkpoint has no \['blocks.1"):
        checkpoint.load(str(tmp_path / "a"), GPT(GPTConfig(n_layer=2, n_embd=16)), opt)
    with pytest.raises(ValueError, match=r"wte.weight: the checkpoint holds shape \(512, 16\), this model \(512, 32\)"):
        checkpoint.load(str(tmp_path / "a"), GPT(GPTConfig(n_layer=1, n_embd=32)), opt)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        checkpoint.load(str(tmp_path / "missing"), model)
    weird = torch.optim.SGD(model.parameters(), lr=0.1)
    weird.state[model.wte.weight] = {"factored": torch.zeros(3)}
    with pytest.raises(ValueError, match="neither per element nor a scalar"):
        checkpoint.save(str(tmp_path / "b"), model, weird)
    with pytest.raises(ValueError, match=r"extra cannot be read back with torch.load\(weights_only=True\)"):
        checkpoint.save(str(tmp_path / "b"), model, extra={"step": 3, "sampler": Crash()})  # else: unloadable
    assert not os.path.exists(tmp_path / "b") and not os.path.exists(tmp_path / "b.partial")
    with pytest.raises(ValueError, match=r"wte.weight: the checkpoint holds float32, this model bfloat16: pass "
                                         r"allow_cast=True"):
        checkpoint.load(str(tmp_path / "a"), GPT(GPTConfig(n_layer=1, n_embd=16)).bfloat16())
    checkpoint.load(str(tmp_path / "a"), GPT(GPTConfig(n_layer=1, n_embd=16)).bfloat16(), allow_cast=True)


def _sgd_step(model, params):
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    model(torch.randint(512, (2, 8))).float().sum().backward()
    sgd.step()
    return sgd


def test_an_optimizer_that_does_not_fit_is_refused(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_embd=16))
    checkpoint.save(str(tmp_path / "sgd"), model, _sgd_step(model, model.parameters()))
    with pytest.raises(ValueError, match="the checkpoint's optimizer is SGD, this one AdamW"):
        checkpoint.load(str(tmp_path / "sgd"), model, torch.optim.AdamW(model.parameters()))
    checkpoint.save(str(tmp_path / "blocks"), model, _sgd_step(model, model.blocks.parameters()))
    with pytest.raises(ValueError, match="no optimizer state for wte.weight .*its optimizer did not hold"):
        checkpoint.load(str(tmp_path / "blocks"), model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


def test_an_fp32_model_loads_the_fp32_masters_not_the_rounded_weights(tmp_path):
    from minidist.mixed_precision import MixedPrecisionOptimizer
    torch.manual_seed(0)
    half = GPT(GPTConfig(n_layer=1, n_embd=16)).half()
    opt = MixedPrecisionOptimizer(half, torch.optim.AdamW, lr=1e-2)
    opt.scaler.scale_loss(half(torch.randint(512, (2, 8))).float().logsumexp(-1).mean()).backward()
    assert opt.step()
    checkpoint.save(str(tmp_path / "mp"), half, opt)
    full = GPT(GPTConfig(n_layer=1, n_embd=16))
    checkpoint.load(str(tmp_path / "mp"), full)  # no cast: every trained weight has an fp32 master
    masters = {n: m for (n, _), m in zip(half.named_parameters(), opt.master)}
    assert tc.max_diff(masters, {n: p for n, p in full.named_parameters()}) == 0.0
    assert tc.max_diff(masters, {n: p for n, p in half.named_parameters()}) > 0  # the fp16 copies are rounded


def test_a_file_that_contradicts_the_metadata_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    model = GPT(GPTConfig(n_layer=1, n_embd=16))
    checkpoint.save(str(tmp_path / "a") + "/", model)  # a trailing "/" names the same directory
    assert sorted(os.listdir(tmp_path)) == ["a"] and "metadata.json" in os.listdir(tmp_path / "a")
    name = str(tmp_path / "a" / "rank00000.safetensors")
    tensors = load_file(name)
    save_file({**tensors, "ln_f.weight": torch.ones(1)}, name)  # copy_ would broadcast it over all 16 elements
    with pytest.raises(ValueError, match=r"ln_f.weight is stored as float32 \(1,\), the metadata says float32 \(16,\)"):
        checkpoint.load(str(tmp_path / "a"), model)


def test_dcp_metadata_is_unpickled_with_dcp_classes_only(tmp_path):
    import pickle

    class Hostile:
        def __reduce__(self):
            return print, ("this ran during checkpoint.load",)
    os.makedirs(tmp_path / "dcp")
    with open(tmp_path / "dcp" / ".metadata", "wb") as f:
        pickle.dump(Hostile(), f)
    with pytest.raises(pickle.UnpicklingError, match="DCP metadata may not refer to builtins.print"):
        checkpoint.load(str(tmp_path / "dcp"), GPT(GPTConfig(n_layer=1, n_embd=16)))


def test_every_file_and_the_directory_are_fsynced_and_a_load_sees_one_checkpoint(tmp_path, monkeypatch):
    from minidist.checkpoint import file_format as checkpoint_format
    synced, real = [], checkpoint_format.fsync
    monkeypatch.setattr(checkpoint_format, "fsync", lambda p: (synced.append(os.path.relpath(p, tmp_path)), real(p)))
    model = GPT(GPTConfig(n_layer=1, n_embd=16))
    checkpoint.save(str(tmp_path / "c"), model, _sgd_step(model, model.parameters()), extra={"step": 1})
    files = [os.path.join("c.partial", f) for f in os.listdir(tmp_path / "c")]
    assert set(files) <= set(synced) and {"c.partial", "."} <= set(synced), synced
    assert synced.index("c.partial") > max(synced.index(f) for f in files)  # the entries, once all are written
    reading = checkpoint.read_pieces

    def commit_meanwhile(where, reads):  # another save commits to the same path in the middle of this load
        checkpoint.save(str(tmp_path / "c"), GPT(GPTConfig(n_layer=1, n_embd=16)))
        reading(where, reads)
    monkeypatch.setattr(checkpoint, "read_pieces", commit_meanwhile)
    with pytest.raises(RuntimeError, match="was replaced while it was being loaded"):
        checkpoint.load(str(tmp_path / "c"), model)


def test_resume_is_bit_identical(tmp_path):
    before = launch(tc.resume_before, 2, str(tmp_path))
    after = launch(tc.resume_after, 2, str(tmp_path))
    forgot = launch(tc.forgetting, 2, str(tmp_path), ("ddp", "fsdp"), [("rng",), ("scaler",), ("position",)])[0]
    for s in tc.RESUMED:
        assert max(tc.max_diff(a[s][0], b[s]) for a, b in zip(after, before)) == 0.0, s
    assert after[0]["ddp"][1] == 0.0  # replicas bitwise equal
    for f, runs in forgot.items():  # without the RNG (dropout), the loss scaler or the position, the runs part
        for s in ("ddp", "fsdp"):
            gap = tc.max_diff(runs[s][0], before[0][s])
            assert gap > 1e-4 if s == "ddp" or f != ("scaler",) else gap == 0.0, (f, s)  # FSDP here: no scaler


def test_resharding_4_to_2_and_3(tmp_path):
    saved = launch(tc.reshard_save, 4, str(tmp_path), ("zero2", "fsdp"))[0]
    for m in (2, 3):
        results = launch(tc.reshard_load, m, str(tmp_path), [("zero2", "zero2"), ("fsdp", "fsdp")], saved)
        for key in results[0]:
            assert max(r[key] for r in results) == (0.0, 0.0), (m, key)


def test_tensor_parallel_2_to_1_and_pipeline_into_one_process_and_tied_states_into_a_pipeline(tmp_path):
    saved = launch(tc.reshard_save, 2, str(tmp_path), ("tp", "pp"))[0]
    [result] = launch(tc.reshard_load, 1, str(tmp_path), [("tp", "dense"), ("tp", "tp"), ("pp", "dense")], saved)
    assert result == {k: (0.0, 0.0) for k in result}
    # TP names the tied embedding's AdamW states wte.weight only; the last pipeline stage holds it as lm_head.weight
    first, last = launch(tc.into_pipeline, 2, str(tmp_path), "tp")
    assert "lm_head.weight" in last[0] and "wte.weight" in first[0]
    for states in (first[0], last[0]):
        assert tc.max_diff(states, {n: saved["tp"][1]["wte.weight" if n == "lm_head.weight" else n]
                                    for n in states}) == 0.0
    assert tc.max_diff({"tied": first[1]}, {"tied": last[1]}) == 0.0  # its two copies took the same step
    meta = checkpoint.read_metadata(str(tmp_path / "tp"))["tensors"]
    assert meta["wte.weight"]["shape"] == [509, 48]  # the vocabulary padding (to 510) is not saved
    assert [c["lengths"] for c in meta["wte.weight"]["chunks"]] == [[255, 48], [254, 48]]
    assert len(meta["blocks.0.attn.qkv.weight"]["chunks"]) == 6  # q, k and v: a row block each, per rank


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path):
    results = launch(tc.crash_during_save, 2, str(tmp_path / "ckpt"))
    assert all("failed while writing its files on rank(s) [1]" in message for message, _, _ in results)
    assert "disk full (injected" in results[1][0]
    assert not any(left for _, left, _ in results) and all(diff == 0.0 for _, _, diff in results)


def test_dcp_reads_minidist_and_minidist_reads_dcp(tmp_path):
    results = launch(tc.dcp_interop, 2, str(tmp_path))
    assert set(results[0]) == {"minidist ZeRO-2 checkpoint -> dcp.load", "minidist FSDP checkpoint -> dcp.load",
                               "dcp.save -> minidist load (FSDP)"}
    assert all(v == 0.0 for r in results for v in r.values())


def test_element_runs_are_the_flat_ranges_a_box_covers():
    from minidist.plots import element_runs
    assert element_runs((3, 4), (slice(1, 3), slice(0, 4))) == [(4, 12)]          # whole rows: one run
    assert element_runs((3, 4), (slice(0, 2), slice(1, 3))) == [(1, 3), (5, 7)]  # a column band: one run per row
    assert element_runs((5,), (slice(2, 4),)) == [(2, 4)]
    assert element_runs((), ()) == [(0, 1)]


def test_max_diff_never_hides_a_nan():
    zero, nan = torch.zeros(3), torch.tensor([0.0, float("nan"), 0.0])
    assert tc.max_diff({"a": zero, "b": zero}, {"a": zero, "b": zero}) == 0.0
    assert tc.max_diff({"a": zero, "b": nan}, {"a": zero, "b": zero}) == float("inf")  # not max([0.0, nan]) == 0.0
    assert tc.max_diff({"a": {"s": zero}}, {"a": {"s": torch.zeros(4)}}) == float("inf")  # shapes differ


def test_an_overlap_and_a_gap_of_the_same_size_are_refused():
    from minidist.checkpoint.save_load import _reads
    from minidist.checkpoint.file_format import global_plan
    from minidist.checkpoint.layout import whole

    def piece(offsets):  # rows [r, r + 2) of a (4, 2) tensor
        return {"key": "w", "shape": [4, 2], "dtype": "float32", "offsets": offsets, "lengths": [2, 2]}
    with pytest.raises(ValueError, match=r"boxes \(0, 0\) \+ \(2, 2\) and \(1, 0\) \+ \(2, 2\) overlap"):
        global_plan([[piece([0, 0])], [piece([1, 0])]])  # row 1 twice, row 3 never: 8 of 8 elements all the same
    plan = global_plan([[piece([0, 0])], [piece([2, 0])]])
    plan["w"]["chunks"][1]["offsets"] = [1, 0]  # a metadata.json that says so
    t = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="w: the checkpoint's chunks do not fill box"):
        _reads({"tensors": plan}, [("w", t, whole(t))])
