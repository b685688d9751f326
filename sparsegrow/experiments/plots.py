"""Plots from run directories (matplotlib, the `plot` extra).

    density       global density over training steps, one line per run (DST's is learned)
    loss          training loss over epochs, mean ± std band per group of seeds
    accuracy      test accuracy over epochs, mean ± std band per group of seeds
    itop          ITOP rate (share of connections ever active) over epochs, mean per group
    layer-density per-layer density over epochs, one panel per group (its first run): lines for a
                  few layers, a heatmap for many; a method that holds every layer's density fixed
                  is drawn the same way and says so, with each layer's value
    churn         connections dropped / grown / regrown per update, one panel per group (first run)
    density-acc   final test accuracy vs final density per method (mean ± std over seeds)
    time          time per phase (forward, backward, optimizer, update) per group, stacked bars

Labels use the report's names: d for the density, α for the update fraction (or DST's α of L_S).
A plot whose runs hold none of what it draws raises NoPlotData (the CLI: one line on stderr,
exit code 2) instead of writing an empty axis.
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


class NoPlotData(ValueError):
    """The runs given hold nothing this plot draws (e.g. recall of runs that never measured it)."""


def _label(key) -> str:
    d = dict(key)
    return f"{d['method']} d={d['density']}" + (f" α={d['α']}" if d["α"] != "-" else "")


def _epoch_curves(runs: list[dict], out: Path, field: str, ylabel: str, scale: float = 1.0,
                  band: bool = True, log: bool = False) -> None:
    """`field` of the epoch records over epochs, mean (± std band) over the seeds of each group."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for i, (key, members) in enumerate(group_runs(runs).items()):
        # (epoch, value) of the epochs that logged it (train.eval_every may skip test epochs)
        curves = [[(r["epoch"], r[field]) for r in read_metrics(m["dir"])
                   if r["kind"] == "epoch" and r.get(field) is not None] for m in members]
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = min(map(len, curves))
        xs = [e for e, _ in curves[0][:n]]
        mean = [statistics.mean(c[e][1] for c in curves) * scale for e in range(n)]
        sd = [statistics.stdev(c[e][1] for c in curves) * scale if len(curves) > 1 else 0
              for e in range(n)]
        ax.plot(xs, mean, color=f"C{i % 10}", marker="o", markersize=3,
                label=f"{_label(key)} (n={len(curves)})")
        if band:
            ax.fill_between(xs, [m - s for m, s in zip(mean, sd)],
                            [m + s for m, s in zip(mean, sd)], color=f"C{i % 10}", alpha=0.2)
        drawn += 1
    if not drawn:
        plt.close(fig)
        raise NoPlotData(f"no run under the given paths logged {field!r} per epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    save(fig, ax, out)


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
    _epoch_curves(runs, out, "test_acc", "test accuracy (%), mean ± std over seeds", scale=100)


def plot_loss(runs: list[dict], out: Path) -> None:
    _epoch_curves(runs, out, "train_loss", "training loss, mean ± std over seeds")


def plot_itop(runs: list[dict], out: Path) -> None:
    """ITOP: the share of the sparse layers' connections active at any time so far."""
    _epoch_curves(runs, out, "itop", "ITOP rate (share ever active)", band=False, log=True)


def _panels(plt, n: int, width: float = 6.5, height: float = 2.6):
    fig, axes = plt.subplots(n, 1, figsize=(width, height * n), squeeze=False)
    return fig, [a[0] for a in axes]


_HEATMAP_LAYERS = 6  # more layers than this: a heatmap instead of one line per layer


def plot_layer_density(runs: list[dict], out: Path) -> None:
    """Per-layer density over epochs (`layer_density` of the epoch records), one panel per group,
    from its first run. A layer whose density never changes (fixed-density methods: static, SET,
    RigL, ... keep every layer at its distribution's share) is not a trend: the panel says so and
    prints the values, so a flat line is read as "held fixed", not as "measured and flat"."""
    plt = _plt()
    groups = [(key, members[0]) for key, members in group_runs(runs).items()]
    series = []
    for key, run in groups:
        recs = [r for r in read_metrics(run["dir"]) if r["kind"] == "epoch" and r.get("layer_density")]
        if recs:
            series.append((key, run, recs))
    if not series:
        raise NoPlotData("no run under the given paths logged layer_density per epoch")
    fig, axes = _panels(plt, len(series))
    for ax, (key, run, recs) in zip(axes, series):
        layers = list(recs[0]["layer_density"])
        epochs = [r["epoch"] for r in recs]
        values = [[r["layer_density"].get(l, float("nan")) for r in recs] for l in layers]
        fixed = all(max(v) - min(v) < 1e-12 for v in values)
        title = f"{_label(key)}, seed {run['summary'].get('seed', '?')}"
        if len(layers) > _HEATMAP_LAYERS:
            im = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest",
                           extent=(epochs[0] - 0.5, epochs[-1] + 0.5, len(layers) - 0.5, -0.5))
            ax.set_yticks(range(len(layers)), layers, fontsize=6)
            ax.set_xticks(epochs if len(epochs) <= 20 else epochs[::len(epochs) // 10])
            fig.colorbar(im, ax=ax, label="density")
            if fixed:  # the values, which a one-colour band cannot show
                for j, v in enumerate(values):
                    ax.text(epochs[-1], j, f"{v[-1]:.3g}", ha="right", va="center", fontsize=5,
                            color="w")
        else:
            for j, (layer, v) in enumerate(zip(layers, values)):
                ax.plot(epochs, v, marker="o", markersize=3, color=f"C{j % 10}",
                        label=f"{layer}: {v[-1]:.4f}")
            ax.set_yscale("log")
            ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
        if fixed:
            title += " — every layer's density held fixed (set by the distribution)"
        ax.set_title(title, fontsize=8)
        ax.set_ylabel("layer density" if len(layers) <= _HEATMAP_LAYERS else "layer")
        if len(layers) <= _HEATMAP_LAYERS:
            ax.grid(alpha=0.3)
    axes[-1].set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_churn(runs: list[dict], out: Path) -> None:
    """Connections dropped, grown and regrown (dropped and grown back at once) per update record,
    one panel per group, from its first run. DST logs its counts per `stats_every` steps."""
    plt = _plt()
    series = []
    for key, members in group_runs(runs).items():
        recs = [r for r in read_metrics(members[0]["dir"]) if r.get("kind") == "update"]
        if recs:
            series.append((key, members[0], recs))
    if not series:
        raise NoPlotData("no run under the given paths logged a topology update (dense and static "
                         "runs never change their connections)")
    fig, axes = _panels(plt, len(series))
    for ax, (key, run, recs) in zip(axes, series):
        steps = [r["step"] for r in recs]
        for j, what in enumerate(("dropped", "grown", "regrown")):  # grown dashed: often = dropped
            ax.plot(steps, [r.get(what, 0) for r in recs], color=f"C{j}", label=what,
                    linewidth=1, linestyle="--" if what == "grown" else "-",
                    marker="." if len(recs) < 60 else None)
        ax.set_title(f"{_label(key)}, seed {run['summary'].get('seed', '?')}", fontsize=8)
        ax.set_ylabel("connections per update")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


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


PLOTS = {"density": plot_density, "loss": plot_loss, "accuracy": plot_accuracy,
         "itop": plot_itop, "layer-density": plot_layer_density, "churn": plot_churn,
         "density-acc": plot_density_accuracy, "time": plot_time}
