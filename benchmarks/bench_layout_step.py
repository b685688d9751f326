"""A truly sparse layer's step on a hub layout (as gradient growth leaves it) vs a uniform one.

    .venv/bin/python benchmarks/bench_layout_step.py                      # 10⁶², 40 M connections
    .venv/bin/python benchmarks/bench_layout_step.py --width 262144 --nnz 10000000 --threads 1

Gradient growth gathers connections on hub units (configs/scale_1m.yaml grown by `auto`, step
560: the 1% best-connected input units of the 10⁶² layer held 29.3% of its 40 M connections, the
1% best-connected output units 15.4%; benchmarks/results/layer_degrees_scale_1m_auto.txt), where
SET's draws stay uniform (1.4%). This measures what that layout costs per step: the same layer
(width², nnz connections, batch B) with a uniform layout and with a Chung–Lu layout (pair
probability ∝ a_j · b_i, lognormal a and b whose top 1% hold --top-out / --top-in of the mass),
forward (SpMM) and backward (dW at the nnz and dX) timed separately, interleaved uniform / hub,
the median of --repeats, and the hub/uniform ratio printed. Each layout's realised top-1% shares
are printed beside it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparsegrow.layers.sparse_linear import SparseLinear


def _lognormal_with_top_share(n: int, share: float, gen: torch.Generator) -> torch.Tensor:
    """(n,) positive weights, lognormal, whose largest 1% hold `share` of the sum (bisection on
    sigma; share <= 0.01 gives equal weights)."""
    z = torch.randn(n, generator=gen, dtype=torch.float64)
    if share <= 0.01:
        return torch.ones(n, dtype=torch.float64)
    k = max(1, n // 100)

    def top(sigma: float) -> float:
        w = (sigma * z).exp()
        return float(w.topk(k).values.sum() / w.sum())

    lo, hi = 0.0, 6.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if top(mid) < share else (lo, mid)
    return (lo * z).exp()


def _draw(width: int, nnz: int, top_out: float, top_in: float, seed: int) -> torch.Tensor:
    """Sorted flat indices j * width + i of exactly nnz distinct pairs, P(j, i) ∝ a_j b_i."""
    gen = torch.Generator().manual_seed(seed)
    a = _lognormal_with_top_share(width, top_out, gen)
    b = _lognormal_with_top_share(width, top_in, gen)
    ca, cb = a.cumsum(0), b.cumsum(0)
    ca, cb = ca / ca[-1], cb / cb[-1]
    got = torch.empty(0, dtype=torch.long)
    while got.numel() < nnz:  # hubs collide: draw again until nnz distinct pairs
        m = int((nnz - got.numel()) * 1.2) + 1024
        j = torch.searchsorted(ca, torch.rand(m, generator=gen, dtype=torch.float64)).clamp_(max=width - 1)
        i = torch.searchsorted(cb, torch.rand(m, generator=gen, dtype=torch.float64)).clamp_(max=width - 1)
        got = torch.unique(torch.cat([got, j * width + i]))
    keep = torch.randperm(got.numel(), generator=gen)[:nnz]
    return got[keep].sort().values


def _top_share(counts: torch.Tensor) -> float:
    k = max(1, counts.numel() // 100)
    return float(counts.topk(k).values.sum() / counts.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1_000_000)
    ap.add_argument("--nnz", type=int, default=40_000_000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--top-out", type=float, default=0.154, help="share of the top 1%% of output units")
    ap.add_argument("--top-in", type=float, default=0.293, help="share of the top 1%% of input units")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.width
    layouts = {"uniform": (0.0, 0.0), "hub": (args.top_out, args.top_in)}
    layers = {}
    for name, (to, ti) in layouts.items():
        t0 = time.perf_counter()
        active = _draw(n, args.nnz, to, ti, seed=1)
        rows, cols = active // n, active % n
        print(f"{name}: {args.nnz} connections drawn in {time.perf_counter() - t0:.1f} s; top 1% of "
              f"output units hold {_top_share(torch.bincount(rows, minlength=n)):.3f}, of input "
              f"units {_top_share(torch.bincount(cols, minlength=n)):.3f}", flush=True)
        layers[name] = SparseLinear(n, n, active, bias=False)
        del active, rows, cols
    x = torch.randn(args.batch, n, requires_grad=True)
    dy = torch.randn(args.batch, n)
    times = {name: {"forward": [], "backward": []} for name in layers}
    for rep in range(args.repeats + 1):  # the first round warms up (page faults, kernel build)
        for name, layer in layers.items():  # interleaved: the machine's load hits both alike
            x.grad, layer.values.grad = None, None
            t0 = time.perf_counter()
            y = layer(x)
            t1 = time.perf_counter()
            y.backward(dy)
            t2 = time.perf_counter()
            if rep:
                times[name]["forward"].append(t1 - t0)
                times[name]["backward"].append(t2 - t1)
            del y
    print(f"\n{n}² layer, {args.nnz} connections, B={args.batch}, {args.threads} thread(s), "
          f"median of {args.repeats} (interleaved):")
    print("| layout | forward s | backward s | step s (fwd + bwd) |\n|---|---|---|---|")
    med = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    for name, m in med.items():
        print(f"| {name} | {m['forward']:.3f} | {m['backward']:.3f} | {m['forward'] + m['backward']:.3f} |")
    u, h = med["uniform"], med["hub"]
    print(f"hub / uniform: forward {h['forward'] / u['forward']:.2f}×, backward "
          f"{h['backward'] / u['backward']:.2f}×, step "
          f"{(h['forward'] + h['backward']) / (u['forward'] + u['backward']):.2f}×")


if __name__ == "__main__":
    main()
