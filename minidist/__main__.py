"""Command line: `python -m minidist tour | memory | bench | grade` (see `python -m minidist -h`)."""
import argparse
import json
import sys


def _tour(args) -> int:
    from .tour import format_rows, run_tour
    report = run_tour(args.world_size, progress=not args.quiet)
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


def _bench(args) -> int:
    from .bench import bench_ddp, bench_sharded, format_ddp, format_sharded
    if args.what in ("zero", "fsdp"):
        result = bench_sharded(args.what, args.world_size, args.steps, args.warmup)
        print(format_sharded(result))
    else:
        result = bench_ddp(args.world_size, args.steps, args.warmup, args.bucket_cap_mb)
        print(format_ddp(result))
    _write_json(args.json, result)
    return 0


def _grade(args) -> int:
    from .exercises import ROOT
    from .grading import format_grades, grade
    path = ROOT / "solutions" if args.solutions else (args.path or ROOT / "exercises")
    report = grade(path, args.only, args.extra_tests, args.timeout)
    print(format_grades(report))
    _write_json(args.json, report)
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
    tour.add_argument("--world-size", type=int, default=4)
    tour.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    tour.add_argument("--quiet", action="store_true", help="no progress bar")
    tour.set_defaults(run=_tour)

    mem = sub.add_parser("memory", help="per-rank model-state memory under ZeRO stages 0-3")
    what = mem.add_mutually_exclusive_group()
    what.add_argument("--params", type=float, help="number of parameters, e.g. 7.5e9")
    what.add_argument("--model", help="count the parameters of a model: tiny-gpt, tiny-llama, gpt2-124m, llama-7b")
    mem.add_argument("--world-size", type=int, default=1)
    mem.add_argument("--precision", choices=["mixed", "fp32"], default="mixed")
    mem.add_argument("--json", metavar="PATH")
    mem.set_defaults(run=_memory)

    bench = sub.add_parser("bench", help="time a technique side by side with its reference")
    bench.add_argument("what", choices=["ddp", "zero", "fsdp"],
                       help="ddp: DataParallel against torch DDP; zero: ZeroOptimizer against ZeroRedundancyOptimizer; "
                            "fsdp: fully_shard against FSDP2")
    bench.add_argument("--world-size", type=int, default=2)
    bench.add_argument("--steps", type=int, default=30, help="timed steps (after warm-up)")
    bench.add_argument("--warmup", type=int, default=5)
    bench.add_argument("--bucket-cap-mb", type=float, default=0.25, help="the same bucket size for both")
    bench.add_argument("--json", metavar="PATH")
    bench.set_defaults(run=_bench)

    grade = sub.add_parser("grade", help="grade exercises with the tests that check minidist")
    where = grade.add_mutually_exclusive_group()
    where.add_argument("path", nargs="?", help="folder with the chNN_*.py exercise files (default: exercises/)")
    where.add_argument("--solutions", action="store_true", help="grade solutions/ (full marks expected)")
    grade.add_argument("--only", nargs="+", metavar="NAME", help="grade only these exercises")
    grade.add_argument("--extra-tests", metavar="DIR", help="also run an instructor's private tests from DIR")
    grade.add_argument("--timeout", type=int, default=60, help="seconds per test before it counts as failed")
    grade.add_argument("--json", metavar="PATH")
    grade.set_defaults(run=_grade)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as e:  # bad input: a clear message, not a traceback
        parser.exit(2, f"{parser.prog} {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
