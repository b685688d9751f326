"""Grow search against RigL's dense-gradient grow, measured in one run: time, peak memory, recall.

    python benchmarks/bench_grow.py --shapes 300x784 1024x1024 4096x4096 16384x16384 \
        --densities 0.1 0.01 --data random trained --repeats 3 --out benchmarks/results/bench_grow.md

For each layer shape N x M, density d and data source, with B = 128 rows of (dZ, X):
  * "gemm": one dense weight-gradient GEMM dZᵀX (what autograd does for the layer every step);
  * "rigl": dense G + top-n among inactive pairs (RigL's grow: G is formed and scored);
  * every search backend: `search.top_pairs` on the same (dZ, X, active set).
n = 0.3 * d * N * M (update fraction 0.3); the active set is drawn at random ("random") or is the
top-|w| set of a trained layer ("trained"). Recall and quality are against the RigL set of the same
run. Times are medians over --repeats (the machine is shared: each repeat interleaves the methods);
peak memory is the rise of the process's peak RSS during the call (CPU) or of
torch.cuda.max_memory_allocated (CUDA), in MiB, and its ratio to a dense N x M float32 matrix.

Data: "random" = Gaussian dZ and X; "trained" = the hidden layer of an MLP 784 -> M -> N -> 10
(or the first layer of LeNet-300-100 for 300x784) trained for --train-steps SGD steps on
Fashion-MNIST, its inputs and output gradients captured on a fresh batch; falls back to
"random" (and says so) when the data set is not installed. --dense-max bounds the layers that get
the dense RigL reference (65536² is searched with exact only, the memory-light method).
"""
from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time

import torch
from torch import nn

from sparsegrow.search import top_pairs
from sparsegrow.search_grow import pair_scores
from sparsegrow.selection import select_top
from sparsegrow.topology import isin_sorted, sample_inactive

APPROX = ["faiss-flat", "faiss-ivf", "faiss-hnsw", "faiss-range", "hnswlib", "lsh"]


def peak_reset():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak_mib(base):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return (_status("VmHWM") - base) / 2**20


def _status(key):
    return int(re.search(rf"{key}:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def timed(fn):
    base = peak_reset()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0, peak_mib(base)


def rigl_grow(Z, X, n, excluded, gen):
    G = torch.mm(Z.t(), X)  # (N, M): the dense weight gradient
    scores = G.abs_().view(-1)
    scores[excluded] = -math.inf
    return select_top(scores, n, gen)


def random_data(N, M, B, density, seed, device):
    g = torch.Generator().manual_seed(seed)
    Z, X = torch.randn(B, N, generator=g), torch.randn(B, M, generator=g)
    active = sample_inactive(N * M, torch.empty(0, dtype=torch.long), int(density * N * M), g)
    return Z.to(device), X.to(device), active.to(device)


def trained_data(N, M, B, density, seed, steps, device):
    """Inputs and output gradients of a trained N x M layer, and its top-|w| active set."""
    from sparsegrow.experiments.data import load_dataset
    data = load_dataset("fashion_mnist")
    torch.manual_seed(seed)
    if (N, M) == (300, 784):
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100),
                              nn.ReLU(), nn.Linear(100, 10))
        layer = model[1]
    else:
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, M), nn.ReLU(), nn.Linear(M, N),
                              nn.ReLU(), nn.Linear(N, 10))
        layer = model[3]
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(data.train_y), (B,), generator=g)
        loss = nn.functional.cross_entropy(model(data.train_x[i].to(device)), data.train_y[i].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    got = {}
    h1 = layer.register_forward_hook(lambda m, a, o: got.__setitem__("x", a[0].detach()))
    h2 = layer.register_full_backward_hook(lambda m, gi, go: got.__setitem__("dz", go[0].detach()))
    i = torch.randint(0, len(data.train_y), (B,), generator=g)
    nn.functional.cross_entropy(model(data.train_x[i].to(device)), data.train_y[i].to(device)).backward()
    h1.remove(), h2.remove()
    nnz = int(density * N * M)
    active = torch.sort(torch.topk(layer.weight.detach().abs().view(-1), nnz).indices).values
    return got["dz"], got["x"], active


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["300x784", "1024x1024", "4096x4096"])
    ap.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.01])
    ap.add_argument("--data", nargs="+", default=["random", "trained"])
    ap.add_argument("--backends", nargs="+", default=["exact"] + APPROX)
    ap.add_argument("--k-similar", type=float, default=0.15)
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--approx-max", type=int, default=1 << 28,
                    help="largest N*M searched by the approximate backends")
    ap.add_argument("--dense-max", type=int, default=1 << 28,
                    help="largest N*M given the dense RigL reference (it needs N*M floats)")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    header = ("| shape | density | data | method | time s | ×GEMM | ×RigL | peak MiB | peak/dense | "
              "recall | quality | note |")
    print(header)
    print("|" + "---|" * 12)
    for shape in args.shapes:
        N, M = map(int, shape.split("x"))
        dense_mib = N * M * 4 / 2**20
        for density in args.densities:
            for source in args.data:
                note = ""
                if source == "trained":
                    if N * M > 1 << 24:
                        continue  # training a 16384² layer here would dominate the run
                    try:
                        Z, X, active = trained_data(N, M, args.batch, density, 0, args.train_steps, device)
                    except Exception as e:  # data set not installed: say so, use random
                        note, source = f"trained data unavailable ({type(e).__name__})", "random"
                if source == "random":
                    Z, X, active = random_data(N, M, args.batch, density, 0, device)
                n = int(round(args.fraction * active.numel()))
                methods = []
                if N * M <= args.dense_max:
                    methods += ["gemm", "rigl"]
                methods += [b for b in args.backends if b == "exact" or N * M <= args.approx_max]
                times = {m: [] for m in methods}
                peak, result, info = {}, {}, {}
                for _ in range(args.repeats):
                    for m in methods:
                        gen = torch.Generator().manual_seed(1)
                        if m == "gemm":
                            out, t, p = timed(lambda: torch.mm(Z.t(), X))
                            del out
                        elif m == "rigl":
                            out, t, p = timed(lambda: rigl_grow(Z, X, n, active, gen))
                            result[m] = out
                        else:
                            try:
                                (out, _, inf), t, p = timed(lambda: top_pairs(
                                    Z, X, n, active, gen, m, "abs_ip", args.k_similar))
                            except ImportError as e:
                                print(f"skip {m}: {e}", file=sys.stderr)
                                methods.remove(m)
                                continue
                            result[m], info[m] = out, inf
                        times[m].append(t)
                        peak[m] = max(peak.get(m, 0.0), p)
                ref = result.get("rigl")
                if ref is None:  # no dense reference: exact search is the oracle
                    ref = result.get("exact")
                best = float(pair_scores(Z, X, ref).sum()) if ref is not None else float("nan")
                t_gemm = statistics.median(times["gemm"]) if "gemm" in times else float("nan")
                t_rigl = statistics.median(times["rigl"]) if "rigl" in times else float("nan")
                for m in methods:
                    t = statistics.median(times[m])
                    rec = qual = float("nan")
                    if m not in ("gemm",) and ref is not None:
                        rec = float(isin_sorted(result[m], ref).float().mean())
                        qual = float(pair_scores(Z, X, result[m]).sum()) / best
                    extra = note
                    if m in info:
                        extra = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in info[m].items())
                    row = (f"| {N}×{M} | {density} | {source} | {m} | {t:.3f} | {t / t_gemm:.2f} | "
                           f"{t / t_rigl:.2f} | {peak[m]:.0f} | {peak[m] / dense_mib:.3f} | "
                           f"{rec:.3f} | {qual:.3f} | {extra} |")
                    print(row, flush=True)
                    rows.append(row)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n`python benchmarks/bench_grow.py {' '.join(sys.argv[1:])}`  \n")
            f.write(f"device: {device}, threads: {args.threads}, B={args.batch}, "
                    f"update fraction {args.fraction}, k_similar {args.k_similar}, "
                    f"repeats {args.repeats} (median)\n\n{header}\n|" + "---|" * 12 + "\n")
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
