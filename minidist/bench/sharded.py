"""ZeRO against torch's ZeroRedundancyOptimizer (chapter 05), FSDP against FSDP2 (chapter 06)."""
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ..data import random_batches, token_ids
from ..launch import device, launch
from ..models import GPT, lm_loss
from .ddp import median_step_times


def _zero_variants() -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from ..zero import ZeroOptimizer
    return {  # the reference broadcasts one bucket of parameters at a time, not one parameter (its default, slower)
        "minidist": lambda m: (m, ZeroOptimizer(m.parameters(), torch.optim.AdamW, stage=1, lr=1e-3)),
        "reference": lambda m: (DDP(m), ZeroRedundancyOptimizer(m.parameters(), torch.optim.AdamW, lr=1e-3,
                                                                parameters_as_bucket_view=True)),
        "stage2": lambda m: (m, ZeroOptimizer(m.parameters(), torch.optim.AdamW, stage=2, lr=1e-3)),
    }


def _fsdp_variants() -> dict:
    from torch.distributed.fsdp import fully_shard as torch_fully_shard
    from ..fsdp import fully_shard
    from ..mesh import Mesh

    def per_block(shard, m):
        for block in m.blocks:
            shard(block)
        shard(m)
        return m, torch.optim.AdamW(m.parameters(), lr=1e-3)
    mesh = Mesh.build(dp=dist.get_world_size()).device_mesh(axes=("dp",))
    return {"minidist": lambda m: per_block(fully_shard, m),
            "reference": lambda m: per_block(lambda mod: torch_fully_shard(mod, mesh=mesh), m),
            "one_unit": lambda m: (fully_shard(m), torch.optim.AdamW(m.parameters(), lr=1e-3))}


def sharded_step_times(what: str, steps: int, warmup: int, batch_size: int) -> dict[str, float]:
    """On every rank: the median seconds per training step of each variant (median_step_times, as for ddp)."""
    dev, rank, n = device(), dist.get_rank(), dist.get_world_size()
    runs = {}
    for name, build in (_zero_variants() if what == "zero" else _fsdp_variants()).items():
        torch.manual_seed(0)
        model, opt = build(GPT().to(dev))
        runs[name] = (lambda x, y, model=model: lm_loss(model(x), y).backward(), opt)
    batches = [(x.chunk(n)[rank].to(dev), y.chunk(n)[rank].to(dev)) for x, y in   # this rank's slices
               random_batches(token_ids(), batch_size * n, GPT().cfg.block_size, steps + warmup)]
    return median_step_times(runs, batches, warmup)


def bench_sharded(what: str, world_size: int = 2, steps: int = 30, warmup: int = 5, batch_size: int = 16) -> dict:
    """what="zero": ZeroOptimizer stage 1 against DDP + ZeroRedundancyOptimizer(parameters_as_bucket_view=True)
    (stage 2 too); what="fsdp": per-block fully_shard against FSDP2's per-block fully_shard (one unit too). AdamW, the
    tiny GPT. Medians of interleaved steps; they still vary from run to run (shared cores), and on a model this small
    Python overhead, not communication, sets the pace."""
    if what not in ("zero", "fsdp"):
        raise ValueError(f"bench_sharded compares 'zero' or 'fsdp', got {what!r}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    import torch._dynamo  # noqa: F401  (imported by the first optimizer: once here, the forked ranks inherit it)
    token_ids()           # tokenized once here, not on every rank
    per_rank = launch(sharded_step_times, world_size, what, steps, warmup, batch_size)
    medians = {name: max(r[name] for r in per_rank) for name in per_rank[0]}  # the slowest rank sets the pace
    extra = "stage2" if what == "zero" else "one_unit"
    return {"what": what, "world_size": world_size, "model": "tiny-gpt", "steps": steps, "warmup": warmup,
            "batch_size_per_rank": batch_size, "minidist_s": medians["minidist"],
            "reference_s": medians["reference"], "ratio": medians["minidist"] / medians["reference"],
            f"{extra}_s": medians[extra], f"{extra}_ratio": medians[extra] / medians["reference"]}


def format_sharded(result: dict) -> str:
    names = (("torch DDP + ZeroRedundancyOptimizer (bucket view)", "minidist ZeroOptimizer, stage 1",
              "minidist ZeroOptimizer, stage 2", "stage2", 1.15) if result["what"] == "zero" else
             ("torch FSDP2 fully_shard, per block", "minidist fully_shard, per block",
              "minidist fully_shard, one unit", "one_unit", 1.25))
    return "\n".join([
        f"tiny GPT, {result['world_size']} ranks, median of {result['steps']} steps (after {result['warmup']} warm-up),"
        f" AdamW",
        f"  {names[0]:<50}{result['reference_s'] * 1e3:8.2f} ms/step",
        f"  {names[1]:<50}{result['minidist_s'] * 1e3:8.2f} ms/step   ratio {result['ratio']:.3f} "
        f"(goal <= {names[4]})",
        f"  {names[2]:<50}{result[names[3] + '_s'] * 1e3:8.2f} ms/step   ratio {result[names[3] + '_ratio']:.3f}",
    ])


def bench_zero(world_size: int = 2, steps: int = 30, warmup: int = 5, batch_size: int = 16) -> dict:
    return bench_sharded("zero", world_size, steps, warmup, batch_size)


def bench_fsdp(world_size: int = 2, steps: int = 30, warmup: int = 5, batch_size: int = 16) -> dict:
    return bench_sharded("fsdp", world_size, steps, warmup, batch_size)


format_zero = format_fsdp = format_sharded
