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


def run_sweep(path: str | Path, smoke: bool = False, extra: list[str] = (), progress: bool = True,
              dry_run: bool = False, rows: list[str] | None = None) -> list[dict]:
    base, jobs = load_sweep(path, smoke, extra)
    if rows:
        labels = list(dict.fromkeys(j.label for j in jobs))
        unknown = [r for r in rows if r not in labels]
        if unknown:
            raise ConfigError(f"--rows: unknown row label(s) {unknown}; the sweep has: {', '.join(labels)}")
        jobs = [j for j in jobs if j.label in rows]
    summaries = []
    bar = tqdm(jobs, desc="sweep", disable=not progress, position=0, dynamic_ncols=True)
    for job in bar:
        bar.set_postfix_str(f"{job.label} seed {job.seed}")
        if dry_run:
            print(f"{job.run_dir}: {' '.join(job.overrides)}")
            continue
        cfg = load_config(base, job.overrides)
        summaries.append(train(cfg, job.run_dir, resume=has_progress(job.run_dir), progress=progress))
    bar.close()
    return summaries
