"""Where one lowrank grow's time goes, phase by phase, on a crowded active set (issue 13):
the signal's spectrum, the rank-k factors, the score bound at every active pair, the threshold
seed, the search's pool, the exact rescoring. Medians over --repeats.

    python benchmarks/bench_lowrank_phases.py --size 1000000 --density 0.00004 --n 12000 120000 \
        --out benchmarks/results/bench_lowrank_phases.md

Signal and active set as bench_lowrank_exclusion (real profile; crowd 0.3); rank 4 (what `auto`
picks there).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from sparsegrow.search.exact import _seed_thresholds, score_floor, search_pool
from sparsegrow.search.lowrank import active_bound, rank_k_factors, rescored_best, spectrum

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lowrank_exclusion import crowded_active  # noqa: E402
from bench_sampled_grow import real_profile  # noqa: E402


def phases(Z, X, n, active, rank):
    """One grow as LowRankIndex.pairs runs it, timed per phase: {phase: seconds}."""
    t, out = time.perf_counter(), {}

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        out[name] = now - t
        t = now

    Zf, Xf = Z.float().contiguous(), X.float().contiguous()
    sp = spectrum(Zf, Xf)
    lap("spectrum")
    A, B, _ = rank_k_factors(Zf, Xf, rank, sp)
    lap("factors")
    bound = active_bound(A, B, active, "abs_ip")
    lap("active bound")
    _seed_thresholds(A, B, A.norm(dim=0), B.norm(dim=0), n, active, "abs_ip",
                     score_floor("abs_ip"), bound)
    lap("seed (alone)")
    pool, info = search_pool(A, B, n, active, "abs_ip", excluded_bound=bound)  # seeds again
    lap("search (seed included)")
    keys, approx = pool.top(n)
    rescored_best(Zf, Xf, keys, approx, n, active, torch.Generator().manual_seed(0), "abs_ip")
    lap("top + rescore")
    return out, info


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--signal", default="benchmarks/signals/fmnist_mlp4096.pt")
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--density", type=float, default=0.00004)
    ap.add_argument("--n", nargs="+", type=int, default=[12000])
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    Z, X = real_profile(torch.load(args.signal), args.size)
    active = crowded_active(Z, X, int(args.density * args.size ** 2), 0.3, 1, torch.device("cpu"))
    rows = ["| size | active | n | phase | s (median) |", "|---|---|---|---|---|"]
    for n in args.n:
        runs = [phases(Z, X, n, active, args.rank) for _ in range(args.repeats)]
        total = statistics.median(sum(v for k, v in r[0].items() if k != "seed (alone)") for r in runs)
        for k in runs[0][0]:
            rows.append(f"| {args.size}² | {active.numel()} | {n} | {k} | "
                        f"{statistics.median(r[0][k] for r in runs):.3f} |")
        rows.append(f"| {args.size}² | {active.numel()} | {n} | **grow (all but seed alone)** | "
                    f"{total:.3f} |")
        rows.append(f"| {args.size}² | {active.numel()} | {n} | active pairs checked | "
                    f"{runs[0][1]['excluded_checked']:.4f} |")
    print("\n".join(rows))
    if args.out:
        text = (f"# bench_lowrank_phases\n\n`python {' '.join(sys.argv)}` ({args.threads} threads)\n\n"
                + "\n".join(rows) + "\n")
        with open(args.out + ".tmp", "w") as f:
            f.write(text)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
