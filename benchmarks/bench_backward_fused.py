"""A truly sparse layer's backward with both gradients (dW at the nnz and dX): the SDDMM and
the transposed SpMM apart (two random row gathers per connection; the code before session 6)
vs one pass over the weight's columns (kernels.csc_grads, one gather), interleaved A/B.

    .venv/bin/python benchmarks/bench_backward_fused.py --n 1000000 --nnz 40000000 --threads 2

The pattern is uniform random (N × N, nnz connections, int32 indices: a 10⁶ × 10⁶ layer at
ε = 20), B = 128. Checks both give the same numbers, then prints each one's median over
--repeats and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparsegrow.layers import kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--nnz", type=int, default=40_000_000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels.set_backend("c")
    n, g = args.n, torch.Generator().manual_seed(0)
    flat = torch.unique(torch.randint(0, n * n, (args.nnz,), generator=g))
    rows, cols = flat // n, flat % n
    del flat
    crow = torch.zeros(n + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    perm = torch.sort(cols, stable=True).indices  # column-major order of the row-major values
    ccol = torch.zeros(n + 1, dtype=torch.long)
    ccol[1:] = torch.cumsum(torch.bincount(cols, minlength=n), 0)
    crow, col, ccol, row_t, perm = crow.int(), cols.int(), ccol.int(), rows[perm].int(), perm.int()
    del rows, cols
    values = torch.randn(perm.numel(), generator=g)
    xt = torch.randn(n, args.batch, generator=g)  # X^T (M, B)
    dyt = torch.randn(n, args.batch, generator=g)  # dY^T (N, B)

    def apart():
        dv = kernels.sddmm(crow, col, dyt, xt)
        return kernels.spmm(ccol, row_t, values[perm], dyt, n), dv

    def fused():
        return kernels.csc_grads(crow, col, ccol, row_t, perm, values, dyt, xt)

    (a_dx, a_dv), (b_dx, b_dv) = apart(), fused()
    assert torch.equal(a_dx, b_dx) and torch.equal(a_dv, b_dv), "the two differ"
    del a_dx, a_dv, b_dx, b_dv
    names = ("SDDMM + transposed SpMM (apart)", "one pass over the columns (csc_grads)")
    times = {k: [] for k in names}
    for _ in range(args.repeats):
        for name, fn in zip(names, (apart, fused)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"N = M = {n:,}, nnz = {perm.numel():,}, B = {args.batch}, {args.threads} threads, "
          f"median of {args.repeats} (interleaved); same results bit for bit")
    for name, m in med.items():
        print(f"  {name}: {m:.3f} s   (all: {', '.join(f'{t:.3f}' for t in times[name])})")
    a, b = med.values()
    print(f"  fused / apart: {b / a:.3f}  ({a - b:.3f} s saved per backward of this layer)")


if __name__ == "__main__":
    main()
