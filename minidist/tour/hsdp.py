"""Tour checks for HSDP (chapter 06): fully_shard with replicate_group= on 4 ranks as 2 replicas x 2 shards, against
one process and torch FSDP2 on a 2-D DeviceMesh, the bytes per axis; and FSDP against HSDP on a two-level network
(comm.SimulatedLink with ranks_per_node): the bytes that cross nodes, counted, and the step time.
"""
import copy
import time

import torch
import torch.distributed as dist

from .. import comm
from ..fsdp import full_state_dict
from ..launch import device, launch
from ..memory import measure_state_bytes
from ..mesh import Mesh
from ..models import GPT, count_params, lm_loss
from ..testing import on_device, to_device
from .data_parallel import BATCHES, CFG, SGD_TOL
from .fsdp import per_block
from .rows import covers, make_row
from .zero import ZCFG


def hsdp_groups(shard: int) -> tuple:
    """(shard group, replicate group) of this rank on a (world / shard) x shard mesh: a row shards, a column
    replicates — init_device_mesh's (replicate, shard) layout, so the same ranks pair up as in FSDP2's HSDP."""
    mesh = Mesh.from_axes([("replicate", dist.get_world_size() // shard), ("shard", shard)])
    return mesh.group("shard"), mesh.group("replicate")


@on_device
def hsdp_against(shard: int = 2, batches=BATCHES[:3]) -> dict:
    """HSDP (sharded over `shard` ranks, replicated across the rest), per-block units, 3 SGD steps: the full weights
    against one process and against torch FSDP2 on a 2-D DeviceMesh; then the bytes of one step (fp32, ZCFG: no
    padding) on minidist's ring, per op, with the model's size and tensor count for the formula."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard as torch_fully_shard
    rank, n = dist.get_rank(), dist.get_world_size()
    sg, rg = hsdp_groups(shard)
    torch.manual_seed(0)
    ours = GPT(CFG)
    theirs, reference = copy.deepcopy(ours), copy.deepcopy(ours)
    per_block(ours, group=sg, replicate_group=rg)
    mesh = init_device_mesh(device().type, (n // shard, shard), mesh_dim_names=("replicate", "shard"))
    for m in (*theirs.blocks, theirs):
        torch_fully_shard(m, mesh=mesh)
    runs = [(m, torch.optim.SGD(m.parameters(), lr=0.1), part) for m, part in ((ours, True), (theirs, True),
                                                                              (reference, False))]
    for x, y in map(to_device, batches):
        for model, opt, part in runs:
            xb, yb = (x.chunk(n)[rank], y.chunk(n)[rank]) if part else (x, y)
            lm_loss(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
    mine = full_state_dict(ours)
    out = {"one process": max((mine[k] - v).abs().max().item() for k, v in reference.state_dict().items()),
           "FSDP2": max((mine[k] - v.full_tensor()).abs().max().item() for k, v in theirs.state_dict().items()),
           "shapes": {k: tuple(p.shape) for k, p in ours.named_parameters()}}
    torch.manual_seed(0)
    model = per_block(GPT(ZCFG), group=sg, replicate_group=rg)
    x, y = (t.chunk(n)[rank] for t in to_device(BATCHES[0]))
    with comm.ring_backend():
        lm_loss(model(x), y).backward()  # the first step learns the order; the second is counted
        with comm.ByteLedger() as ledger:
            lm_loss(model(x), y).backward()
    out["bytes"] = {op: ledger.total_bytes(op) for op in ledger.by_op()}
    out["psi"], out["tensors"] = count_params(GPT(ZCFG)), len(list(model.parameters()))  # (the full model's)
    return out


def hsdp_bytes_formula(psi: int, tensors: int, shard: int, replicas: int, element: int = 4) -> dict:
    """Ring bytes one rank sends in an HSDP step, per op: two all-gathers and a reduce-scatter of the parameters
    over the shard axis, an all-reduce of this rank's gradient shard (Ψ/shard) over the replicate axis, and the
    flags' all-reduce (an int32 per tensor) on each axis."""
    size = element * psi
    return {"all_gather": 2 * comm.ring_bytes("all_gather", size, shard),
            "reduce_scatter": comm.ring_bytes("reduce_scatter", size, shard),
            "all_reduce": comm.ring_bytes("all_reduce", size // shard, replicas)
            + comm.ring_bytes("all_reduce", 4 * tensors, shard) + comm.ring_bytes("all_reduce", 4 * tensors, replicas)}



@on_device
def two_level_network(link: comm.SimulatedLink) -> dict:
    """FSDP over every rank against HSDP (a shard group per node, replicated across nodes), per-block units, fp32,
    ZCFG, SGD, under the ring backend over `link` (its ranks_per_node are the shard groups): per strategy, the bytes
    this rank sent in one step (ledger) and across nodes (the link), the step's seconds, the model states held after
    it (the fp32 shards: zero_grad freed the gradients, SGD keeps no state)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    sg, rg = hsdp_groups(link.ranks_per_node)
    x, y = (t.chunk(n)[rank] for t in to_device(BATCHES[0]))
    out = {}
    for name, options in (("FSDP", {}), ("HSDP", dict(group=sg, replicate_group=rg))):
        torch.manual_seed(0)
        model = per_block(GPT(ZCFG), **options)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with comm.ring_backend(link):
            for step in range(2):  # the first step learns the order of the units; the second is measured
                dist.barrier()
                crossed, start = comm.cross_node_bytes(), time.perf_counter()
                with comm.ByteLedger() as ledger:
                    lm_loss(model(x), y).backward()
                    opt.step()
                    opt.zero_grad()
                seconds = time.perf_counter() - start
        out[name] = {"bytes": ledger.total_bytes(), "crossed": comm.cross_node_bytes() - crossed, "seconds": seconds,
                     "states": measure_state_bytes(model, opt).total}
    out["psi"], out["tensors"] = count_params(GPT(ZCFG)), len(list(GPT(ZCFG).parameters()))
    return out


@covers("HSDP 2 x 2 (a unit per block), fp32, SGD")
def check_hsdp(world_size: int) -> list[dict]:
    """On 4 ranks whatever the tour's world size: 2 replicas x 2 shards need 4."""
    start = time.perf_counter()
    per_rank = launch(hsdp_against, 4, 2)
    seconds = time.perf_counter() - start
    r = per_rank[0]
    return [make_row("HSDP 2 x 2 (a unit per block), fp32, SGD", "one process; FSDP2 on a 2-D mesh",
                     max_abs_diff=max(max(p["one process"], p["FSDP2"]) for p in per_rank), tolerance=SGD_TOL,
                     comm_bytes=sum(sum(p["bytes"].values()) for p in per_rank) / 4,
                     comm_bytes_theory=sum(hsdp_bytes_formula(r["psi"], r["tensors"], 2, 2).values()),
                     seconds=seconds)]



CHECKS = [check_hsdp]
