"""Bytes per connection of a truly sparse layer in training, broken down, int32 vs int64 indices.

    PYTHONPATH=. python benchmarks/bench_bytes_per_connection.py > benchmarks/results/bench_bytes_per_connection.md

For each case a one-layer model (nn.Sequential(nn.Linear(M, N))) is made sparse by the
Sparsifier (method "set", storage "sparse", float32), trained one step with Adam, and every
tensor that lives as long as the layer is counted, divided by nnz:
    values              the weights (float32)
    crow, col           the CSR pattern (saved in checkpoints)
    ccol, row_t, perm   the transposed view backward needs (rebuilt, never saved)
    grad                values.grad
    Adam                exp_avg + exp_avg_sq (the scalar `step` is not per connection)
    ITOP record         the Sparsifier's `ever_active`: one int64 flat index per connection ever
                        active (= nnz right after construction), growing with every update up to
                        max(nnz, 2^20) indices, then a 16 KiB sketch (metrics.EverActive)
The bias (per output unit) is left out. "int64" forces every index buffer to int64 (what every
layer stored before int32 indices; sparse_linear._FORCE_INDEX_DTYPE), "int32" is the default
choice (`sparse_linear.index_dtype`). The row/column pointers cost (N + 1) / nnz and
(M + 1) / nnz per connection, so they dominate at very low density.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import sparsegrow as sg
from sparsegrow.layers import sparse_linear as sl

CASES = [(784, 65536, 0.001), (16384, 16384, 0.001), (1_000_000, 1_000_000, 1e-6)]
INDEX = ("crow", "col", "ccol", "row_t", "perm")


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure(m: int, n: int, density: float, index_dtype, batch: int) -> dict:
    sl._FORCE_INDEX_DTYPE = index_dtype
    try:
        torch.manual_seed(0)
        with torch.device("meta"):  # no dense (N, M) weight, even at 10^6 x 10^6
            model = nn.Sequential(nn.Linear(m, n))
        sp = sg.Sparsifier(model, density=density, method="set", storage="sparse", seed=0,
                           schedule=sg.UpdateSchedule(every=100, end=1000))
        layer = model[0]
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        sp.attach(opt)
        x = torch.randn(batch, m)
        y = torch.randint(0, n, (batch,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
    finally:
        sl._FORCE_INDEX_DTYPE = None
    nnz = layer.nnz()
    row = {"nnz": nnz, "dtype": str(layer.index_dtype()).replace("torch.", ""),
           "values": nbytes(layer.values)}
    row.update({name: nbytes(getattr(layer, name)) for name in INDEX})
    row["grad"] = nbytes(layer.values.grad)
    state = opt.state[layer.values]
    row["adam"] = sum(nbytes(v) for v in state.values()
                      if isinstance(v, torch.Tensor) and v.numel() == nnz)
    row["itop"] = sum(v.nbytes() for v in sp.ever_active.values())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    print("# bench_bytes_per_connection: memory per connection of a sparse layer in training\n")
    print("Command: `PYTHONPATH=. python benchmarks/bench_bytes_per_connection.py`\n")
    print(f"torch {torch.__version__}; float32 values, Adam, one training step (batch "
          f"{args.batch}); bytes / nnz, bias excluded.\n")
    cols = ["values", *INDEX, "indices", "grad", "adam", "itop", "total", "checkpoint"]
    print("| layer (M→N) | density | nnz | index dtype | " + " | ".join(cols) + " |")
    print("|---|---|---|---|" + "---|" * len(cols))
    for m, n, d in CASES:
        for it in (torch.int64, None):
            r = measure(m, n, d, it, args.batch)
            r["indices"] = sum(r[k] for k in INDEX)
            r["total"] = r["values"] + r["indices"] + r["grad"] + r["adam"] + r["itop"]
            r["checkpoint"] = r["values"] + r["crow"] + r["col"]  # what state_dict saves
            per = [f"{r[k] / r['nnz']:.2f}" for k in cols]
            print(f"| {m}→{n} | {d:g} | {r['nnz']} | {r['dtype']} | " + " | ".join(per) + " |",
                  flush=True)
    print("\n`indices` = crow + col + ccol + row_t + perm; `total` = values + indices + grad + "
          "Adam + ITOP record; `checkpoint` = values + crow + col (the layer's state_dict, "
          "without optimizer and Sparsifier state).")


if __name__ == "__main__":
    main()
