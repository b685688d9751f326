"""Issue 13's scale runs in two tables: cost and accuracy per run, and what growth did.

    python scripts/issue13_report.py runs/scale_1m runs/scale_65k_grow

Reads every <root>/<row>/seed*/ run, finished or not (a partial run shows the epochs it has
logged). Per run: epochs and steps done, topology updates, training time per epoch (forward,
backward, optimizer and updates; evaluation excluded), mean update time, peak resident memory,
connections (the sparse layers' nnz at the last update plus every dense parameter), peak RSS per
connection (an upper bound on bytes per connection: it holds the interpreter, the data set and
the activations too), and the last logged test accuracy. Per row and layer: the backends the
grow chose (auto: its choice, e.g. lowrank:4; "not search" for SET), mean grow time, and mean quality against exact
search (row-subset estimate where exact is too dear) with random growth's beside it.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path

import yaml


def read_run(d: Path) -> dict:
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    epochs, updates = [], []
    f = d / "metrics.jsonl"
    for line in (f.read_text().splitlines() if f.exists() else []):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
        if r.get("kind") == "epoch":
            epochs.append(r)
        elif r.get("kind") == "update":
            updates.append(r)
    s = d / "summary.json"
    return {"dir": d, "config": cfg, "epochs": epochs, "updates": updates,
            "summary": json.loads(s.read_text()) if s.exists() else None}


def connections(run: dict) -> int | None:
    """Sparse layers' nnz at the last update + the dense parameters of an MLP (784-h..-10)."""
    c = run["config"]
    if c["model"]["name"] != "mlp" or not run["updates"]:
        return None
    dims = [784, *c["model"]["kwargs"]["hidden"], 10]
    sparse = {name: rec["nnz"] for name, rec in run["updates"][-1]["layers"].items()}
    total = sum(sparse.values())
    for k, (n_in, n_out) in enumerate(zip(dims, dims[1:])):
        name = f"hidden.{k}.weight" if k < len(dims) - 2 else "classifier.weight"
        total += n_out + (0 if name in sparse else n_in * n_out)  # bias + a dense weight
    return total


def cost_row(row: str, run: dict) -> list[str]:
    ep, s = run["epochs"], run["summary"]
    seed = run["config"]["seed"]
    if not ep:  # still in its first epoch: how far, from the topology updates
        up = run["updates"]
        return [row, str(seed), "0 (running)", str(up[-1]["step"]) if up else "-", str(len(up)),
                "-", f"{statistics.mean(u['time_s'] for u in up):.1f}" if up else "-", "-",
                f"{connections(run) / 1e6:.2f} M" if up else "-", "-", "-"]
    last = ep[-1]
    n_ep = len(ep)
    per_epoch = last["train_time_s"] / n_ep / 60
    n_up = len(run["updates"])
    up_s = statistics.mean(u["time_s"] for u in run["updates"]) if n_up else 0.0
    rss = s["peak_rss_mib"] / 1024 if s and s.get("peak_rss_mib") else None
    conns = connections(run)
    bpc = f"{rss * 2**30 / conns:.1f}" if rss and conns else "-"
    return [row, str(seed), f"{n_ep}" + ("" if s else " (running)"), str(last["step"]), str(n_up),
            f"{per_epoch:.1f}", f"{up_s:.1f}",
            # partial: resumed from a checkpoint that did not carry the earlier processes' peaks
            (f"{rss:.2f}" + (" (last process only)" if s.get("peaks_partial") else "")) if rss else "-",
            f"{conns / 1e6:.2f} M" if conns else "-", bpc, f"{100 * last['test_acc']:.2f}"]


def growth_rows(row: str, runs: list[dict]) -> list[list[str]]:
    per_layer: dict[str, dict] = defaultdict(lambda: {"choice": Counter(), "t": [], "q": [], "qr": []})
    for run in runs:
        for u in run["updates"]:
            for name, rec in u["layers"].items():
                L = per_layer[name]
                L["choice"][rec.get("search_auto_choice") or rec.get("backend") or "not search"] += 1
                L["t"].append(rec.get("grow_time_s", 0.0))
                if rec.get("quality") is not None:
                    L["q"].append(rec["quality"])
                if rec.get("quality_random") is not None:
                    L["qr"].append(rec["quality_random"])
    mean = lambda v: f"{statistics.mean(v):.3f}" if v else "-"  # noqa: E731
    return [[row, name, ", ".join(f"{k} ×{n}" for k, n in L["choice"].most_common()),
             f"{statistics.mean(L['t']):.2f}" if L["t"] else "-", mean(L["q"]), mean(L["qr"])]
            for name, L in sorted(per_layer.items())]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("roots", nargs="+", type=Path)
    args = ap.parse_args()
    for root in args.roots:
        rows = {r.name: [read_run(d) for d in sorted(r.glob("seed*")) if (d / "config.yaml").exists()]
                for r in sorted(p for p in root.iterdir() if p.is_dir())}
        print(f"#### {root}\n")
        print(markdown(["row", "seed", "epochs", "steps", "updates", "train min/epoch",
                        "update s", "peak RSS GiB", "connections", "peak RSS B/conn",
                        "test acc (%)"],
                       [cost_row(row, run) for row, runs in rows.items() for run in runs]))
        print()
        print(markdown(["row", "layer", "grow backend (updates)", "grow s", "quality",
                        "random's quality"],
                       [g for row, runs in rows.items() for g in growth_rows(row, runs)]))
        print()


if __name__ == "__main__":
    main()
