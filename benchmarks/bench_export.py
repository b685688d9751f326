"""Exported sparse models: file size vs the dense state_dict, and inference time, in one run.

    python benchmarks/bench_export.py --repeats 7 --threads 1

For LeNet-300-100 (784-300-100-10) at density 0.02 and 784-4096-4096-10 at density 0.01 (ERK,
masked storage; weights as after construction, which is what the sizes and times depend on):
export with `sparsegrow.export_sparse`, load with `sparsegrow.load_sparse` into a meta-device
skeleton (Linear -> SparseLinear), and compare against the same model's dense state_dict
(torch.save) and dense nn.Linear inference. Checks that both give the same outputs. Prints the
median time per batch over repeats and the ratios.
"""
from __future__ import annotations

import argparse
import os
import sys
import io
import tempfile
from pathlib import Path

import torch
from torch import nn

import sparsegrow as sg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _device  # noqa: E402

CASES = [("lenet-300-100", [784, 300, 100, 10], 0.02), ("784-4096-4096-10", [784, 4096, 4096, 10], 0.01)]


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}")
    print("| model | density | dense state_dict | export file | size ratio | batch | dense ms | "
          "sparse ms | speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, sizes, density in CASES:
        torch.manual_seed(0)
        model = mlp(sizes)
        sg.Sparsifier(model, density, method="static", distribution="erk")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.safetensors"
            sg.export_sparse(model, path)
            file_bytes = path.stat().st_size
            with torch.device("meta"):
                skeleton = mlp(sizes)
            loaded = sg.load_sparse(path, skeleton)
        dense = mlp(sizes)  # the plain dense model with the same (zero-filled) weights
        dense.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("_mask")})
        buf = io.BytesIO()
        torch.save(dense.state_dict(), buf)
        dense_bytes = buf.getbuffer().nbytes
        dense.eval()
        for b in args.batch:
            x = torch.randn(b, sizes[0])
            with torch.no_grad():
                torch.testing.assert_close(loaded(x), dense(x), rtol=1e-4, atol=1e-5)
                td = _device.median_time(lambda: dense(x), args.repeats)
                ts = _device.median_time(lambda: loaded(x), args.repeats)
            print(f"| {name} | {density} | {dense_bytes / 1e6:.2f} MB | {file_bytes / 1e6:.3f} MB | "
                  f"{dense_bytes / file_bytes:.1f}x smaller | {b} | {td * 1e3:.3f} | {ts * 1e3:.3f} | "
                  f"{td / ts:.2f}x |")


if __name__ == "__main__":
    main()
