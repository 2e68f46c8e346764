"""The example script's checks that need no rank: one line on stderr and exit code 2, before anything starts.

A configuration a rank refuses arrives as a RankError: seconds later (the ranks have started and built their
model), and 26-31 lines of traceback per failing rank ("4 heads are not divisible by tensor-parallel size 3"). What
can be known from the flags and the world size is checked here instead, in two places:

    parse()   flags that cannot take effect (a pipeline flag without --strategy pp, --chunks without the interleaved
              schedule, --dropout on tiny-llama, --offload-dir without --offload disk, ...), a model a strategy
              cannot train, a fault injected at a step the run never reaches, and tradeoffs.py's and
              fault_tolerance.py's own combinations
    main()    what needs the world size: a batch that does not split over the ranks, tensor-parallel sizes that do not
              divide the model's heads (the same check `serve --tp` makes), a pipeline schedule that cannot be built
              for these ranks and micro-batches (schedules are data: built here without processes), a mesh that
              does not fit (examples/parallel3d.py), --world-size given under torchrun

Only flags given on the command line count as given: a default never refuses a run.
"""
import argparse
import os
import sys

PROG = "python -m minidist.examples.train"
DATA_PARALLEL = ("ddp", "torch-ddp", "none", "zero1", "zero2", "zero3", "fsdp", "torch-fsdp")
ACTS_IN = {  # flag: the strategies in which it does something
    "sequence_parallel": ("tp",),
    "schedule": ("pp", "3d"), "microbatches": ("pp", "3d"), "n_layer": ("pp", "3d"), "chunks": ("pp",),
    "dp": ("3d",), "pp": ("3d",), "cp": ("3d",), "tp": ("3d",), "zero_stage": ("3d",), "ep": ("ep",),
    "model": (*DATA_PARALLEL, "tp", "pp", "3d"),   # ep trains the tiny Mixtral, whatever --model says
    "bucket_cap_mb": ("ddp", "torch-ddp", "zero1", "zero2"),
    "dropout": (*DATA_PARALLEL, "tp", "pp"),
    "monitor": (*DATA_PARALLEL, "tp", "pp"),
}
NEEDS = {  # flag: (another flag, the values of it under which the first one does something)
    "chunks": ("schedule", ("interleaved",)), "offload_dir": ("offload", ("disk",)),
    "topk_ratio": ("compress", ("topk",)), "powersgd_rank": ("compress", ("powersgd",)),
    "save_timeout": ("checkpoint_dir", None), "dropout": ("model", ("tiny-gpt",)),
}
MODELS_FOR = {"3d": ("tiny-gpt",)}  # strategies that train one model only (the others take --model)


class Refused(SystemExit):
    """A refused configuration: exit code 2 (argparse's for a usage error); str() is the message."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def refuse(message: str):
    """Print `message` as one line on stderr and raise Refused (SystemExit with code 2)."""
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    raise Refused(message)


def given_options(parser: argparse.ArgumentParser, argv, args: argparse.Namespace) -> set[str]:
    """The dests of the options given in `argv` (abbreviated or not), whatever their value: parsed once more into a
    namespace whose every attribute already holds a marker (argparse sets a default only where none is), so that
    what still holds it was not on the command line."""
    unset = object()
    marked = argparse.Namespace(**dict.fromkeys(vars(args), unset))
    parser.parse_args(argv, namespace=marked)
    return {dest for dest, value in vars(marked).items() if value is not unset}


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_flags(args, given: set[str]) -> str | None:
    """What is wrong with these flags whatever the world size (None: nothing)."""
    from minidist.examples import fault_tolerance, tradeoffs
    for dest in sorted(given):
        if dest in ACTS_IN and args.strategy not in ACTS_IN[dest]:
            return f"{flag(dest)} does nothing with --strategy {args.strategy} (it acts in: {', '.join(ACTS_IN[dest])})"
        if dest in NEEDS:
            other, values = NEEDS[dest]
            if getattr(args, other) is None or values is not None and getattr(args, other) not in values:
                wanted = f"{flag(other)} {' or '.join(values)}" if values else flag(other)
                return f"{flag(dest)} does nothing without {wanted}"
    if args.strategy in MODELS_FOR and args.model not in MODELS_FOR[args.strategy]:
        return (f"--strategy {args.strategy} trains {' or '.join(MODELS_FOR[args.strategy])} only, not --model "
                f"{args.model}")
    if "log_every" in given and args.quiet:
        return "--log-every does nothing with --quiet (nothing is logged)"
    for fault in ("fail_at_step", "hang_at_step"):
        if getattr(args, fault) is not None and getattr(args, fault) >= args.steps:
            return (f"{flag(fault)} {getattr(args, fault)} is never reached: the run has --steps {args.steps} "
                    f"(steps 0 to {args.steps - 1})")
    return tradeoffs.check(args) or fault_tolerance.check(args)


def check_world(args, world: int, models: dict) -> str | None:
    """What is wrong with these flags on `world` ranks (None: nothing). `models`: --model's name -> builder(args),
    built on the meta device to check its sizes (train.py passes its MODELS: this module never imports train)."""
    if "RANK" in os.environ and "world_size" in getattr(args, "given", ()):
        return f"--world-size does nothing under torchrun (its world is {world} ranks: --nnodes x --nproc_per_node)"
    if args.strategy in DATA_PARALLEL and args.batch_size % world:
        return f"--batch-size {args.batch_size} is not divisible by the world size {world}"
    if args.strategy == "tp":
        return _tensor_parallel(args, world, models)
    if args.strategy == "pp":
        return _pipeline(args, world)
    if args.strategy == "3d":
        from minidist.examples import parallel3d
        return "; ".join(parallel3d.problems(args, world)) or None
    if args.strategy == "ep":
        from minidist.examples import moe
        return "; ".join(moe.problems(args, world)) or None
    return None


def _tensor_parallel(args, world: int, models: dict) -> str | None:
    import torch
    from minidist.tensor_parallel import GPT_PLAN, LLAMA_PLAN
    from minidist.tensor_parallel.plans import check_sizes, match_plan
    if args.sequence_parallel and args.block_size % world:
        return f"--sequence-parallel cuts --block-size {args.block_size} over {world} ranks: not divisible"
    with torch.device("meta"):
        model = models[args.model](args)
    try:
        for name, style in match_plan(model, LLAMA_PLAN if args.model == "tiny-llama" else GPT_PLAN).items():
            check_sizes(name, model.get_submodule(name), style, world)
    except ValueError as e:
        return f"--model {args.model} on {world} tensor-parallel ranks: {e}"
    return None


def _pipeline(args, world: int) -> str | None:
    from minidist.pipeline.schedule import build
    from minidist.pipeline.stages import partition
    v = args.chunks if args.schedule == "interleaved" else 1
    if args.batch_size % args.microbatches:
        return f"--batch-size {args.batch_size} does not cut into --microbatches {args.microbatches}"
    try:
        build(args.schedule, world, args.microbatches, v)
        partition(args.n_layer or max(2, world * v), world * v)
    except ValueError as e:
        return f"--strategy pp --schedule {args.schedule} on {world} ranks: {e}"
    return None
