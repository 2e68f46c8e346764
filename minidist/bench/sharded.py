"""ZeRO against torch's ZeroRedundancyOptimizer (chapter 05), FSDP against FSDP2 (chapter 06)."""
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ..data import random_batches, token_ids
from ..launch import device, launch, synchronize
from ..models import GPT, lm_loss
from .ddp import median_step_times
from .suite import gpt_config, model_state_bytes, prepare, shape_fields


def _zero_variants() -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from ..zero import ZeroOptimizer
    return {  # the reference at its fastest: it broadcasts one bucket of parameters at a time, not one parameter (its
        # default), and DDP reduces into views of the gradients and broadcasts no buffers (as bench ddp's)
        "minidist": lambda m: (m, ZeroOptimizer(m.parameters(), torch.optim.AdamW, stage=1, lr=1e-3)),
        "reference": lambda m: (DDP(m, gradient_as_bucket_view=True, forward_sync_buffers=False),
                                ZeroRedundancyOptimizer(m.parameters(), torch.optim.AdamW, lr=1e-3,
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


def sharded_step_times(what: str, steps: int, warmup: int, batch_size: int, cfg=None) -> dict[str, float]:
    """On every rank: the median seconds per training step of each variant (median_step_times, as for ddp), then
    one more step each for the bytes it holds after its optimizer step (`<name>_held_bytes`)."""
    dev, rank, n = device(), dist.get_rank(), dist.get_world_size()
    runs, models = {}, {}
    for name, build in (_zero_variants() if what == "zero" else _fsdp_variants()).items():
        torch.manual_seed(0)
        models[name], opt = build(GPT(cfg).to(dev))
        runs[name] = (lambda x, y, model=models[name]: lm_loss(model(x), y).backward(), opt)
    batches = [(x.chunk(n)[rank].to(dev), y.chunk(n)[rank].to(dev)) for x, y in   # this rank's slices
               random_batches(token_ids(), batch_size * n, GPT(cfg).cfg.block_size, steps + warmup)]
    result = median_step_times(runs, batches, warmup)
    if what == "zero":
        result |= {f"{name}_phases": zero_phase_times(run, opt, batches[warmup:][:3]) for name, (run, opt) in
                   runs.items()}
    for name, (run, opt) in runs.items():
        run(*batches[0])
        opt.step()
        result[f"{name}_held_bytes"] = model_state_bytes(models[name], opt)
        opt.zero_grad()
    return result


def zero_phase_times(run, opt, batches) -> dict[str, float]:
    """Where a ZeRO step's time goes: median seconds of each phase over `batches`, the phases run one after the other
    (every rank starts each phase together): the forward and backward (DDP's all-reduce and stage 2's reduce-scatter
    run inside it), ZeroOptimizer.unscale_ (stage 1's reduce-scatter; nothing left to do for stage 2), and the step
    (the update, then the all-gather or the reference's broadcasts)."""
    phases = {"forward_backward": [], "reduce_scatter": [], "step": []}
    for x, y in batches:
        for phase, do in (("forward_backward", lambda: run(x, y)),
                          ("reduce_scatter", getattr(opt, "unscale_", lambda: None)), ("step", opt.step)):
            dist.barrier()
            start = time.perf_counter()
            do()
            synchronize()
            phases[phase].append(time.perf_counter() - start)
        opt.zero_grad()
    return {phase: statistics.median(t) for phase, t in phases.items()}


def bench_sharded(what: str, world_size: int = 2, steps: int = 30, warmup: int = 5, batch_size: int | None = None,
                  *, n_layer: int | None = None, n_embd: int | None = None, seq: int | None = None) -> dict:
    """what="zero": ZeroOptimizer stage 1 against DDP + ZeroRedundancyOptimizer(parameters_as_bucket_view=True)
    (stage 2 too); what="fsdp": per-block fully_shard against FSDP2's per-block fully_shard (one unit too). AdamW, the
    tiny GPT unless n_layer, n_embd, seq say otherwise; batch_size: sequences per rank (default 16). Medians of
    interleaved steps; they still vary from run to run (shared cores), and on the tiny GPT Python overhead, not
    computation, sets the pace. Beside the times: the bytes each variant holds per rank (suite.model_state_bytes; the
    largest over the ranks); for zero, where each variant's step goes (zero_phase_times: `<name>_phases`)."""
    if what not in ("zero", "fsdp"):
        raise ValueError(f"bench_sharded compares 'zero' or 'fsdp', got {what!r}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    cfg, batch_size = gpt_config(n_layer, n_embd, seq), batch_size or 16
    prepare()
    per_rank = launch(sharded_step_times, world_size, what, steps, warmup, batch_size, cfg)
    phases = {key: {phase: max(r[key][phase] for r in per_rank) for phase in per_rank[0][key]}  # the slowest rank
              for key in per_rank[0] if key.endswith("_phases")}
    worst = {name: max(r[name] for r in per_rank) for name in per_rank[0] if name not in phases}  # sets the pace
    extra = "stage2" if what == "zero" else "one_unit"
    return {"what": what, "world_size": world_size, **shape_fields(cfg), "steps": steps, "warmup": warmup,
            "batch_size_per_rank": batch_size, "minidist_s": worst["minidist"],
            "reference_s": worst["reference"], "ratio": worst["minidist"] / worst["reference"],
            f"{extra}_s": worst[extra], f"{extra}_ratio": worst[extra] / worst["reference"],
            **{key: value for key, value in worst.items() if key.endswith("_held_bytes")}, **phases}


def format_sharded(result: dict) -> str:
    names = (("torch DDP + ZeroRedundancyOptimizer (bucket view)", "minidist ZeroOptimizer, stage 1",
              "minidist ZeroOptimizer, stage 2", "stage2", 1.05) if result["what"] == "zero" else
             ("torch FSDP2 fully_shard, per block", "minidist fully_shard, per block",
              "minidist fully_shard, one unit", "one_unit", 1.05))
    held = {key: f"   {result[key + '_held_bytes'] / 2**20:8.2f} MiB held" if key + "_held_bytes" in result else ""
            for key in ("reference", "minidist", names[3])}
    return "\n".join([
        f"{result['model']}, {result['world_size']} ranks, median of {result['steps']} steps (after "
        f"{result['warmup']} warm-up), AdamW; held: bytes per rank after the optimizer step (parameters, gradients, "
        f"optimizer state)",
        f"  {names[0]:<50}{result['reference_s'] * 1e3:8.2f} ms/step{' ' * 26}{held['reference']}",
        f"  {names[1]:<50}{result['minidist_s'] * 1e3:8.2f} ms/step   ratio {result['ratio']:.3f} "
        f"(goal <= {names[4]}){held['minidist']}",
        f"  {names[2]:<50}{result[names[3] + '_s'] * 1e3:8.2f} ms/step   ratio {result[names[3] + '_ratio']:.3f}"
        f"{' ' * 14}{held[names[3]]}",
    ] + (["  where the time goes, ms per phase run one at a time (forward+backward / reduce-scatter after it / step):"]
         + [f"    {label:<48}{' / '.join(f'{v * 1e3:.1f}' for v in result[key + '_phases'].values())}"
            for key, label in (("reference", "DDP (all-reduce inside backward) + ZeRO"),
                               ("minidist", "stage 1"), ("stage2", "stage 2 (reduce-scatter inside backward)"))]
         if "minidist_phases" in result else []))


def bench_zero(world_size: int = 2, steps: int = 30, warmup: int = 5, batch_size: int | None = None, **shape) -> dict:
    return bench_sharded("zero", world_size, steps, warmup, batch_size, **shape)


def bench_fsdp(world_size: int = 2, steps: int = 30, warmup: int = 5, batch_size: int | None = None, **shape) -> dict:
    return bench_sharded("fsdp", world_size, steps, warmup, batch_size, **shape)


format_zero = format_fsdp = format_sharded
