"""A truly sparse layer's topology rebuild: the CSC view's perm by counting sort vs stable sort.

    .venv/bin/python benchmarks/bench_csc_perm.py                 # the scale config's two layers
    .venv/bin/python benchmarks/bench_csc_perm.py --layers 65536x65536:4294967 --repeats 5

Every topology update rebuilds a SparseLinear's index buffers from its sorted active set
(CSRModule._set_topology): the CSR pointers, and the CSC view (ccol, row_t, perm) that the
backward kernel walks. perm, the nnz's column-major order with rows ascending, was a stable
torch.sort of the column indices (O(nnz log nnz)); kernels.csc_order now scatters them by a
counting sort over the columns (O(nnz + m)) on CPU. For each layer (out x in : nnz, uniform
connections) this times the perm alone and the whole rebuild with each, interleaved, median of
--repeats, and checks that both give the same buffers.
"""
from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the CLI sets it

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from sparsegrow.layers import kernels  # noqa: E402
from sparsegrow.layers.sparse_linear import SparseLinear  # noqa: E402
from sparsegrow.topology import sample_inactive  # noqa: E402


def stable_sort_order(col: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rebuild's CSC view before session 11: the column pointer and a stable sort."""
    ccol = torch.cat([col.new_zeros(1), torch.bincount(col, minlength=m).cumsum(0)])
    return ccol, torch.sort(col, stable=True).indices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", nargs="+", default=["1000000x784:20000000", "1000000x1000000:40000000"],
                    help="OUTxIN:NNZ")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    counting = kernels.csc_order
    print(f"{args.threads} thread(s), median of {args.repeats} (interleaved), C kernels: "
          f"{kernels._c_lib() is not None}\n")
    print("| layer (out x in, nnz) | perm: stable sort s | perm: counting sort s | rebuild with stable sort s "
          "| rebuild with counting sort s | rebuild ratio |\n|---|---|---|---|---|---|")
    for spec in args.layers:
        shape, nnz = spec.split(":")
        n, m = (int(v) for v in shape.split("x"))
        nnz = int(nnz)
        flat = sample_inactive(n * m, torch.empty(0, dtype=torch.long), nnz,
                               torch.Generator().manual_seed(0))
        layer = SparseLinear(m, n, flat, bias=False)
        col = flat % m
        times = {"stable": ([], []), "counting": ([], [])}
        buffers = {}
        try:
            for rep in range(args.repeats + 1):  # round 0 warms up (C build, page faults)
                for name, fn in (("stable", stable_sort_order), ("counting", counting)):
                    t0 = time.perf_counter()
                    view = fn(col, m)
                    t1 = time.perf_counter()
                    del view
                    kernels.csc_order = fn  # what _set_topology calls
                    t2 = time.perf_counter()
                    layer._set_topology(flat)
                    t3 = time.perf_counter()
                    kernels.csc_order = counting
                    buffers[name] = [getattr(layer, b).clone() for b in ("ccol", "row_t", "perm")]
                    if rep:
                        times[name][0].append(t1 - t0)
                        times[name][1].append(t3 - t2)
        finally:
            kernels.csc_order = counting
        same = all(torch.equal(a, b) for a, b in zip(buffers["stable"], buffers["counting"]))
        assert same, "the counting sort's CSC view differs from the stable sort's"
        (sp, sr), (cp, cr) = ((statistics.median(a), statistics.median(b)) for a, b in times.values())
        print(f"| {n}x{m}, {nnz} | {sp:.3f} | {cp:.3f} | {sr:.3f} | {cr:.3f} | {sr / cr:.2f}x |",
              flush=True)
        del layer, flat, col, buffers


if __name__ == "__main__":
    main()
