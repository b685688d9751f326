"""The `sparsegrow` command: train a config, turn runs into tables.

    sparsegrow train CONFIG [key=value ...] [--run-dir DIR] [--resume] [--no-progress]
    sparsegrow train --resume --run-dir DIR [key=value ...]      (the run's config.yaml)
    sparsegrow train CONFIG --nproc N ...    (= torchrun --nproc_per_node N -m sparsegrow train ...)
    sparsegrow sweep SWEEP [key=value ...] [--smoke] [--dry-run] [--jobs N] [--seeds S..] [--rows L..]
    sparsegrow report RUNS... [--per-run | --thesis | --ci] [--out FILE]
    sparsegrow plot KIND RUNS... --out FILE.png   (KIND: `sparsegrow plot --help`)
    sparsegrow export RUN_DIR --out FILE
    sparsegrow list
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _cmd_train(args) -> int:
    from .config import ConfigError, load_config
    from .loop import read_run_config, train

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).is_file():
        config, overrides = None, [config, *overrides]  # no CONFIG: the first word is an override
    if config is None:  # continue a run from the config it was started with
        if not (args.resume and args.run_dir):
            raise ConfigError("train needs a CONFIG file, or --resume --run-dir DIR to continue the "
                              "run in DIR with its own config.yaml")
        if read_run_config(args.run_dir) is None:
            raise ConfigError(f"--resume: {str(Path(args.run_dir) / 'config.yaml')!r} not found; "
                              "give the CONFIG the run was started with")
        config = Path(args.run_dir) / "config.yaml"
    cfg = load_config(config, overrides)
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from .launch import relaunch

        # the same command line on N processes, through torch's own launcher (torchrun)
        return relaunch(args.nproc, [a for a in _argv_without_nproc(args.argv)])
    run_dir = Path(args.run_dir) if args.run_dir else Path(cfg.output.dir) / cfg.run_name()
    summary = train(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports
    print(f"{cfg.run_name()}: test accuracy {100 * summary['test_acc']:.2f}%  "
          f"density {summary['density']:.4f}  train time {summary['train_time_s']:.1f}s  "
          f"update time {summary['update_time_s']:.2f}s  -> {run_dir}")
    return 0


def _argv_without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _cmd_sweep(args) -> int:
    from .sweep import run_sweep

    summaries = run_sweep(args.sweep, smoke=args.smoke, extra=args.overrides,
                          progress=not args.no_progress, dry_run=args.dry_run, rows=args.rows,
                          seeds=args.seeds, jobs=args.jobs)
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
        text = runs_table(runs) if args.per_run else grouped_table(runs, ci=args.ci, paired=args.paired,
                                                                  itop=args.itop)
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
    from .config import RESUMABLE_KEYS

    p = argparse.ArgumentParser(prog="sparsegrow", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one run from a YAML config")
    t.add_argument("config", nargs="?", help="YAML config file (with --resume --run-dir: default "
                   "the run's config.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sparsity.density=0.05, "
                   "anywhere on the line")
    t.add_argument("--run-dir", help="default: <output.dir>/<run name>")
    t.add_argument("--resume", action="store_true",
                   help="continue the run from its checkpoint (or keep it if finished); of the "
                   f"config only {', '.join(RESUMABLE_KEYS)} may change")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--nproc", type=int, metavar="N",
                   help="data-parallel on N local processes (torchrun; gloo on CPU, nccl on CUDA); "
                   "train.batch_size is the global batch")
    t.set_defaults(func=_cmd_train)
    sw = sub.add_parser("sweep", help="run a grid of configs x seeds (resumable)")
    sw.add_argument("sweep", help="sweep YAML file")
    sw.add_argument("overrides", nargs="*", help="overrides applied to every run")
    sw.add_argument("--smoke", action="store_true", help="CI-sized runs (the sweep's `smoke:` overrides)")
    sw.add_argument("--dry-run", action="store_true", help="list the runs without training")
    sw.add_argument("--rows", nargs="+", metavar="LABEL",
                    help="only these rows (e.g. to split a sweep across processes or machines); "
                    "takes every word after it, so put overrides before it")
    sw.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="only these seeds")
    sw.add_argument("--jobs", type=int, default=1, metavar="N",
                    help="train N runs at once, one process each (set train.threads so that "
                    "N x threads fits the cores)")
    sw.add_argument("--no-progress", action="store_true", help="no progress bars")
    sw.set_defaults(func=_cmd_sweep)
    r = sub.add_parser("report", help="markdown table of finished runs")
    r.add_argument("runs", nargs="+", help="run directories or folders holding runs")
    r.add_argument("--per-run", action="store_true", help="one row per run instead of mean ± std over seeds")
    r.add_argument("--thesis", action="store_true", help="the thesis's table columns (docs/thesis.md)")
    r.add_argument("--ci", action="store_true",
                   help="add the 95%% confidence interval of the mean test accuracy (t over seeds)")
    r.add_argument("--itop", action="store_true",
                   help="add the final ITOP rate (share of all connections ever active)")
    r.add_argument("--paired", metavar="METHOD",
                   help="add each row's accuracy difference to the row of METHOD (its report label, "
                   "e.g. set or static) at the same density, paired by seed, with a 95%% CI")
    r.add_argument("--out", help="also write the table to this file")
    r.set_defaults(func=_cmd_report)
    pl = sub.add_parser("plot", help="plot finished runs to a PNG")
    pl.add_argument("kind", choices=["density", "loss", "accuracy", "itop", "layer-density", "churn",
                                     "density-acc", "time", "acc-vs-k", "recall"],
                    help="what to draw (experiments/plots.py and thesis.py say what each shows)")
    pl.add_argument("runs", nargs="+", help="run directories or folders holding runs")
    pl.add_argument("--out", required=True, help="output PNG")
    pl.set_defaults(func=_cmd_plot)
    ex = sub.add_parser("export", help="a run's model as a compact safetensors file (values + indices)")
    ex.add_argument("run_dir", help="run directory holding config.yaml and checkpoint.pt")
    ex.add_argument("--out", required=True, help="output file, e.g. model.safetensors")
    ex.set_defaults(func=_cmd_export)
    ls = sub.add_parser("list", help="registered methods, distributions, criteria, models, data sets")
    ls.set_defaults(func=_cmd_list)
    p.commands = sub.choices  # command name -> its parser, for parse_args
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The command line as a Namespace; `key=value` overrides may come anywhere after the command.

    argparse cannot parse intermixed options and positionals through subparsers, so the top
    level only finds the command, and the command's own parser reads the rest intermixed.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser()
    if argv and argv[0] in parser.commands:
        args = parser.commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command, args.argv = argv[0], argv
        return args
    return parser.parse_args(argv)  # help, or the error for an unknown command


def main(argv=None) -> int:
    # torch's CPU allocator asks for transparent huge pages on allocations of >= 2 MiB when
    # THP_MEM_ALLOC_ENABLE=1 is set before the process's first allocation (read once). The truly
    # sparse kernels gather one random row of a (width, B) activation array per connection: on
    # 4 KiB pages nearly every gather misses the TLB. The 784-10⁶-10⁶-10 model's step: 1.5× faster
    # with them (benchmarks/results/bench_huge_pages.md). A user's THP_MEM_ALLOC_ENABLE=0 is kept.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    args = parse_args(argv)
    from .config import ConfigError
    from .data import DatasetMissingError
    from .results import CorruptFileError

    try:
        return args.func(args)
    except (ConfigError, CorruptFileError, DatasetMissingError, ValueError, OSError, ImportError) as e:
        print(f"sparsegrow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparsegrow: interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
