"""Command line: `python -m minidist tour | memory | plan | bench | grade | serve | diagnose`
(see `python -m minidist -h`)."""
import argparse
import json
import sys

from .args import fraction, nonnegative_float, nonnegative_int, positive_float, positive_int


def _tour(args) -> int:
    from .tour import format_rows, run_tour
    report = run_tour(args.world_size, progress=not args.quiet, backend=args.backend, only=args.only)
    if not report["rows"]:
        raise ValueError(f"no tour row's technique contains {args.only!r}")
    print(format_rows(report["rows"]))
    failed = [r["technique"] for r in report["rows"] if not r["passed"]]
    print(f"\n{len(report['rows']) - len(failed)} of {len(report['rows'])} checks passed on {args.world_size} ranks"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    _write_json(args.json, report)
    return 1 if failed else 0


def _memory(args) -> int:
    from .memory import format_zero_table, zero_table
    params = args.params
    if args.model:
        from .models import count_params, on_meta
        params = count_params(on_meta(args.model))
    if params is None:
        raise SystemExit("memory: give --params N or --model NAME")
    table = zero_table(params, args.world_size, args.precision)  # validates the input
    print(format_zero_table(params, args.world_size, args.precision))
    _write_json(args.json, {"params": params, "world_size": args.world_size, "precision": args.precision,
                            "stages": {str(s): b.total for s, b in table.items()}})
    return 0


def _plan(args) -> int:
    from dataclasses import replace
    from .planner import SHAPES, Cluster, as_json, format_plans, plan, shape_for
    if args.experts or args.top_k or args.model in ("mixtral-8x7b", "deepseek-v3"):
        from dataclasses import asdict
        from .moe.planning import run_plan
        plans, text = run_plan(args, Cluster(args.gpus, args.gpu_memory_gb, args.gpus_per_node, args.tflops, args.mfu,
                                             args.intra_node_gbps, args.inter_node_gbps, args.alpha_us,
                                             args.reserve_gb))
        print(text)
        _write_json(args.json, {"plans": [asdict(p) for p in plans]})
        return 0
    if args.params is None and args.model is None:
        raise ValueError("give --params P, or --model NAME (or both: --params overrides the model's count)")
    shape = SHAPES[args.model] if args.model else shape_for(args.params, args.seq or 2048)
    shape = replace(shape, seq=args.seq) if args.seq else shape
    params = args.params or shape.params()
    cluster = Cluster(args.gpus, args.gpu_memory_gb, args.gpus_per_node, args.tflops, args.mfu, args.intra_node_gbps,
                      args.inter_node_gbps, args.alpha_us, args.reserve_gb)
    plans = plan(params, cluster, shape, args.global_batch, args.top)
    print(f"{params:.4g} parameters ({args.model or 'GPT-3-like shape'}: {shape.layers} layers, hidden "
          f"{shape.hidden}, sequence {shape.seq}) on {args.gpus} GPUs of {args.gpu_memory_gb:g} GB, "
          f"{args.gpus_per_node} per node, global batch {args.global_batch} sequences; best first:")
    print(format_plans(plans))
    _write_json(args.json, as_json(plans))
    return 0


PLAN_COLUMNS = """columns: dp pp v tp cp = data-parallel replicas, pipeline stages, interleaved chunks per stage,
tensor- and context-parallel ranks; zero = ZeRO stage on dp x cp; m = micro-batches per replica and step; b = sequences
per micro-batch (dp x m x b = --global-batch); ckpt = activation checkpointing; GB/GPU = predicted memory of the fullest
GPU; step s = predicted seconds per step; comm = share of the step spent in communication the computation does not
hide; bubble = share idle in the pipeline bubble; TFLOP/s = model FLOPs per GPU, (6 P + 6 L s h) per token."""


class _PlanHelp(argparse.RawDescriptionHelpFormatter):
    """plan --help: every default shown (flags without one say what happens), the columns' description as written."""

    def _get_help_string(self, action):
        if action.default in (None, argparse.SUPPRESS) or "%(default)" in action.help:
            return action.help
        return f"{action.help} (default: %(default)s)"


class _BenchNames:
    """bench's choices: "all", the GPT benchmarks registered in bench/suite.py, and the others. Read when a bench
    command is parsed, not when the parser is built: the registry's package imports the techniques."""

    def names(self) -> list[str]:
        from .bench.suite import BENCHES
        return ["all", *BENCHES, *OTHER_BENCHES]

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, name) -> bool:
        return name in self.names()


OTHER_BENCHES = ("buckets", "serve", "flight")  # no GPT against a reference: no shape flags, not in `bench all`
SHAPE_FLAGS = {"n_layer": "--n-layer", "n_embd": "--n-embd", "seq": "--seq", "batch_size": "--batch-size"}


def _bench(args) -> int:
    from . import bench
    from .bench.suite import BENCHES, bench_all, format_all, functions
    shape = {key: getattr(args, key) for key in SHAPE_FLAGS}
    if args.what == "all":
        result = bench_all(args.world_size, args.steps, args.warmup, **shape,
                           progress=lambda name: print(f"bench all: {name} ...", file=sys.stderr, flush=True))
        print(format_all(result))
    elif args.what in BENCHES:
        run, fmt, _ = functions(args.what)
        result = run(args.world_size, args.steps, args.warmup, **shape,
                     **{option: getattr(args, option) for option in BENCHES[args.what].options})
        print(fmt(result))
    else:
        given = [flag for key, flag in SHAPE_FLAGS.items() if shape[key] is not None]
        if given:
            raise ValueError(f"{', '.join(given)} sets the GPT of the benchmarks {', '.join(['all', *BENCHES])}; "
                             f"bench {args.what} does not train one")
        runs = {
            "buckets": lambda: bench.bench_buckets(args.world_size, tuple(args.caps), args.alpha, args.bandwidth,
                                                   args.steps),
            "flight": lambda: bench.bench_flight(args.world_size, args.steps, args.warmup,
                                                 **({} if args.bucket_cap_mb is None else
                                                    {"bucket_cap_mb": args.bucket_cap_mb})),
            "serve": lambda: bench.bench_serve(args.world_size, args.requests, args.utilization, args.slots,
                                               args.pattern, args.repeats, rate=args.rate),
        }
        result = runs[args.what]()
        print(getattr(bench, f"format_{args.what}")(result))
    _write_json(args.json, result)
    return 0


def _grade(args) -> int:
    from .exercises import ROOT
    from .grading import format_grades, grade
    path = ROOT / "solutions" if args.solutions else (args.path or ROOT / "exercises")
    report = grade(path, args.only, args.extra_tests, args.timeout, args.first_failure)
    print(format_grades(report))
    _write_json(args.json, report)
    return 0


def _diagnose(args) -> int:
    from .comm.diagnose import diagnose_directory
    print(diagnose_directory(args.directory))
    return 0


def _write_json(path, obj) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minidist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tour = sub.add_parser("tour", help="run every technique on N simulated ranks against its reference")
    tour.add_argument("--world-size", type=positive_int, default=4)
    tour.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    tour.add_argument("--quiet", action="store_true", help="no progress bar")
    tour.add_argument("--only", metavar="TEXT", help="run only the rows whose technique contains TEXT (any case)")
    tour.add_argument("--backend", choices=["gloo", "nccl"], default="gloo",
                      help="gloo: CPU processes (default); nccl: one rank per GPU (make gpu-check)")
    tour.set_defaults(run=_tour)

    mem = sub.add_parser("memory", help="per-rank model-state memory under ZeRO stages 0-3")
    what = mem.add_mutually_exclusive_group()
    what.add_argument("--params", type=positive_float, help="number of parameters, e.g. 7.5e9")
    what.add_argument("--model", help="count the parameters of a model: tiny-gpt, tiny-llama, gpt2-124m, llama-7b")
    mem.add_argument("--world-size", type=positive_int, default=1)
    mem.add_argument("--precision", choices=["mixed", "fp32"], default="mixed")
    mem.add_argument("--json", metavar="PATH")
    mem.set_defaults(run=_memory)

    pl = sub.add_parser("plan", help="choose dp, pp, tp, cp, ZeRO stage, micro-batches and checkpointing for a model "
                                     "and cluster from minidist's memory and cost models",
                        description="The plans that fit in memory, fastest first, by minidist's models of memory\n"
                                    "and step time (minidist/planner.py explains every term). GB = 1e9 bytes.",
                        epilog=PLAN_COLUMNS, formatter_class=_PlanHelp)
    pl.add_argument("--params", type=positive_float,
                    help="number of parameters, e.g. 175e9 (with --model: replaces the count of its shape)")
    pl.add_argument("--model", choices=["gpt3-175b", "llama3-8b", "llama3-70b", "llama3-405b", "mixtral-8x7b",
                                        "deepseek-v3"],
                    help="the model's shape (layers, hidden, heads, vocabulary, sequence); without it a GPT-3-like "
                         "shape for --params. mixtral-8x7b and deepseek-v3 are mixtures of experts (an ep axis "
                         "inside dp; minidist/moe/planning.py)")
    pl.add_argument("--experts", type=positive_int, help="a mixture of experts: experts per layer (with --model: "
                                                          "a dense model's MLP becomes E experts)")
    pl.add_argument("--top-k", type=positive_int, help="a mixture of experts: experts per token (default 2)")
    pl.add_argument("--gpus", type=positive_int, required=True, help="GPUs in all (whole nodes)")
    pl.add_argument("--gpu-memory-gb", type=positive_float, required=True,
                    help="memory per GPU in GB of 1e9 bytes (an '80 GB' H100 holds about 85.5)")
    pl.add_argument("--seq", type=positive_int, help="sequence length (default: the model's, or 2048)")
    pl.add_argument("--global-batch", type=positive_int, default=1024, help="sequences per optimizer step")
    pl.add_argument("--gpus-per-node", type=positive_int, default=8, help="GPUs per node (tp stays inside one)")
    pl.add_argument("--tflops", type=positive_float, default=989.0, help="peak 16-bit TFLOP/s per GPU")
    pl.add_argument("--mfu", type=fraction, default=0.5, help="fraction of the peak the matmuls reach, in (0, 1]")
    pl.add_argument("--intra-node-gbps", type=positive_float, default=450.0,
                    help="GB/s per GPU inside a node, one direction")
    pl.add_argument("--inter-node-gbps", type=positive_float, default=50.0, help="GB/s per GPU between nodes")
    pl.add_argument("--alpha-us", type=nonnegative_float, default=5.0, help="latency per message (microseconds)")
    pl.add_argument("--reserve-gb", type=nonnegative_float, default=4.0,
                    help="memory per GPU kept for the CUDA context, buffers and fragmentation (GB)")
    pl.add_argument("--top", type=positive_int, default=10, help="how many plans to print")
    pl.add_argument("--json", metavar="PATH", help='also write {"plans": [...]}, best first')
    pl.set_defaults(run=_plan)

    bench = sub.add_parser("bench", help="time a technique side by side with its reference")
    bench.add_argument("what", choices=_BenchNames(), metavar="{all,ddp,tp,pp,zero,fsdp,moe,...,buckets,serve,flight}",
                       help="all: every benchmark of a GPT against its reference (ddp, tp, pp, zero, fsdp, moe and any "
                            "registered in minidist/bench/suite.py), one row each; ddp: DataParallel against torch "
                            "DDP; buckets: step time across bucket sizes over a "
                            "simulated link, measured and predicted by the cost model; tp: parallelize against DTensor "
                            "tensor parallel; pp: the 1F1B pipeline against torch's Schedule1F1B; zero: ZeroOptimizer "
                            "against DDP + ZeroRedundancyOptimizer; fsdp: fully_shard against FSDP2's; serve: "
                            "round-robin against least-outstanding-tokens routing over --world-size replicas; "
                            "flight: the flight recorder's cost per data-parallel step; moe: a GPT whose MLPs are MoE "
                            "layers, expert_parallel against DeepSpeed's MoE layers and without EP")
    bench.add_argument("--world-size", type=positive_int, default=2)
    bench.add_argument("--steps", type=positive_int, default=30, help="timed steps (after warm-up)")
    bench.add_argument("--warmup", type=nonnegative_int, default=5)
    bench.add_argument("--n-layer", type=positive_int, help="the GPT's blocks (default: the tiny GPT's 2; pp: 4)")
    bench.add_argument("--n-embd", type=positive_int, help="the GPT's width, a multiple of its 4 heads (default 64)")
    bench.add_argument("--seq", type=positive_int, help="the GPT's sequence length (default 64)")
    bench.add_argument("--batch-size", type=positive_int,
                       help="sequences per rank (ddp, zero, fsdp, moe: default 16) or per step (tp: 8, pp: 16)")
    bench.add_argument("--bucket-cap-mb", type=positive_float, default=None,
                       help="ddp, flight: the bucket size in MiB (ddp: half the gradients, at most 25; flight: 0.25)")
    bench.add_argument("--caps", type=positive_float, nargs="+", default=[0.02, 0.1, 0.3, 1.0],
                       help="buckets: bucket sizes to sweep (MiB)")
    bench.add_argument("--alpha", type=nonnegative_float, default=1e-3,
                       help="buckets: simulated latency per message (s)")
    bench.add_argument("--bandwidth", type=positive_float, default=50e6, help="buckets: simulated bandwidth (bytes/s)")
    bench.add_argument("--sequence-parallel", action="store_true", help="tp: with sequence parallelism")
    bench.add_argument("--microbatches", type=positive_int, default=4, help="pp: micro-batches per step")
    bench.add_argument("--schedule", choices=["1f1b", "zbv", "dualpipev"], default="1f1b",
                       help="pp: the schedule, against torch's Schedule1F1B, ScheduleZBVZeroBubble, ScheduleDualPipeV")
    bench.add_argument("--requests", type=positive_int, default=160, help="serve: requests in the load")
    bench.add_argument("--utilization", type=positive_float, default=0.9,
                       help="serve: the load as a share of the measured capacity (sets the arrival rate)")
    bench.add_argument("--rate", type=positive_float, default=None, help="serve: Poisson arrivals per second instead")
    bench.add_argument("--slots", type=positive_int, default=4, help="serve: KV-cache slots per replica")
    bench.add_argument("--pattern", choices=["alternating", "iid"], default="alternating",
                       help="serve: short and long requests in turn, or lengths drawn at random")
    bench.add_argument("--repeats", type=positive_int, default=3, help="serve: rounds per balancer (medians)")
    bench.add_argument("--json", metavar="PATH", help='also write the result as JSON (all: {"rows": [...]})')
    bench.set_defaults(run=_bench)

    grade = sub.add_parser("grade", help="grade exercises with the tests that check minidist")
    where = grade.add_mutually_exclusive_group()
    where.add_argument("path", nargs="?", help="folder with the chNN_*.py exercise files (default: exercises/)")
    where.add_argument("--solutions", action="store_true", help="grade solutions/ (full marks expected)")
    grade.add_argument("--only", nargs="+", metavar="NAME", help="grade only these exercises")
    grade.add_argument("--extra-tests", metavar="DIR", help="also run an instructor's private tests from DIR")
    grade.add_argument("--timeout", type=positive_int, default=60, help="seconds per test before it counts as failed")
    grade.add_argument("--first-failure", action="store_true",
                       help="stop grading an exercise at its first failed test (the rest count as failed)")
    grade.add_argument("--json", metavar="PATH")
    grade.set_defaults(run=_grade)

    from .serving.app import add_parser as add_serve_parser
    add_serve_parser(sub)  # serve: the HTTP endpoint of chapter 12

    diag = sub.add_parser("diagnose", help="why ranks hung: analyse the flight records a torchrun job left in DIR")
    diag.add_argument("directory", metavar="DIR", help="the job's $MINIDIST_FLIGHT_DIR (printed by a failing rank)")
    diag.set_defaults(run=_diagnose)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as e:  # bad input: a clear message, not a traceback
        parser.exit(2, f"{parser.prog} {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
