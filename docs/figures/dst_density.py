"""Density over training of DST runs: global (thick) and per layer (thin), one colour per seed.

    python docs/figures/dst_density.py runs/dst_acceptance/dst-s* --out docs/figures/dst_density.png

Reads each run's metrics.jsonl ("update" records, every stats_every steps and on resets).
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ["-", "--", ":"]
    for i, run in enumerate(sorted(args.runs)):
        recs = [json.loads(line) for line in open(Path(run) / "metrics.jsonl")]
        ups = [r for r in recs if r["kind"] == "update"]
        steps = [r["step"] for r in ups]
        color = f"C{i}"
        ax.plot(steps, [r["global_density"] for r in ups], color=color, lw=2,
                label=f"{Path(run).name} global")
        for j, name in enumerate(ups[0]["layers"]):
            ax.plot(steps, [r["layers"][name]["density"] for r in ups], color=color, lw=0.8,
                    ls=styles[j % 3], alpha=0.7, label=f"{Path(run).name} {name}" if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("density (fraction of weights active)")
    ax.set_title("DST on Fashion-MNIST LeNet-300-100, alpha=5e-4")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
