"""Fixed cost of one SparseLinear forward + backward, on a layer so small the kernels are cheap.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_call_overhead.py
    PYTHONPATH=<other checkout> .venv/bin/python benchmarks/bench_call_overhead.py   # A/B

What is left at this size is Python and dispatch: the autograd.Function, three kernel calls and
their input checks (O(1) per call; the O(nnz) index checks run once per topology). One thread, so
OpenMP barriers on a shared machine do not dominate. Prints the median and the minimum over
--rounds of the mean time per forward + backward, and the same for a dense nn.Linear of the same
shape measured in the same run (the ratio is what compares across runs and checkouts).

Then, in the same run, one spmm call on that layer through `kernels.spmm` (input checks, the
cached O(nnz) check) against the unchecked backend call `kernels._spmm` (what a call cost before
validation existed), when this checkout has them.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from sparsegrow.layers import sparse_linear as sl
from sparsegrow.topology import sample_inactive


def per_call(fn, calls: int, rounds: int) -> float:
    for _ in range(calls // 5):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times), min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--nnz", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    n = args.width
    active = sample_inactive(n * n, torch.empty(0, dtype=torch.long), args.nnz, gen)
    layer = sl.SparseLinear(n, n, active, generator=gen)
    dense = nn.Linear(n, n)
    x = torch.randn(args.batch, n, generator=gen, requires_grad=True)
    t_sparse = per_call(lambda: layer(x).sum().backward(), args.calls, args.rounds)
    t_dense = per_call(lambda: dense(x).sum().backward(), args.calls, args.rounds)
    print(f"# bench_call_overhead: {n}x{n}, nnz {args.nnz}, batch {args.batch}, 1 thread, "
          f"torch {torch.__version__}, {sl.__file__}")
    for i, what in enumerate(("median", "min")):
        print(f"{what} over rounds: sparse forward+backward {t_sparse[i] * 1e6:.1f} us, dense "
              f"nn.Linear {t_dense[i] * 1e6:.1f} us, "
              f"sparse / dense {t_sparse[i] / t_dense[i]:.2f}x")

    from sparsegrow.layers import kernels
    if hasattr(kernels, "_spmm"):
        xt = x.detach().t().contiguous()
        v = layer.values.detach()
        args_ = (layer.crow, layer.col, v, xt, n)
        checked = per_call(lambda: kernels.spmm(*args_), args.calls * 5, args.rounds)
        raw = per_call(lambda: kernels._spmm(*args_), args.calls * 5, args.rounds)
        print(f"one spmm call (median / min over rounds): checked {checked[0] * 1e6:.1f} / "
              f"{checked[1] * 1e6:.1f} us, unchecked {raw[0] * 1e6:.1f} / {raw[1] * 1e6:.1f} us, "
              f"checked / unchecked {checked[0] / raw[0]:.2f}x / {checked[1] / raw[1]:.2f}x")


if __name__ == "__main__":
    main()
