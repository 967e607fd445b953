"""``branchgrpo bench``'s command line: its arguments and the checks before anything trains.

Every method's settings and files are validated first (one line per problem, naming the method);
then :func:`branchgrpo.bench.run_bench` trains, or ``--combine`` pools finished benches
(:mod:`branchgrpo.bench_combine`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from branchgrpo.cli import CliError
from branchgrpo.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The bench's arguments, for the ``bench`` subcommand."""
    p.add_argument("--config", help="YAML config (default: the digits world on this machine)")
    p.add_argument("--methods", help="comma-separated presets (default: the seven Table-1 methods)")
    p.add_argument("--iterations", type=int, default=16,
                   help="interleaved iterations per method (default 16: about 14 minutes on a quiet 2-core CPU)")
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--equal-time", action="store_true",
                   help="after --iterations, keep cheaper methods training up to dancegrpo's training seconds")
    p.add_argument("--seeds", type=int, default=1,
                   help="runs per method (run.seed, run.seed+1, ...), all interleaved; bench.md adds mean and 95%% "
                        "interval over seeds of reward at equal wall-clock, seconds to dancegrpo's final reward, "
                        "reward AUC and end diversity")
    p.add_argument("--seconds", type=float, default=0.0,
                   help="after --iterations, keep every run training up to this many training seconds (0: off)")
    p.add_argument("--tuned", metavar="BEST_JSON",
                   help="per-method overrides (e.g. learning rate, updates per iteration) from benchmarks/sweep.py's "
                        "best.json, applied after the shared ones")
    p.add_argument("--variants", metavar="YAML",
                   help="named variants of presets, LABEL: {preset: NAME, overrides: [key=value, ...]}; --methods "
                        "may name them (e.g. one preset with and without a KL term)")
    p.add_argument("--combine", nargs="+", metavar="DIR",
                   help="train nothing: pool the seeds of finished bench folders (same methods and settings, "
                        "disjoint seeds) into one learning-efficiency table in --out")
    p.add_argument("--reference", metavar="METHOD",
                   help="with --combine: pair every method with METHOD instead of the benches' reference (e.g. "
                        "branchgrpo-mix against mixgrpo in a bench run against dancegrpo); one folder is enough")
    p.add_argument("--out", default="runs/bench", help="output folder")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every method")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    """Run (or ``--combine``) the bench described by parsed :func:`add_arguments` arguments; prints bench.md."""
    from branchgrpo.bench_runs import read_tuned, read_variants, resolve_runs
    from branchgrpo.tree.presets import TABLE1_PRESETS, list_presets

    if args.combine:
        from branchgrpo.bench_combine import CombineError, combine_benches

        try:
            combine_benches(args.combine, args.out, reference=args.reference)
        except CombineError as err:
            raise CliError(f"--combine: {err}") from None
        print((Path(args.out) / "bench.md").read_text())
        return 0
    if args.reference:
        raise CliError("--reference: only with --combine (a bench pairs with dancegrpo when it runs, else with its "
                       "first method; re-pair its folder afterwards with --combine DIR --reference METHOD)")
    if args.iterations < 1 or args.eval_every < 1:
        raise CliError("--iterations and --eval-every must be >= 1")
    if args.seeds < 1:
        raise CliError(f"--seeds: must be >= 1, got {args.seeds}")
    if not args.seconds >= 0:
        raise CliError(f"--seconds: must be >= 0, got {args.seconds}")
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(TABLE1_PRESETS)
    named = read_variants(args.variants) if args.variants else {}
    unknown = [m for m in methods if m not in list_presets() and m not in named]
    if unknown:
        raise CliError(f"--methods: unknown preset(s) {', '.join(unknown)}; available: {', '.join(list_presets())}"
                       + (f", and from --variants: {', '.join(named)}" if named else ""))
    if len(set(methods)) != len(methods):
        raise CliError(f"--methods: a method is named twice in {args.methods}")
    runs = resolve_runs(methods, read_tuned(args.tuned) if args.tuned else {}, named)
    from branchgrpo.train.components import validate_job
    from branchgrpo.train.config import load_train_config

    for label, (preset, extra) in runs.items():  # every run's settings and files before anything trains
        try:
            validate_job(load_train_config(args.config, preset, [f"run.output_dir={args.out}", *args.overrides, *extra]))
        except ConfigError as err:
            raise CliError(f"method {label}: {err}") from None
    from branchgrpo.bench import run_bench
    variants = runs if args.tuned or named else None  # None: plain presets, no per-method overrides recorded
    result = run_bench(methods, args.iterations, args.eval_every, Path(args.out), args.config, args.overrides,
                       equal_time=args.equal_time, seeds=args.seeds, seconds=args.seconds, variants=variants)
    print((Path(args.out) / "bench.md").read_text())
    return 0 if result["rows"] else 1
