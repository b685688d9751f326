"""Turn run directories into markdown tables.

`runs_table` gives one row per run; `grouped_table` merges runs that differ only in their seed
into one row with mean ± std (sample std, n-1) and the seed count.
"""
from __future__ import annotations

import statistics
from collections import OrderedDict

COLUMNS = ["model", "method", "density", "distribution", "ΔT", "α", "epochs", "wall time (s)",
           "update time (s)", "test acc (%)"]


def _spec(method: str):
    """The registry entry of a run's method (a run of a method no longer registered: a plain one)."""
    import sparsegrow
    from sparsegrow.updater import Method

    return sparsegrow.METHODS.get(method) if method in sparsegrow.METHODS else Method(None, None)


def _row_key(run: dict) -> dict:
    """The columns that identify a group of runs (all but the seed)."""
    c, s = run["config"], run["summary"]
    sp = c["sparsity"]
    method = sp["method"]
    spec = _spec(method)
    drop_grow = spec.make is None and (sp.get("grow") or spec.grow) is not None  # α applies
    scheduled = spec.make is None and spec.updates  # ΔT applies
    grow = sp.get("grow") or spec.grow
    fan = "+cfi" if sp.get("fan_in") == "constant" and spec.fan_in != "constant" else ""
    # truly sparse storage trains the same method to the same accuracy in distribution, but its
    # times and memory are another implementation's: never averaged with masked runs
    storage = " (sparse)" if sp.get("storage", "masked") == "sparse" else ""
    if spec.learned_density:  # α is the regulariser's weight here, not the update fraction
        alpha = f"{c[spec.options][spec.name_by]:g} (L_S)"
    else:
        alpha = f"{sp['fraction']:g}" if drop_grow else "-"
    return OrderedDict([
        ("model", model_label(c["model"])),
        ("method", method + fan + (f"/{sp['grow']}" if sp.get("grow") else "")
         + (_search_settings(c) if grow == "search" and drop_grow else "") + storage),
        # a learned density is an outcome, not a setting: it is averaged in the table, not grouped on.
        ("density", "learned" if spec.learned_density else f"{s['density']:.4g}"),
        ("distribution", sp["distribution"] if not (spec.dense or spec.learned_density) else "-"),
        ("ΔT", str(sp["update_every"]) if scheduled else "-"),
        ("α", alpha),
        ("epochs", _epochs(c, s)),
    ])


def model_label(model: dict) -> str:
    """The model's name and the kwargs that shape it: "mlp(hidden=1000x1000)", "wrn(depth=10,
    width=1)"; runs of one model name at other sizes are other rows, never seeds of one row."""
    kw = model.get("kwargs") or {}

    def fmt(v):
        return "x".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    return model["name"] + (f"({','.join(f'{k}={fmt(v)}' for k, v in sorted(kw.items()))})" if kw else "")


def _epochs(c: dict, s: dict) -> str:
    """The epochs trained, and, for a run whose train.epochs changed on resume (its schedules
    were those of the earlier length until then), each earlier length: "3 (2 until step 8)"."""
    changes = s.get("epochs_changes") or []
    return str(s.get("epochs", c["train"]["epochs"])) + "".join(
        f" ({ch['from']} until step {ch['step']})" for ch in changes)


def _search_settings(c: dict) -> str:
    """What tells search-grow runs apart: backend, metric, and k_similar (the per-query index
    searches), bits (LSH) and the sketch size where they apply, e.g.
    "[lsh,abs_ip,ks=0.15,bits=2,sketch=256]"."""
    from sparsegrow.search import uses_k_similar

    se, signal = c["search"], c.get("signal", {})
    sketch = signal.get("sketch_dim", 0)
    parts = [se["backend"], se["metric"]]
    if uses_k_similar(se["backend"]):
        parts.append(f"ks={se['k_similar']:g}")
    if se["backend"] == "lsh":
        parts.append(f"bits={se['bits']:g}")
    if sketch:
        parts.append(f"sketch={sketch}")
    if signal.get("accumulate"):
        parts.append("acc")  # the signal summed over the ΔT steps since the last update
    return "[" + ",".join(parts) + "]"


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """"mean ± sample std" of values * scale (just the value for one run)."""
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def runs_table(runs: list[dict]) -> str:
    rows = []
    for run in runs:
        s = run["summary"]
        rows.append(list(_row_key(run).values()) + [
            f"{s['train_time_s']:.1f}", f"{s['update_time_s']:.2f}", f"{100 * s['test_acc']:.2f}"])
    return _markdown(["run"] + COLUMNS, [[run["summary"]["name"]] + r for r, run in zip(rows, runs)])


def group_runs(runs: list[dict], key=None) -> "OrderedDict[tuple, list[dict]]":
    """Runs grouped by key(run) (default: every table column but the seed), in first-seen order."""
    key = key or (lambda run: tuple(_row_key(run).items()))
    groups: OrderedDict[tuple, list[dict]] = OrderedDict()
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return groups


# two-sided 95% quantiles of Student's t by degrees of freedom (n - 1); 1.96 beyond the table
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def ci95(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """"[lo, hi]": the 95% confidence interval of the mean, mean ± t(n-1) * s / sqrt(n) (seeds
    as independent draws); "-" for one run."""
    values = [v * scale for v in values]
    n = len(values)
    if n < 2:
        return "-"
    df = n - 1
    t = _T975.get(df) or (_T975[max(k for k in _T975 if k <= df)] if df < 30 else 1.96)
    m, h = statistics.mean(values), t * statistics.stdev(values) / n ** 0.5
    return f"[{m - h:.{digits}f}, {m + h:.{digits}f}]"


def paired_difference(a: dict[int, float], b: dict[int, float]) -> tuple[int, float, float, float] | None:
    """Paired comparison of two rows' accuracies over the seeds they share: (n pairs, mean of
    a - b, 95% CI low, high) with Student's t on the differences; None below 2 shared seeds."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = [a[s] - b[s] for s in seeds]
    n, m = len(d), statistics.mean(d)
    t = _T975.get(n - 1) or (_T975[max(k for k in _T975 if k <= n - 1)] if n - 1 < 30 else 1.96)
    h = t * statistics.stdev(d) / n ** 0.5
    return n, m, m - h, m + h


def _paired_cells(key, members, groups, ref: str) -> list[str]:
    """Δ test accuracy vs the row of method `ref` with the same other columns (model, density,
    ΔT, α, epochs; a dense or static reference matches any ΔT and α), paired by seed."""
    d = dict(key)
    if d["method"] == ref:
        return ["(reference)", "", ""]

    def same(k):
        o = dict(k)
        if o["method"] != ref:
            return False
        loose = ("ΔT", "α", "distribution") if o["ΔT"] == "-" else ()
        return all(o[c] == d[c] for c in d if c != "method" and c not in loose)

    refs = [m for k, m in groups.items() if same(k)]
    if not refs:
        return ["-", "", ""]

    def acc(ms):
        return {m["summary"]["seed"]: 100 * m["summary"]["test_acc"] for m in ms}

    got = paired_difference(acc(members), acc(refs[0]))
    if got is None:
        return ["-", "", "< 2 shared seeds"]
    n, mean, lo, hi = got
    verdict = "no difference" if lo <= 0 <= hi else ("higher" if lo > 0 else "lower")
    return [f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]", str(n), verdict]


def grouped_table(runs: list[dict], ci: bool = False, paired: str | None = None,
                  itop: bool = False) -> str:
    """One row per group of seeds; ci: add the 95% confidence interval of the mean accuracy;
    itop: add the final ITOP rate (share of all connections ever active, Liu et al. 2021);
    paired: add each row's test-accuracy difference to the row of that method (same model,
    density, schedule and epochs) over the seeds both have, with its 95% CI (paired t)."""
    rows = []
    groups = group_runs(runs)
    for key, members in groups.items():
        summ = [m["summary"] for m in members]
        values = [v for _, v in key]
        if values[2] == "learned":
            values[2] = mean_std([s["density"] for s in summ], digits=4)
        rows.append(values + [
            mean_std([s["train_time_s"] for s in summ], digits=1),
            mean_std([s["update_time_s"] for s in summ]),
            mean_std([s["test_acc"] for s in summ], scale=100),
            *([ci95([s["test_acc"] for s in summ], scale=100)] if ci else []),
            *([mean_std([s["itop"] for s in summ], digits=4)] if itop else []),
            str(len(members)),
            *(_paired_cells(key, members, groups, paired) if paired else []),
        ])
    extra = [f"Δ acc vs {paired} (paired, 95% CI)", "pairs", "verdict"] if paired else []
    return _markdown(COLUMNS + (["95% CI (%)"] if ci else []) + (["ITOP"] if itop else [])
                     + ["seeds"] + extra, rows)
