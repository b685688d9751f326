"""The `sparsegrow` command: train a config, turn runs into tables.

    sparsegrow train CONFIG [key=value ...] [--run-dir DIR] [--resume] [--no-progress]
    sparsegrow sweep SWEEP [key=value ...] [--smoke] [--dry-run]
    sparsegrow report RUNS... [--per-run | --thesis] [--out FILE]
    sparsegrow plot {density,accuracy,density-acc,time,acc-vs-k,recall} RUNS... --out FILE.png
    sparsegrow export RUN_DIR --out FILE
    sparsegrow list
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_train(args) -> int:
    from .config import load_config
    from .loop import train

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else Path(cfg.output.dir) / cfg.run_name()
    summary = train(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
    print(f"{cfg.run_name()}: test accuracy {100 * summary['test_acc']:.2f}%  "
          f"density {summary['density']:.4f}  train time {summary['train_time_s']:.1f}s  "
          f"update time {summary['update_time_s']:.2f}s  -> {run_dir}")
    return 0


def _cmd_sweep(args) -> int:
    from .sweep import run_sweep

    summaries = run_sweep(args.sweep, smoke=args.smoke, extra=args.overrides,
                          progress=not args.no_progress, dry_run=args.dry_run, rows=args.rows)
    if summaries:
        print(f"{len(summaries)} runs finished; tabulate with: sparsegrow report <output folder>")
    return 0


def _cmd_report(args) -> int:
    from .report import grouped_table, runs_table
    from .results import find_runs, load_run

    runs = [load_run(d) for d in find_runs(args.runs)]
    if not runs:
        raise FileNotFoundError(f"no finished runs (summary.json) under {' '.join(args.runs)}")
    if args.thesis:
        from .thesis import thesis_report

        text = thesis_report(runs)
    else:
        text = runs_table(runs) if args.per_run else grouped_table(runs)
    if args.out:
        Path(args.out).write_text(text)
    print(text, end="")
    return 0


def _cmd_plot(args) -> int:
    from . import thesis  # noqa: F401  registers the plots acc-vs-k and recall
    from .plots import PLOTS
    from .results import find_runs, load_run

    runs = [load_run(d) for d in find_runs(args.runs)]
    if not runs:
        raise FileNotFoundError(f"no finished runs (summary.json) under {' '.join(args.runs)}")
    PLOTS[args.kind](runs, Path(args.out))
    print(f"wrote {args.out}")
    return 0


def _cmd_export(args) -> int:
    from .export import export_run

    info = export_run(args.run_dir, args.out)
    print(f"wrote {args.out}: {info['bytes']} bytes ({info['bytes'] / info['dense_bytes']:.3f} of "
          f"the dense state_dict's {info['dense_bytes']}), {info['nnz']} of {info['numel']} "
          "sparse weights active")
    return 0


def _cmd_list(args) -> int:
    import sparsegrow
    from .data import DATASETS
    from .models import MODELS

    for title, reg in [("methods", sparsegrow.METHODS), ("distributions", sparsegrow.DISTRIBUTIONS),
                       ("drop criteria", sparsegrow.DROP), ("grow criteria", sparsegrow.GROW),
                       ("storages", sparsegrow.STORAGES), ("models", MODELS), ("datasets", DATASETS)]:
        print(f"{title}:")
        for name, desc in reg.describe().items():
            print(f"  {name:14s} {desc}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsegrow", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one run from a YAML config")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sparsity.density=0.05")
    t.add_argument("--run-dir", help="default: <output.dir>/<run name>")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run (or skip a finished one)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_train)
    sw = sub.add_parser("sweep", help="run a grid of configs x seeds (resumable)")
    sw.add_argument("sweep", help="sweep YAML file")
    sw.add_argument("overrides", nargs="*", help="overrides applied to every run")
    sw.add_argument("--smoke", action="store_true", help="CI-sized runs (the sweep's `smoke:` overrides)")
    sw.add_argument("--dry-run", action="store_true", help="list the runs without training")
    sw.add_argument("--rows", nargs="+", metavar="LABEL",
                    help="only these rows (e.g. to split a sweep across processes or machines)")
    sw.add_argument("--no-progress", action="store_true", help="no progress bars")
    sw.set_defaults(func=_cmd_sweep)
    r = sub.add_parser("report", help="markdown table of finished runs")
    r.add_argument("runs", nargs="+", help="run directories or folders holding runs")
    r.add_argument("--per-run", action="store_true", help="one row per run instead of mean ± std over seeds")
    r.add_argument("--thesis", action="store_true", help="the thesis's table columns (docs/thesis.md)")
    r.add_argument("--out", help="also write the table to this file")
    r.set_defaults(func=_cmd_report)
    pl = sub.add_parser("plot", help="plot finished runs to a PNG")
    pl.add_argument("kind", choices=["density", "accuracy", "density-acc", "time", "acc-vs-k", "recall"])
    pl.add_argument("runs", nargs="+", help="run directories or folders holding runs")
    pl.add_argument("--out", required=True, help="output PNG")
    pl.set_defaults(func=_cmd_plot)
    ex = sub.add_parser("export", help="a run's model as a compact safetensors file (values + indices)")
    ex.add_argument("run_dir", help="run directory holding config.yaml and checkpoint.pt")
    ex.add_argument("--out", required=True, help="output file, e.g. model.safetensors")
    ex.set_defaults(func=_cmd_export)
    ls = sub.add_parser("list", help="registered methods, distributions, criteria, models, data sets")
    ls.set_defaults(func=_cmd_list)
    return p


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    from .config import ConfigError
    from .data import DatasetMissingError

    try:
        return args.func(args)
    except (ConfigError, DatasetMissingError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"sparsegrow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparsegrow: interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
