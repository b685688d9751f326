"""Paired differences between grow rules of a sweep (same seeds), one table row per pair and
density: mean Δ test accuracy (points), Student's t 95% interval, and the verdict.

    python scripts/paired_rules.py runs/long_lenet --densities 0.05 0.01 --pairs set:rigl search:set

A pair a:b compares the rows labelled a-d<density> and b-d<density>; the label "dense" has no
density suffix (it is the same run at every density). Without --densities the labels are taken
as they are (e.g. `--pairs search-w4000:set-w4000` for runs/width_budget).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparsegrow.experiments.report import paired_difference


def accuracies(root: Path, label: str) -> dict[int, float]:
    """{seed: test accuracy in %} of the finished runs of one sweep row."""
    out = {}
    for f in (root / label).glob("seed*/summary.json"):
        s = json.loads(f.read_text())
        out[s["seed"]] = 100 * s["test_acc"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--densities", nargs="+", default=[None],
                    help="density suffixes of the row labels (none: labels as given)")
    ap.add_argument("--pairs", nargs="+", required=True, help="a:b, rows compared as a − b")
    args = ap.parse_args()
    print("| comparison | density | Δ acc (pp) | 95% CI | pairs | verdict |")
    print("|---|---|---|---|---|---|")
    for d in args.densities:
        for pair in args.pairs:
            a, b = pair.split(":")
            got = paired_difference(*(accuracies(args.root, x if x == "dense" or d is None
                                                 else f"{x}-d{d}") for x in (a, b)))
            if got is None:
                print(f"| {a} − {b} | {d or '-'} | - | - | <2 | |")
                continue
            n, m, lo, hi = got
            verdict = "no difference" if lo <= 0 <= hi else ("higher" if lo > 0 else "lower")
            print(f"| {a} − {b} | {d or '-'} | {m:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {n} | {verdict} |")


if __name__ == "__main__":
    main()
