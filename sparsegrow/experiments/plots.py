"""Plots from run directories (matplotlib, the `plot` extra).

    density     global density over training steps, one line per run (DST's is learned)
    accuracy    test accuracy over epochs, mean ± std band per group of seeds
    density-acc final test accuracy vs final density per method (mean ± std over seeds)
    time        time per phase (forward, backward, optimizer, update) per group, stacked bars
"""
from __future__ import annotations

import statistics
from pathlib import Path

from .report import group_runs
from .results import read_metrics


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'sparsegrow[plot]'") from None
    return plt


def save(fig, ax, out: Path, grid: bool = True, legend_size: int = 8,
         legend_beside: bool = False) -> None:
    """Finish an axes (grid, legend: inside, or beside it for crowded plots) and write to `out`."""
    if grid:
        ax.grid(alpha=0.3)
    if legend_beside:
        ax.legend(fontsize=legend_size, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.savefig(out, dpi=120, bbox_inches="tight")  # tight_layout ignores an outside legend
    else:
        ax.legend(fontsize=legend_size)
        fig.tight_layout()
        fig.savefig(out, dpi=120)
    fig.clf()
    _plt().close(fig)


def _label(key) -> str:
    d = dict(key)
    return f"{d['method']} d={d['density']}" + (f" K={d['α']}" if d["α"] != "-" else "")


def plot_density(runs: list[dict], out: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for g, (key, members) in enumerate(group_runs(runs).items()):
        for i, run in enumerate(members):
            epochs = [r for r in read_metrics(run["dir"]) if r["kind"] == "epoch"]
            ax.plot([r["step"] for r in epochs], [r["global_density"] for r in epochs],
                    color=f"C{g % 10}", alpha=0.8,
                    label=f"{_label(key)}" if i == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("global density")
    ax.set_yscale("log")
    save(fig, ax, out)


def plot_accuracy(runs: list[dict], out: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (key, members) in enumerate(group_runs(runs).items()):
        # (epoch, accuracy) of the evaluated epochs (train.eval_every may skip some)
        curves = [[(r["epoch"], r["test_acc"]) for r in read_metrics(m["dir"])
                   if r["kind"] == "epoch" and r["test_acc"] is not None] for m in members]
        n = min(map(len, curves))
        xs = [e for e, _ in curves[0][:n]]
        mean = [statistics.mean(c[e][1] for c in curves) * 100 for e in range(n)]
        sd = [statistics.stdev(c[e][1] for c in curves) * 100 if len(curves) > 1 else 0 for e in range(n)]
        ax.plot(xs, mean, color=f"C{i % 10}", label=_label(key))
        ax.fill_between(xs, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                        color=f"C{i % 10}", alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    save(fig, ax, out)


def plot_density_accuracy(runs: list[dict], out: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    by_method: dict[str, list] = {}
    for key, members in group_runs(runs).items():
        d = dict(key)
        dens = statistics.mean(m["summary"]["density"] for m in members)
        accs = [m["summary"]["test_acc"] * 100 for m in members]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        by_method.setdefault(d["method"], []).append((dens, statistics.mean(accs), sd))
    for i, (method, pts) in enumerate(sorted(by_method.items())):
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    marker="o", capsize=3, color=f"C{i % 10}", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("density")
    ax.set_ylabel("test accuracy (%)")
    save(fig, ax, out)


_PHASES = ("forward", "backward", "grow signal", "optimizer", "search", "recall measure", "apply",
           "update")


def phase_breakdown(run: dict) -> dict[str, float]:
    """Training time of one run split by phase (s): the loop's forward / backward / optimizer /
    update, with search grow's own timings (per update and layer, in metrics.jsonl) taken out:
    the signal hooks' time out of backward ("grow signal"), and the update split into "search",
    "recall measure" and the rest ("apply": drop, mask and optimizer-state updates). Runs
    without those timings (other methods, older runs) keep "update" whole."""
    phases = dict(run["summary"]["phases_s"])
    signal = search = measure = 0.0
    has_signal = has_search = False
    for rec in read_metrics(run["dir"]):
        if rec.get("kind") != "update":
            continue
        for layer in rec.get("layers", {}).values():
            has_signal |= "signal_time_s" in layer
            has_search |= "grow_time_s" in layer
            signal += layer.get("signal_time_s", 0.0)
            search += layer.get("grow_time_s", 0.0)
            measure += layer.get("measure_time_s", 0.0)
    if has_signal:
        phases["backward"] = phases.get("backward", 0.0) - signal
        phases["grow signal"] = signal
    if has_search and "update" in phases:
        update = phases.pop("update")
        phases["search"], phases["recall measure"] = search, measure
        phases["apply"] = max(0.0, update - search - measure)
    return phases


def plot_time(runs: list[dict], out: Path) -> None:
    plt = _plt()
    groups = group_runs(runs)
    per_group = [[phase_breakdown(m) for m in members] for members in groups.values()]
    present = {p for runs_ in per_group for b in runs_ for p in b}
    phases = sorted(present, key=lambda p: _PHASES.index(p) if p in _PHASES else 99)
    fig, ax = plt.subplots(figsize=(max(6, 1.0 * len(groups)), 5.5))
    labels = [_label(k) for k in groups]
    bottom = [0.0] * len(groups)
    for j, phase in enumerate(phases):
        vals = [statistics.median(b.get(phase, 0.0) for b in runs_) for runs_ in per_group]
        ax.bar(labels, vals, bottom=bottom, label=phase, color=f"C{j % 10}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("training time (s), median over seeds")
    ax.tick_params(axis="x", rotation=35, labelsize=7)
    for lab in ax.get_xticklabels():
        lab.set_horizontalalignment("right")
    save(fig, ax, out, grid=False, legend_size=7, legend_beside=True)


PLOTS = {"density": plot_density, "accuracy": plot_accuracy, "density-acc": plot_density_accuracy,
         "time": plot_time}
