"""Training wall time of each method relative to static sparse training, measured in one run.

    python benchmarks/bench_train_overhead.py --methods static set rigl --epochs 2 --repeats 5

Trains LeNet-300-100 on Fashion-MNIST (density 0.02, ERK, ΔT=100 by default) with each method,
interleaving the methods within each repeat so slow phases of a shared machine hit all of them,
and prints the median training time (evaluation excluded), the median update time and the ratio
to static. Same seed for every method, so the data order is identical.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from sparsegrow.experiments.config import load_config
from sparsegrow.experiments.loop import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(Path(__file__).parents[1] / "configs/fmnist_lenet.yaml"))
    ap.add_argument("--methods", nargs="+", default=["static", "set", "rigl"])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. sparsity.update_every=100")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    times = {m: [] for m in args.methods}
    updates = {m: [] for m in args.methods}
    for r in range(args.repeats):
        for m in args.methods:
            cfg = load_config(args.config, [f"sparsity.method={m}", f"train.epochs={args.epochs}",
                                             f"train.threads={args.threads}", *args.overrides])
            with tempfile.TemporaryDirectory() as d:
                s = train(cfg, Path(d) / "run", progress=False)
            times[m].append(s["train_time_s"])
            updates[m].append(s["update_time_s"])
            print(f"repeat {r}: {m:8s} train {s['train_time_s']:.2f}s update {s['update_time_s']:.3f}s "
                  f"acc {s['test_acc']:.4f}", flush=True)
    ref = args.methods[0]
    base = statistics.median(times[ref])
    print(f"\n| method | median train time (s) | median update time (s) | ratio of medians to {ref} "
          f"| median of paired ratios | update time / {ref} time |")
    print("|---|---|---|---|---|---|")
    for m in args.methods:
        med = statistics.median(times[m])
        # Paired: the same repeat ran every method back to back, so a slow phase of the shared
        # machine hits both sides of each ratio.
        paired = statistics.median(t / b for t, b in zip(times[m], times[ref]))
        print(f"| {m} | {med:.2f} | {statistics.median(updates[m]):.3f} | {med / base:.3f} "
              f"| {paired:.3f} | {statistics.median(updates[m]) / base:.3f} |")


if __name__ == "__main__":
    main()
