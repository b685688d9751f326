"""The random-sign sketch of a Conv2d's (dZ, patch) rows: fused C kernel vs unfolding, per layer.

    python benchmarks/bench_conv_sketch.py --repeats 7

For each conv layer shape of WRN-10-1 on 32x32 inputs at batch 128 (the thesis tables' model),
times one layer's sketch (s = 256 rows) both ways, on the same input, output gradient, buckets and
signs: the unfolding path (`signals.conv_rows` + the index_add of `signals.sketch_rows`: im2col, transpose into
rows, index_add) and the fused kernel (`conv_sketch.conv_sketch_into`, no patches stored). Also
times the layer's own weight gradient (`torch.nn.grad.conv2d_weight`) as the yardstick. Prints
medians over repeats and the ratios, and checks that both paths give the same sketch.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

from sparsegrow import conv_sketch
from sparsegrow.signals import _conv_padding, _hash_rows, conv_rows

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _device  # noqa: E402

# (in, out, kernel, stride, input H=W): WRN-10-1's convs at 32x32 input
SHAPES = [(1, 16, 3, 1, 32), (16, 16, 3, 1, 32), (16, 32, 3, 2, 32), (32, 32, 3, 1, 16),
          (16, 32, 1, 2, 32), (32, 64, 3, 2, 16), (64, 64, 3, 1, 8), (32, 64, 1, 2, 16)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--sketch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if conv_sketch._lib() is None:
        raise SystemExit("the C kernel did not build (no C compiler?): nothing to compare")
    print(f"batch {args.batch}, sketch {args.sketch} rows, {args.threads} thread(s), "
          f"median of {args.repeats}; times in ms")
    print("| conv (in→out, k, stride, H) | rows B·P | unfold + index_add | fused | speed-up | "
          "weight gradient | fused / weight grad |")
    print("|---|---|---|---|---|---|---|")
    tot_u = tot_f = 0.0
    for cin, cout, k, stride, hw in SHAPES:
        conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, cin, hw, hw, generator=g)
        dz = torch.randn(conv(x).shape, generator=g)
        rows = dz.shape[0] * dz.shape[2] * dz.shape[3]
        bucket, sign = _hash_rows(rows, args.sketch, torch.Generator().manual_seed(1), "cpu", torch.float32)
        pad = _conv_padding(conv)

        def unfolded():
            Z, X = conv_rows(conv, x, dz)
            out = (Z.new_zeros(args.sketch, cout), X.new_zeros(args.sketch, X.shape[1]))
            out[0].index_add_(0, bucket, Z * sign[:, None])
            out[1].index_add_(0, bucket, X * sign[:, None])
            return out

        def fused():
            out = (torch.zeros(args.sketch, cout), torch.zeros(args.sketch, cin * k * k))
            conv_sketch.conv_sketch_into(conv, pad, x, dz, bucket, sign, out)
            return out

        ref, got = unfolded(), fused()
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-3) for a, b in zip(ref, got))
        t_u, t_f = _device.median_time(unfolded, args.repeats), _device.median_time(fused, args.repeats)
        t_w = _device.median_time(lambda: torch.nn.grad.conv2d_weight(x, conv.weight.shape, dz, stride=stride,
                                                              padding=pad), args.repeats)
        tot_u, tot_f = tot_u + t_u, tot_f + t_f
        print(f"| {cin}→{cout}, {k}, {stride}, {hw} | {rows} | {1e3 * t_u:.2f} | {1e3 * t_f:.2f} | "
              f"{t_u / t_f:.1f}× | {1e3 * t_w:.2f} | {t_f / t_w:.2f} |")
    print(f"| all layers | | {1e3 * tot_u:.1f} | {1e3 * tot_f:.1f} | {tot_u / tot_f:.1f}× | | |")


if __name__ == "__main__":
    main()
