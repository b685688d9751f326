"""A sweep: one base config, a list of rows (labelled override sets) or a grid, and seeds.

    # sparsegrow sweep configs/sweeps/fmnist_lenet_methods.yaml [--smoke]
    base: ../fmnist_lenet.yaml          # relative to this file
    output: runs/fmnist_lenet_methods
    seeds: [0, 1, 2]
    overrides: [train.epochs=10]        # applied to every row
    smoke: [train.epochs=1, data.train_subset=512]   # added by --smoke (CI-sized)
    smoke_seeds: [0]                    # --smoke runs only these seeds (default: all)
    rows:
      - {label: dense, overrides: [sparsity.method=dense]}
      - {label: rigl, overrides: [sparsity.method=rigl], seeds: [0, 1, 2, 3, 4]}
    grid:                               # instead of (or besides) rows: the cartesian product
      sparsity.method: [static, set, rigl]
      sparsity.density: [0.02, 0.05]

Each (row, seed) trains into <output>/<label>/seed<seed>; finished runs are skipped and
interrupted ones resume from their checkpoint, so re-running a sweep continues it. Re-run with a
larger train.epochs, it extends every run (see loop.py, "Changing train.epochs on resume"); any
other change of a run's config is an error naming the keys.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .config import ConfigError, load_config, read_yaml
from .loop import has_progress, train

SWEEP_KEYS = {"base", "output", "seeds", "overrides", "smoke", "smoke_seeds", "rows", "grid",
              "description"}


@dataclass
class Job:
    label: str
    seed: int
    overrides: list[str]
    run_dir: Path


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", label).strip("_")


def load_sweep(path: str | Path, smoke: bool = False, extra: list[str] = ()) -> tuple[Path, list[Job]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} not found")
    spec = read_yaml(path) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep file {str(path)!r} must hold a mapping, got {type(spec).__name__}")
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {sorted(unknown)}; allowed: {sorted(SWEEP_KEYS)}")
    if "base" not in spec:
        raise ConfigError(f"sweep {str(path)!r} needs a `base:` config")
    base = (path.parent / spec["base"]).resolve()
    output = Path(spec.get("output", f"runs/{path.stem}"))
    if smoke:
        output = output.with_name(output.name + "-smoke")
    seeds = spec.get("seeds", [0])
    common = list(spec.get("overrides", [])) + (list(spec.get("smoke", [])) if smoke else []) + list(extra)
    rows = [dict(r) for r in spec.get("rows", [])]
    grid = spec.get("grid") or {}
    if grid:
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            ov = [f"{k}={v}" for k, v in zip(keys, values)]
            rows.append({"label": ",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, values)),
                         "overrides": ov})
    if not rows:
        raise ConfigError(f"sweep {str(path)!r} has no rows and no grid")
    jobs, labels = [], set()
    for row in rows:
        bad = set(row) - {"label", "overrides", "seeds"}
        if bad or "label" not in row:
            raise ConfigError(f"sweep row {row!r}: needs `label`, may have `overrides` and `seeds`")
        if row["label"] in labels:
            raise ConfigError(f"sweep row label {row['label']!r} appears twice")
        labels.add(row["label"])
        row_seeds = row.get("seeds", seeds)
        if smoke and "smoke_seeds" in spec:
            row_seeds = [s for s in row_seeds if s in spec["smoke_seeds"]] or row_seeds[:1]
        for seed in row_seeds:
            ov = [*common, *row.get("overrides", []), f"seed={seed}"]
            load_config(base, ov)  # validate every job before any runs
            jobs.append(Job(row["label"], seed, ov, output / _slug(row["label"]) / f"seed{seed}"))
    return base, jobs


def _run_job(args: tuple[int, Path, list[str], Path]) -> tuple[int, dict | None, str | None]:
    """One (row, seed) in a worker process of ``run_sweep(jobs=N)`` (top level: it is pickled).
    Returns (index, summary, None) or (index, None, the error in one line)."""
    i, base, overrides, run_dir = args
    try:
        cfg = load_config(base, overrides)
        return i, train(cfg, run_dir, resume=has_progress(run_dir), progress=False), None
    except Exception as e:  # noqa: BLE001 -- reported with the others by _run_parallel
        import traceback
        traceback.print_exc()  # the whole trace on the sweep's stderr; one line in the summary
        return i, None, f"{type(e).__name__}: {e}"


def run_sweep(path: str | Path, smoke: bool = False, extra: list[str] = (), progress: bool = True,
              dry_run: bool = False, rows: list[str] | None = None, seeds: list[int] | None = None,
              jobs: int = 1) -> list[dict]:
    """Train every (row, seed) of the sweep not yet finished; returns their summaries in order.

    jobs > 1 trains that many runs at once, each in its own process (spawned, so every run sets
    its own torch threads from train.threads): runs are independent, their results identical to
    a sequential sweep. A run that fails does not stop the others; the failures are raised
    together at the end, naming each run.
    """
    base, all_jobs = load_sweep(path, smoke, extra)
    todo = all_jobs
    if rows:
        labels = list(dict.fromkeys(j.label for j in todo))
        unknown = [r for r in rows if r not in labels]
        if unknown:
            raise ConfigError(f"--rows: unknown row label(s) {unknown}; the sweep has: {', '.join(labels)}")
        todo = [j for j in todo if j.label in rows]
    if seeds:
        known = sorted({j.seed for j in todo})
        unknown = [s for s in seeds if s not in known]
        if unknown:
            raise ConfigError(f"--seeds: seed(s) {unknown} are not in the sweep; it has: {known}")
        todo = [j for j in todo if j.seed in seeds]
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if dry_run:
        for job in todo:
            print(f"{job.run_dir}: {' '.join(job.overrides)}")
        return []
    if jobs == 1:
        summaries = []
        bar = tqdm(todo, desc="sweep", disable=not progress, position=0, dynamic_ncols=True)
        for job in bar:
            bar.set_postfix_str(f"{job.label} seed {job.seed}")
            cfg = load_config(base, job.overrides)
            summaries.append(train(cfg, job.run_dir, resume=has_progress(job.run_dir), progress=progress))
        bar.close()
        return summaries
    return _run_parallel(base, todo, jobs, progress)


def _run_parallel(base: Path, todo: list[Job], jobs: int, progress: bool) -> list[dict]:
    import multiprocessing as mp

    results: dict[int, dict] = {}
    failed: list[str] = []
    bar = tqdm(total=len(todo), desc=f"sweep ({jobs} at once)", disable=not progress, dynamic_ncols=True)
    # one process per run (maxtasksperchild=1): a run's peak_rss_mib is its own process's peak,
    # never that of an earlier run on a reused worker
    with mp.get_context("spawn").Pool(processes=jobs, maxtasksperchild=1) as pool:
        work = [(i, base, j.overrides, j.run_dir) for i, j in enumerate(todo)]
        for i, summary, err in pool.imap_unordered(_run_job, work):
            if err is None:
                results[i] = summary
            else:
                failed.append(f"{todo[i].run_dir}: {err}")
            bar.update(1)
            bar.set_postfix_str(f"{todo[i].label} seed {todo[i].seed}")
    bar.close()
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(todo)} sweep runs failed:\n" + "\n".join(failed))
    return [results[i] for i in sorted(results)]
