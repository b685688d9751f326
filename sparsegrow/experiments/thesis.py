"""The thesis's tables 3.1-3.5 (chapter 3) from sweep run directories, and the plots issue 7 adds.

    sparsegrow report --thesis runs/thesis/table_3_1      markdown in the thesis's own columns
    sparsegrow plot acc-vs-k runs/thesis/table_3_3 --out acc_vs_k.png
    sparsegrow plot recall runs/thesis/table_3_1 --out recall.png

The thesis labels a row by what grows the connections: basic (dense), pruned (a fixed random
mask: our `static`), pruned + bruteforce (exact search), pruned + faiss (an approximate index),
and, in tables 3.4/3.5, faiss's LSH with `bits`. We add SET and RigL at the same density.

Columns, and what each number is:
- K: the update fraction (`sparsity.fraction`, share of active connections replaced per update).
- k_similar: share of candidates searched per query; shown only for approximate backends (exact
  search ignores it). bits: LSH hash bits per vector dimension; shown only for `lsh`.
- training time: the training loop's wall time (`summary.train_time_s`, evaluation excluded)
  minus the grow-recall measurement (`layers.*.measure_time_s` of the update records), which is
  our instrumentation, not part of the method; in hours when >= 1 h, else seconds. Mean over seeds.
- test acc: mean ± sample std (n-1) over seeds, in %.
- Δacc vs pruned: mean test acc minus the mean of the `static` row at the same density and epochs.
- grow share: grow time / training time, where grow time is the sum of `layers.*.grow_time_s`
  (signal -> chosen indices) where the grow criterion reports it (search), else the whole topology
  update time (`summary.update_time_s`: drop + grow + apply, e.g. SET, RigL). Capturing the search
  signal in hooks (unfold, sketch) happens inside forward/backward and is not counted here; compare
  the forward+backward phases with the `static` row (`sparsegrow plot time`) for that part.

Rows that differ only in the seed are one row; ΔT, the metric and the sketch size
(`signal.sketch_dim`, 0 = unsketched) become columns only where a table mixes them. Runs are
grouped into one table per sweep output folder (<output>/<label>/seed<k>).
"""
from __future__ import annotations

import statistics
from collections import OrderedDict
from pathlib import Path

from .plots import PLOTS, NoPlotData, _plt, save
from .report import _markdown, group_runs, mean_std
from .results import read_metrics

MODEL_ORDER = ["basic", "pruned", "pruned + bruteforce", "pruned + faiss", "pruned + lsh", "SET", "RigL"]
COLUMNS = ["Model", "Sparsity (%)", "K", "k_similar", "bits", "training time", "test acc (%)",
           "Δacc vs pruned", "seeds", "grow share (%)"]


def model_label(config: dict) -> str:
    """The thesis's name for a run's method (its `Model` column)."""
    method = config["sparsity"]["method"]
    grow = config["sparsity"].get("grow") or ("search" if method == "search" else None)
    if method == "dense":
        return "basic"
    if method == "static":
        return "pruned"
    if grow == "search":
        backend = config["search"]["backend"]
        if backend == "exact":
            return "pruned + bruteforce"
        if backend == "lsh":
            return "pruned + lsh"
        return f"pruned + faiss ({backend})" if backend != "faiss-hnsw" else "pruned + faiss"
    return {"set": "SET", "rigl": "RigL"}.get(method, method)


def _model_rank(label: str) -> int:
    base = label.split(" (")[0]
    return MODEL_ORDER.index(base) if base in MODEL_ORDER else len(MODEL_ORDER)


def _is_dynamic(config: dict) -> bool:
    """Drop-and-grow runs (K, the update fraction, applies), by the method's registry entry."""
    from .report import _spec

    sp = config["sparsity"]
    spec = _spec(sp["method"])
    return spec.make is None and not spec.prune and (sp.get("grow") or spec.grow) is not None


def row_key(run: dict) -> tuple:
    """Everything that tells rows apart (all but the seed), as a hashable, sortable tuple."""
    c = run["config"]
    sp, se = c["sparsity"], c["search"]
    label = model_label(c)
    dynamic = _is_dynamic(c)
    search = dynamic and (sp.get("grow") or sp["method"]) == "search"
    density = 1.0 if sp["method"] == "dense" else float(sp["density"])
    return (
        ("Model", label),
        ("density", density),
        ("ΔT", str(sp["update_every"]) if dynamic else ""),
        ("metric", se["metric"] if search else ""),
        ("sketch", str(c["signal"]["sketch_dim"]) if search else ""),
        ("K", float(sp["fraction"]) if dynamic else None),
        ("k_similar", float(se["k_similar"]) if search and se["backend"] not in ("exact",) else None),
        ("bits", float(se["bits"]) if search and se["backend"] == "lsh" else None),
        ("epochs", int(c["train"]["epochs"])),
    )


def _sort_key(key: tuple):
    d = dict(key)
    # thesis order: model kind, then ΔT (1 before epoch), k_similar, K, bits
    dt = d["ΔT"]
    return (_model_rank(d["Model"]), d["Model"], -d["density"], (len(dt), dt), d["metric"],
            d["k_similar"] or 0.0, d["K"] or 0.0, d["bits"] or 0.0, -int(d["sketch"] or 0))


def _update_records(run: dict) -> list[dict]:
    return [r for r in read_metrics(run["dir"]) if r.get("kind") == "update"]


def run_times(run: dict) -> tuple[float, float]:
    """(training time without recall measurement, grow time) of one run, in seconds."""
    s = run["summary"]
    grow = measure = 0.0
    reported = False
    for rec in _update_records(run):
        for layer in rec.get("layers", {}).values():
            if "grow_time_s" in layer:
                reported = True
                grow += layer["grow_time_s"]
            measure += layer.get("measure_time_s", 0.0)
    if not reported:
        grow = s.get("update_time_s", 0.0) if _is_dynamic(run["config"]) else 0.0
    return s["train_time_s"] - measure, grow


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:g}"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:.1f} s"


def group(runs: list[dict]) -> "OrderedDict[tuple, list[dict]]":
    """Runs by row, in the thesis's order. A run whose row and seed another run already has is
    left out: tables repeat their baselines (3.2 and 3.4 rerun 3.1's pruned at seed 0), and
    plotting several tables together must not count that seed twice."""
    seen, unique = set(), []
    for run in runs:
        k = (row_key(run), run["config"]["seed"])
        if k not in seen:
            seen.add(k)
            unique.append(run)
    groups = group_runs(unique, key=row_key)
    return OrderedDict(sorted(groups.items(), key=lambda kv: _sort_key(kv[0])))


def thesis_table(runs: list[dict]) -> str:
    """One markdown table in the thesis's columns (plus seeds, ± std and grow share)."""
    groups = group(runs)
    varying = ("ΔT", "metric", "sketch")
    mixed = {col: len({dict(k)[col] for k in groups if dict(k)[col]}) > 1 for col in varying}
    static_acc = {}
    for key, members in groups.items():
        d = dict(key)
        if d["Model"] == "pruned":
            static_acc[(d["density"], d["epochs"])] = statistics.mean(m["summary"]["test_acc"] for m in members)
    header = COLUMNS[:2] + [c for c in varying if mixed[c]] + COLUMNS[2:]
    rows = []
    for key, members in groups.items():
        d = dict(key)
        accs = [100 * m["summary"]["test_acc"] for m in members]
        times = [run_times(m) for m in members]
        train_s = statistics.mean(t for t, _ in times)
        share = statistics.mean(100 * g / t if t > 0 else 0.0 for t, g in times)
        ref = static_acc.get((d["density"], d["epochs"]))
        if d["Model"] == "pruned":
            delta = "—"
        elif ref is None or d["Model"] == "basic":
            delta = "" if d["Model"] == "basic" else "n/a"
        else:
            delta = f"{statistics.mean(accs) - 100 * ref:+.2f}"
        row = [d["Model"], f"{100 * (1 - d['density']):.0f}"]
        row += [d[c] for c in varying if mixed[c]]
        row += [_num(d["K"]), _num(d["k_similar"]), _num(d["bits"]), _duration(train_s), mean_std(accs), delta,
                str(len(members)), f"{share:.1f}" if _is_dynamic(members[0]["config"]) else ""]
        rows.append(row)
    return _markdown(header, rows)


def sweep_output(run: dict) -> str:
    """The sweep output folder of a run directory <output>/<label>/seed<k> (else its parent)."""
    p = Path(run["dir"])
    return str(p.parent.parent) if p.name.startswith("seed") else str(p.parent)


def thesis_report(runs: list[dict]) -> str:
    """One table per sweep output folder; a heading names the folder when there are several."""
    by_output: dict[str, list[dict]] = {}
    for run in runs:
        by_output.setdefault(sweep_output(run), []).append(run)
    if len(by_output) == 1:
        return thesis_table(runs)
    return "\n".join(f"### {out}\n\n{thesis_table(rs)}" for out, rs in sorted(by_output.items()))


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _varying(groups) -> set[str]:
    """The row fields (metric, sketch size) that the plotted runs mix: only those name a line."""
    return {f for f in ("metric", "sketch") if len({dict(k)[f] for k in groups if dict(k)[f]}) > 1}


def _line_name(d: dict, varies: set[str], with_k: bool = False) -> str:
    return f"{d['Model']}" + (f" K={d['K']:g}" if with_k else "") + f" ΔT={d['ΔT']}" \
        + (f" ks={d['k_similar']:g}" if d["k_similar"] else "") \
        + (f" bits={d['bits']:g}" if d["bits"] else "") \
        + "".join(f" {f}={d[f]}" for f in sorted(varies) if d[f])


def plot_acc_vs_k(runs: list[dict], out: Path) -> None:
    """Test accuracy vs K, one line per (model, ΔT, k_similar, bits, and metric and sketch size
    where they vary); dense and static as levels."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    lines: dict[str, list] = {}
    levels = []
    groups = group(runs)
    varies = _varying(groups)
    for key, members in groups.items():
        d = dict(key)
        acc, sd = _mean_sd([100 * m["summary"]["test_acc"] for m in members])
        if d["K"] is None:
            levels.append((f"{d['Model']} ({100 * (1 - d['density']):.0f}%)", acc, sd))
            continue
        lines.setdefault(_line_name(d, varies), []).append((d["K"], acc, sd))
    for i, (name, pts) in enumerate(lines.items()):
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    marker="osD^v"[i // 10 % 5], capsize=3, color=f"C{i % 10}", label=name,
                    linestyle="--" if "ΔT=epoch" in name else "-")
    for j, (name, acc, sd) in enumerate(levels):
        ax.axhline(acc, color="k", linestyle=[":", "-."][j % 2], linewidth=1, label=f"{name}: {acc:.2f}")
        if sd:
            ax.axhspan(acc - sd, acc + sd, color="k", alpha=0.06)
    ax.set_xscale("log")
    ax.set_xlabel("K (the update fraction α)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    save(fig, ax, out, legend_size=7)


def recall_curve(run: dict) -> tuple[list[int], list[float]]:
    """(step, mean recall over the layers that report it) per update record of one run."""
    steps, recalls = [], []
    for rec in _update_records(run):
        vals = [v["recall"] for v in rec.get("layers", {}).values() if v.get("recall") is not None]
        if vals:
            steps.append(rec["step"])
            recalls.append(statistics.mean(vals))
    return steps, recalls


def plot_recall(runs: list[dict], out: Path, max_points: int = 200) -> None:
    """Grow recall (vs exact top-K of |G| on the same signal) over training, mean over seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    drawn = 0
    groups = group(runs)
    varies = _varying(groups)
    for i, (key, members) in enumerate(groups.items()):
        curves = [recall_curve(m) for m in members]
        curves = [c for c in curves if c[0]]
        if not curves:
            continue
        n = min(len(c[0]) for c in curves)
        stride = max(1, n // max_points)  # ΔT=1 gives one record per step: thin it for the plot
        idx = list(range(0, n, stride))
        xs = [curves[0][0][j] for j in idx]
        mean = [statistics.mean(c[1][j] for c in curves) for j in idx]
        ax.plot(xs, mean, color=f"C{i % 10}", linestyle=["-", "--", ":"][i // 10 % 3],
                label=_line_name(dict(key), varies, with_k=True))
        drawn += 1
    if not drawn:
        plt.close(fig)
        raise NoPlotData("no update record under the given paths holds grow recall (only search "
                         "grow measures it: sparsity.method=search, search.measure not off)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("grow recall (mean over layers)")
    ax.set_ylim(0, 1.05)
    save(fig, ax, out, legend_size=7)


PLOTS.setdefault("acc-vs-k", plot_acc_vs_k)
PLOTS.setdefault("recall", plot_recall)
