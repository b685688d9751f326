"""lowrank's grow where the active pairs crowd the top of S, as training leaves them (issue 13):
the bounded exclusion (one search; the pool checks only the active pairs whose S_k bound can
reach the threshold) against the path it replaced (a search that does not exclude, which in
training always found too few inactive pairs, then a second search excluding all nnz), and
exact search, in the same run.

    python benchmarks/bench_lowrank_exclusion.py --sizes 65536 --densities 0.001 --repeats 3 \
        --out benchmarks/results/bench_lowrank_exclusion.md

Signal: bench_sampled_grow's real-profile signal at width W (captured Fashion-MNIST dZ and X,
columns drawn with replacement, scaled by exp(0.1·ε)). Active set, "crowded" (--crowd f): f of
the nnz are the top pairs of |S_k| (rank 8) of the same columns rescaled by a fresh exp(0.3·ε')
(a nearby signal: what an earlier update grew), the rest uniform at random; crowd 0 gives
bench_sampled_grow's uniform set (default: both, 0.3 and 0). n = --fraction of nnz grown (each given);
rank: what `auto` picks on the signal. Both lowrank paths must return the same pairs (asserted).
Times are medians over --repeats, every method once per repeat, interleaved; "extra MiB" as in
bench_sampled_grow.

--floor-start adds the search as it started before session 15 where n is too small for the
sampled threshold estimate (late updates at 10⁶² grow ~10⁴ pairs): from the floor, checking
every active pair; the heavy-corner start replaced it (`exact._corner_threshold`):

    python benchmarks/bench_lowrank_exclusion.py --sizes 1000000 --densities 0.00004 --crowd 0.3 \
        --fraction 0.0003 0.003 --floor-start --repeats 3 --out benchmarks/results/bench_lowrank_small_n.md
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys

import torch

from sparsegrow.search import exact_top_pairs, top_pairs
from sparsegrow.search.exact import search_pool
from sparsegrow.search.lowrank import active_bound, rank_k_factors, rescored_best
from sparsegrow.search.sampled import free_mask
from sparsegrow.search_grow import pair_scores
from sparsegrow.topology import sample_inactive

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _device  # noqa: E402
from bench_sampled_grow import real_profile  # noqa: E402


def crowded_active(Z, X, nnz, crowd, seed, dev):
    """(sorted flat indices,): crowd · nnz top pairs of a nearby signal's |S_8|, the rest random."""
    g = torch.Generator().manual_seed(seed)
    top = int(crowd * nnz)
    grown = torch.empty(0, dtype=torch.long, device=dev)
    if top:
        Zn = Z * torch.exp(0.3 * torch.randn(Z.shape[1], generator=g)).to(dev)
        Xn = X * torch.exp(0.3 * torch.randn(X.shape[1], generator=g)).to(dev)
        A, B, _ = rank_k_factors(Zn, Xn, 8)
        pool, _ = search_pool(A, B, top, grown, "abs_ip")
        grown, _ = pool.top(top)
        grown = grown[:top]
    rest = sample_inactive(Z.shape[1] * X.shape[1], grown, nnz - grown.numel(), g, dev)
    return torch.sort(torch.cat([grown, rest])).values


def replaced_path(Z, X, n, excluded, rank, generator, metric="abs_ip"):
    """The lowrank grow before the bounded exclusion (candidates = 1, as auto runs it): the top
    m + extra of S_k without exclusion, the active ones removed by a merge; too few left: search
    again with the pool excluding every active pair. -> (sorted idx, searches run)."""
    A, B, _ = rank_k_factors(Z.float().contiguous(), X.float().contiguous(), rank)
    numel = Z.shape[1] * X.shape[1]
    extra = math.ceil(n * excluded.numel() / numel) + 64
    pool, _ = search_pool(A, B, min(n + extra, numel), excluded[:0], metric)
    keys, approx = pool.top(n + extra)
    free = free_mask(keys, excluded)
    searches = 1
    if int(free.sum()) < n:
        pool, _ = search_pool(A, B, n, excluded, metric)
        keys, approx = pool.top(n)
        searches = 2
    else:
        keys, approx = keys[free], approx[free]
    if keys.numel() > n:  # keep those >= the n-th best of S_k (more than n by ties)
        top = approx >= torch.topk(approx, n, sorted=False).values.min()
        keys, approx = keys[top], approx[top]
    Z, X = Z.float().contiguous(), X.float().contiguous()
    return rescored_best(Z, X, keys, approx, n, excluded, generator, metric)[0], searches


def floor_start_path(Z, X, n, excluded, rank, generator, metric="abs_ip"):
    """The bounded lowrank grow as it ran before the heavy-corner start (session 15) when n is
    too small for the sampled threshold estimate: one search from the floor, the pool checking
    every active pair (their bounds all reach it). -> sorted idx."""
    Zf, Xf = Z.float().contiguous(), X.float().contiguous()
    A, B, _ = rank_k_factors(Zf, Xf, rank)
    bound = active_bound(A, B, excluded, metric)
    pool, info = search_pool(A, B, n, excluded, metric, seed_threshold=False, excluded_bound=bound)
    keys, approx = pool.top(n)
    return rescored_best(Zf, Xf, keys, approx, n, excluded, generator, metric)[0], info


def bench_case(Z, X, active, n, args, dev, prefix):
    """Every method on one signal, active set and n, interleaved: the table's rows."""
    rank = top_pairs(Z, X, n, active, torch.Generator().manual_seed(2), "auto")[2]["rank"]
    methods = (["bounded (auto)", "replaced"] + ["floor start"] * args.floor_start
               + ["exact"] * (Z.shape[1] <= args.exact_max_width))

    def run(m, gen):
        if m == "exact":
            idx, _, inf = exact_top_pairs(Z, X, n, active, gen)
        elif m == "floor start":
            idx, inf = floor_start_path(Z, X, n, active, rank, gen)
        elif m == "replaced":
            idx, s = replaced_path(Z, X, n, active, rank, gen)
            inf = {"searches": s, "excluded_checked": 1.0 if s == 2 else 0.0}
        else:
            idx, _, inf = top_pairs(Z, X, n, active, gen, "auto")
            inf["searches"] = 2 if inf["bound_missed"] else 1
        return idx, inf

    times, extra, out, info = _device.interleaved(methods, args.repeats, dev, run)
    for m in methods[1:2 + args.floor_start]:
        assert torch.equal(out["bounded (auto)"], out[m]), f"bounded and {m} differ"
    med = {m: statistics.median(times[m]) for m in methods}
    best = float(pair_scores(Z, X, out["exact"]).sum()) if "exact" in out else None
    rows = []
    for m in methods:
        q = f"{float(pair_scores(Z, X, out[m]).sum()) / best:.3f}" if best else "-"
        vs_ex = f"{med['exact'] / med[m]:.1f}×" if "exact" in med else "-"
        rows.append(f"{prefix}| {n} | {m}{' rank ' + str(rank) if m != 'exact' else ''}"
                    f" | {med[m]:.3f} | {med['replaced'] / med[m]:.2f}× | {vs_ex} | "
                    f"{info[m].get('searches', 1)} | {info[m].get('excluded_checked', 1.0):.3f} | "
                    f"{q} | {statistics.median(extra[m]):.0f} |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--signal", default="benchmarks/signals/fmnist_mlp4096.pt")
    ap.add_argument("--sizes", nargs="+", type=int, default=[65536])
    ap.add_argument("--densities", nargs="+", type=float, default=[0.001])
    ap.add_argument("--crowd", nargs="+", type=float, default=[0.3, 0.0])
    ap.add_argument("--fraction", nargs="+", type=float, default=[0.3])
    ap.add_argument("--exact-max-width", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--floor-start", action="store_true",
                    help="also run the search from the floor (how it started before the heavy-corner "
                         "start, where n is too small for the sampled estimate)")
    args = ap.parse_args()
    dev = _device.resolve(args.device)
    if dev.type != "cuda":
        torch.set_num_threads(args.threads)
    sig = torch.load(args.signal)
    rows = ["| size | density | crowd | n grown | method | time s | × replaced | × exact | searches | "
            "active pairs checked | quality vs exact | extra MiB |", "|" + "---|" * 12]
    print("\n".join(rows), flush=True)
    for W in args.sizes:
        Z, X = (t.to(dev) for t in real_profile(sig, W))
        for d, crowd in itertools.product(args.densities, args.crowd):
            active = crowded_active(Z, X, int(d * W * W), crowd, 1, dev)
            for fraction in args.fraction:
                for row in bench_case(Z, X, active, int(round(fraction * active.numel())), args, dev,
                                      f"| {W}² | {d} | {crowd} "):
                    rows.append(row)
                    print(row, flush=True)
    if args.out:
        cmd = "python " + " ".join(sys.argv)
        text = (f"# bench_lowrank_exclusion\n\n`{cmd}` ({args.threads} threads, {dev})\n\n"
                + "\n".join(rows) + "\n")
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
