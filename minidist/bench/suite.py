"""The GPT benchmarks as one suite: their shape flags, the registry `bench all` runs, and the memory they report.

Every benchmark that trains a GPT against its PyTorch reference is registered in BENCHES, one line each:

    "ddp": Bench("ddp", "DataParallel, overlapped", "torch DDP", ("bucket_cap_mb",)),

names its module in minidist.bench, which holds `bench_<name>(world_size, steps, warmup, *, n_layer, n_embd, seq,
batch_size, **options)` (None for a shape flag means the bench's own default) returning a dict with minidist_s,
reference_s, ratio and params, and `format_<name>(result)`; and, if some shapes cannot be run, `check_<name>(world_size,
*, n_layer, n_embd, seq, batch_size)` raising ValueError, which `bench all` calls for every benchmark before it starts
any. `python -m minidist bench <name>` and `bench all` both read the registry, so a new benchmark joins both by its
line here (options: the command line's extra flags it takes).

Sizes: the GPTs are the tiny one by default (2 layers of 64, sequence 64: under 1M parameters, where a step takes
milliseconds and fixed per-call costs set the ratio); `--n-layer 8 --n-embd 512 --seq 128 --batch-size 4` is a 25.5M
model where compute sets it. A shape a technique cannot take is refused by name before any rank starts.

Memory: `model_state_bytes` counts the bytes a rank holds in tensors right after an optimizer step, before zero_grad
(parameters, gradients, optimizer state; each storage once, a freed one as 0): what ZeRO and FSDP shard. Activations
and communication buffers (DDP's buckets) are not counted.
"""
import importlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Bench:
    module: str           # minidist.bench.<module> holds bench_<name> and format_<name>
    technique: str
    reference: str
    options: tuple = ()   # the command line's extra options it takes, by their argparse dest


BENCHES = {
    "ddp": Bench("ddp", "DataParallel, overlapped", "torch DDP", ("bucket_cap_mb",)),
    "tp": Bench("tp", "parallelize (tensor parallel)", "DTensor parallelize_module", ("sequence_parallel",)),
    "pp": Bench("pp", "PipelineRuntime 1F1B", "torch Schedule1F1B", ("microbatches", "schedule")),
    "zero": Bench("sharded", "ZeroOptimizer stage 1", "DDP + ZeroRedundancyOptimizer"),
    "fsdp": Bench("sharded", "fully_shard, per block", "torch FSDP2 fully_shard, per block"),
    "moe": Bench("moe", "expert_parallel, a MoE GPT", "DeepSpeed MoE layers (ep = world)"),
}


def functions(name: str):
    """(bench_<name>, format_<name>, check_<name> or None) of a registered benchmark."""
    module = importlib.import_module(f"minidist.bench.{BENCHES[name].module}")
    return getattr(module, f"bench_{name}"), getattr(module, f"format_{name}"), getattr(module, f"check_{name}", None)


def prepare() -> None:
    """What every rank needs, done once in the parent (forked ranks inherit it): the corpus tokenized, and
    torch._dynamo imported (the first optimizer imports it otherwise: seconds per rank)."""
    import torch._dynamo  # noqa: F401
    from ..data import token_ids
    token_ids()


def gpt_config(n_layer: int | None = None, n_embd: int | None = None, seq: int | None = None, *,
               default_layers: int = 2):
    """The benchmark's GPTConfig: the tiny GPT's, with the sizes given (refused by GPTConfig if they cannot be)."""
    from ..models import GPTConfig
    tiny = GPTConfig()
    return GPTConfig(n_layer=n_layer or default_layers, n_embd=n_embd or tiny.n_embd, block_size=seq or tiny.block_size)


def shape_fields(cfg) -> dict:
    """The result's description of the model: its sizes and its parameter count (a tied weight once)."""
    from ..models import GPT, count_params
    with torch.device("meta"):
        params = count_params(GPT(cfg))
    return {"model": f"GPT {cfg.n_layer} x {cfg.n_embd}, sequence {cfg.block_size}", "n_layer": cfg.n_layer,
            "n_embd": cfg.n_embd, "seq": cfg.block_size, "params": params}


def model_state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages behind the model's parameters and gradients and the optimizer's parameters and
    state (a wrapped optimizer's too: ZeroOptimizer.optimizer, ZeroRedundancyOptimizer.optim); DTensors count their
    local shard."""
    tensors = []
    for p in model.parameters():
        tensors += [p, p.grad]
    for o in (opt, getattr(opt, "optimizer", None), getattr(opt, "optim", None)):
        if isinstance(o, torch.optim.Optimizer):
            tensors += [p for g in o.param_groups for p in g["params"]]
            tensors += [v for s in o.state.values() for v in s.values()]
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t = t.to_local() if hasattr(t, "to_local") else t
            storage = t.untyped_storage()
            seen[storage.data_ptr(), t.device] = storage.nbytes()
    return sum(seen.values())


def bench_all(world_size: int = 2, steps: int = 30, warmup: int = 5, *, n_layer: int | None = None,
              n_embd: int | None = None, seq: int | None = None, batch_size: int | None = None,
              progress=None) -> dict:
    """Every registered benchmark at one size, each with its own default options; {"rows": [...]} one row each."""
    shape = dict(n_layer=n_layer, n_embd=n_embd, seq=seq, batch_size=batch_size)
    for name in BENCHES:  # a shape some benchmark cannot take is refused before any runs
        check = functions(name)[2]
        if check is not None:
            check(world_size, **shape)
    prepare()
    rows = []
    for name, bench in BENCHES.items():
        if progress:
            progress(name)
        r = functions(name)[0](world_size, steps, warmup, **shape)
        rows.append({"bench": name, "technique": bench.technique, "reference": bench.reference,
                     "minidist_ms": r["minidist_s"] * 1e3, "reference_ms": r["reference_s"] * 1e3,
                     "ratio": r["ratio"], "world_size": world_size, "params": r["params"],
                     "model": r["model"], "steps": steps,
                     "others": {k[:-len("_ratio")]: v for k, v in r.items() if k.endswith("_ratio")},  # stage2...
                     **{k: r[k] for k in ("minidist_held_bytes", "reference_held_bytes") if k in r}})
    return {"rows": rows}


def format_all(result: dict) -> str:
    lines = [f"{'technique':<32}{'reference':<36}{'minidist ms':>12}{'ref. ms':>10}{'ratio':>7}{'ranks':>6}"
             f"{'params':>12}{'held MiB (ours / ref.)':>24}  other variants' ratios"]
    for r in result["rows"]:
        held = (f"{r['minidist_held_bytes'] / 2**20:.1f} / {r['reference_held_bytes'] / 2**20:.1f}"
                if "minidist_held_bytes" in r else "")
        lines.append(f"{r['technique']:<32}{r['reference']:<36}{r['minidist_ms']:12.1f}{r['reference_ms']:10.1f}"
                     f"{r['ratio']:7.3f}{r['world_size']:6d}{r['params']:12,d}{held:>24}  "
                     + ", ".join(f"{k} {v:.3f}" for k, v in r["others"].items()))
    return "\n".join(lines)
