"""Growth search backends that scale with the pairs they touch (lowrank, the samplers, auto)
against exact search and random growth, measured in one run (issue 13).

Capture a real signal once (a hidden layer's output gradients dZ and inputs X, B = 128 rows, of
the MLP 784-4096-4096-10 trained --train-steps SGD steps on Fashion-MNIST; float16, ~2 MB):

    python benchmarks/bench_sampled_grow.py --capture benchmarks/signals/fmnist_mlp4096.pt

then measure at larger widths:

    python benchmarks/bench_sampled_grow.py --signal benchmarks/signals/fmnist_mlp4096.pt \
        --sizes 16384 65536 --densities 0.01 0.001 --repeats 3 --out benchmarks/results/bench_sampled_grow.md

"Real-profile" signal at width W: the W columns of dZ and of X are drawn with replacement from
the captured 4096 (so the norm profile and the correlations across the B rows are the trained
layer's), each scaled by exp(0.1·ε), ε ~ N(0, 1), so no two are identical. The active set is
random at the density (a captured 4096² top-|w| set does not scale). n = 0.3 · nnz grown.
Quality = Σ|G| of the chosen pairs / Σ|G| of exact search's pairs; recall = share of exact's
pairs chosen. Cost is also given in training steps of the layer: one truly sparse step (SpMM
forward, SpMM backward, SDDMM weight gradient at the nnz; C kernels) measured at the same size.
Times are medians over --repeats; each repeat runs every method once, interleaved.
Above --exact-max-width exact search is not run (at 10⁶² it would take tens of minutes): recall
and quality are then the row-subset estimate (`search_grow.measure_grow`: --quality-rows random
rows of G, the pairs chosen in them against exact search's top round(n · rows / N) in them).
"extra MiB": the call's peak memory above what was in use when it began (CPU: resident set
high-water mark, reset before each call; cuda: the allocator's peak), beside the layer's nnz
storage (float32 values + int32 indices, CSR and its transposed view: 16 B per connection).

The 10⁶² acceptance run of issue 13 (ε = 20: density 4e-5, 40 M connections, n = 12 M):

    python benchmarks/bench_sampled_grow.py --sizes 1000000 --densities 0.00004 --samplers \
        --repeats 1 --threads 2 --out benchmarks/results/bench_sampled_grow.md

--device cuda: the signal (Z, X), the active set and the layer step's tensors live on the GPU
(random numbers still come from the CPU generator, as in the library); one warm-up pass of
every method first, then each call is bracketed by torch.cuda.synchronize(). The layer step is
then the torch.sparse kernels' (the C kernels are CPU-only). --threads does not apply.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from sparsegrow.layers.kernels import sddmm, spmm
from sparsegrow.search import exact_top_pairs, top_pairs
from sparsegrow.search_grow import measure_grow, pair_scores
from sparsegrow.topology import isin_sorted, sample_inactive

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _device  # noqa: E402


def capture(path, steps, width=4096, B=128):
    sys.path.insert(0, "benchmarks")
    from bench_grow import trained_data
    Z, X, _ = trained_data(width, width, B, 0.01, 0, steps, "cpu")
    torch.save({"Z": Z.half(), "X": X.half(), "steps": steps, "width": width,
                "what": "dZ and X of layer 2 of MLP 784-4096-4096-10 (dense SGD, Fashion-MNIST)"},
               path)
    print(f"saved {path}: Z {tuple(Z.shape)}, X {tuple(X.shape)}")


def real_profile(sig, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for key in ("Z", "X"):
        A = sig[key].float()
        cols = torch.randint(0, A.shape[1], (W,), generator=g)
        out.append((A[:, cols] * torch.exp(0.1 * torch.randn(W, generator=g))).contiguous())
    return out


def layer_step_s(N, M, B, active):
    """One truly sparse training step of the layer: SpMM fwd + SpMM bwd + SDDMM at the nnz."""
    dev = active.device
    ptr = torch.searchsorted(active, torch.arange(N + 1, device=dev) * M)
    idx = (active % M).contiguous()
    val = torch.randn(active.numel()).to(dev)
    xt, gt = torch.randn(M, B).to(dev), torch.randn(N, B).to(dev)
    rows = torch.repeat_interleave(torch.arange(N, device=dev), ptr.diff())
    tkey, order = torch.sort(idx * N + rows)  # the transposed CSR (as the layer keeps it)
    tptr = torch.searchsorted(tkey, torch.arange(M + 1, device=dev) * N)
    tidx, tval = (tkey % N).contiguous(), val[order].contiguous()
    times = []
    for i in range(4 if dev.type == "cuda" else 3):
        _device.sync(dev)
        t0 = time.perf_counter()
        spmm(ptr, idx, val, xt, N)
        spmm(tptr, tidx, tval, gt, M)
        sddmm(ptr, idx, gt, xt)
        _device.sync(dev)
        if dev.type != "cuda" or i > 0:  # on cuda the first is a warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--capture", default=None, help="train, capture the signal, save it here")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--signal", default="benchmarks/signals/fmnist_mlp4096.pt")
    ap.add_argument("--sizes", nargs="+", type=int, default=[16384, 65536])
    ap.add_argument("--densities", nargs="+", type=float, default=[0.01, 0.001])
    ap.add_argument("--samplers", nargs="*", default=["norm", "wedge", "diamond"])
    ap.add_argument("--candidates", nargs="+", type=float, default=[4, 8, 16, 32])
    ap.add_argument("--ranks", nargs="*", type=int, default=[4, 8], help="lowrank ranks")
    ap.add_argument("--lowrank-candidates", type=float, default=1.0, help="as auto uses")
    ap.add_argument("--exact-max-width", type=int, default=65536,
                    help="above this width exact search is not run: quality on a row subset")
    ap.add_argument("--quality-rows", type=int, default=1024)
    ap.add_argument("--max-draws", type=float, default=6e7, help="skip settings drawing more")
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    dev = _device.resolve(args.device)
    cuda = dev.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    if args.capture:
        return capture(args.capture, args.train_steps)
    sig = torch.load(args.signal)
    if cuda:
        print(f"# bench_sampled_grow: {_device.describe(dev)}; times synchronized, after one "
              "warm-up pass of every method", flush=True)
    header = ("| size | density | method | time s | × exact | layer steps | recall | quality | "
              "scored | extra MiB | note |")
    rows = [header, "|" + "---|" * 11]
    print("\n".join(rows), flush=True)
    for W in args.sizes:
        Z, X = (t.to(dev) for t in real_profile(sig, W))
        for d in args.densities:
            active = sample_inactive(W * W, torch.empty(0, dtype=torch.long), int(d * W * W),
                                     torch.Generator().manual_seed(1), dev)
            n = int(round(args.fraction * active.numel()))
            with_exact = W <= args.exact_max_width
            methods = ["exact"] * with_exact + ["random", "auto"] + [
                f"lowrank:{k}" for k in args.ranks] + [
                f"sample-{s}:{c:g}" for s in args.samplers for c in args.candidates
                if c * n <= args.max_draws]
            def run(m, gen):
                if m == "exact":
                    idx, _, inf = exact_top_pairs(Z, X, n, active, gen)
                elif m == "random":
                    idx, inf = sample_inactive(W * W, active, n, gen), {}
                elif m == "auto":
                    idx, _, inf = top_pairs(Z, X, n, active, gen, "auto")
                elif m.startswith("lowrank:"):  # rank k, --lowrank-candidates per grown
                    idx, _, inf = top_pairs(Z, X, n, active, gen, "lowrank", backend_options={
                        "rank": int(m.split(":")[1]), "candidates": args.lowrank_candidates})
                else:
                    b, c = m.split(":")
                    idx, _, inf = top_pairs(Z, X, n, active, gen, b,
                                            backend_options={"candidates": float(c)})
                return idx, inf

            times, extra, out, info = _device.interleaved(methods, args.repeats, dev, run)
            step = layer_step_s(W, W, Z.shape[0], active)
            if with_exact:
                best = float(pair_scores(Z, X, out["exact"]).sum())
                t_ex = statistics.median(times["exact"])
            for m in methods:
                t = statistics.median(times[m])
                if with_exact:
                    rec = float(isin_sorted(out[m], out["exact"]).float().mean())
                    q = float(pair_scores(Z, X, out[m]).sum()) / best
                else:  # the row-subset estimate against exact search on those rows
                    est = measure_grow(Z, X, out[m], n, active, args.quality_rows)
                    rec, q = est["recall"], est["quality"]
                inf = info[m]
                note = inf.get("auto_choice", "")
                if inf.get("random_filled"):
                    note += f" random_filled={inf['random_filled']}"
                if m == "exact":
                    note = f"pairs_computed={inf['pairs_computed']:.3f}"
                if "energy" in inf:  # lowrank, also when auto chose it
                    note += f" energy={inf['energy']:.3f} pairs_computed={inf['pairs_computed']:.4f}"
                vs = f"{t_ex / t:.1f}× faster" if with_exact else ""
                row = (f"| {W}² | {d} | {m} | {t:.3f} | {vs} | {t / step:.1f} | {rec:.3f} | "
                       f"{q:.3f} | {inf.get('scored', '')} | {statistics.median(extra[m]):.0f} | "
                       f"{note} |")
                print(row, flush=True)
                rows.append(row)
            storage = active.numel() * 2 * (4 + 4) / 2**20
            print(f"(layer step {step:.4f} s; n = {n})", flush=True)
            rows.append(f"| {W}² | {d} | (one sparse training step of the layer) | {step:.4f} | | 1 "
                        f"| | | | {storage:.0f} | n = {n}; extra MiB here: the layer's nnz storage "
                        "(float32 values + int32 indices, CSR and its transposed view) |")
            if not with_exact:
                rows.append(f"| | | (recall and quality: row-subset estimate, {args.quality_rows} "
                            "random rows against exact search on them) | | | | | | | | |")
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n`python benchmarks/bench_sampled_grow.py {' '.join(sys.argv[1:])}`  \n"
                    f"{'device ' + _device.describe(dev) if cuda else f'threads {args.threads}'}, "
                    f"B = {Z.shape[0]}, update fraction {args.fraction}, "
                    f"median of {args.repeats} interleaved repeats\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
