"""The random-sign sketch of a Conv2d's (dZ, patch) rows without unfolding the input.

`signals.sketch_rows` on `signals.conv_rows` unfolds the input into B·P patch rows
(B·P × C·kh·kw floats, 9× the input for a 3×3 kernel), transposes them into row order and then
adds each row into its bucket: three memory passes over a tensor far larger than the layer. On
WRN-10-1 (batch 128, 32×32) that cost 0.32 s per step, 3.6× the whole forward and backward.
The C kernel here reads each input pixel where the patch would and adds it straight into the
bucket's row, so no patch is stored: S_x[r, c, ky, kx] += σ · x[b, c, iy, ix] and
S_z[r, o] += σ · dZ[b, o, oy, ox] for the row (b, oy, ox) with bucket r and sign σ. Rows are
visited in the unfolded row order (b, oy, ox) and added one by one, as index_add_ does, so the
result is the same sum as the unfolding path (tests compare the two).

It runs on one thread, like search/compact.py: a few milliseconds of work per layer, right
after torch's own OpenMP backward, where a second thread pool would spin against torch's.
"""
from __future__ import annotations

import ctypes

import torch
from torch import nn

from . import _native

_SOURCE = r"""
#include <stdint.h>
/* x: (B, C, H, W), dz: (B, O, Ho, Wo), row = (b * Ho + oy) * Wo + ox indexes bucket/sign.
   sx: (s, C, KH, KW) and sz: (s, O), both added into. */
void sg_conv_sketch_f32(const float* x, const float* dz, const int64_t* bucket, const float* sign,
                        int64_t B, int64_t C, int64_t H, int64_t W, int64_t O, int64_t Ho,
                        int64_t Wo, int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t ph,
                        int64_t pw, int64_t dh, int64_t dw, float* sx, float* sz) {
  const int64_t M = C * KH * KW, P = Ho * Wo;
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * C * H * W;
    const float* zb = dz + b * O * P;
    for (int64_t oy = 0; oy < Ho; ++oy) {
      for (int64_t ox = 0; ox < Wo; ++ox) {
        const int64_t p = oy * Wo + ox, row = b * P + p;
        const float s = sign[row];
        float* outx = sx + bucket[row] * M;
        float* outz = sz + bucket[row] * O;
        for (int64_t o = 0; o < O; ++o) outz[o] += s * zb[o * P + p];
        for (int64_t c = 0; c < C; ++c) {
          const float* xc = xb + c * H * W;
          float* oc = outx + c * KH * KW;
          for (int64_t ky = 0; ky < KH; ++ky) {
            const int64_t iy = oy * sh - ph + ky * dh;
            if (iy < 0 || iy >= H) continue;  /* zero padding adds nothing */
            const float* xr = xc + iy * W;
            float* ok = oc + ky * KW;
            for (int64_t kx = 0; kx < KW; ++kx) {
              const int64_t ix = ox * sw - pw + kx * dw;
              if (ix >= 0 && ix < W) ok[kx] += s * xr[ix];
            }
          }
        }
      }
    }
  }
}
"""


def _lib():
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    # x, dz, bucket, sign; B, C, H, W, O, Ho, Wo, KH, KW, sh, sw, ph, pw, dh, dw; sx, sz
    return _native.load("conv_sketch", _SOURCE,
                        {"sg_conv_sketch_f32": ([p, p, p, p] + [i64] * 15 + [p, p], None)})


def conv_sketch_applies(x: torch.Tensor, dz: torch.Tensor) -> bool:
    """Whether the C kernel takes these (CPU float32, compiler found); otherwise unfold."""
    return x.device.type == "cpu" and dz.device.type == "cpu" and x.dtype == torch.float32 \
        and dz.dtype == torch.float32 and _lib() is not None


def conv_sketch_into(conv: nn.Conv2d, padding: tuple[int, int], x: torch.Tensor, dz: torch.Tensor,
                     bucket: torch.Tensor, sign: torch.Tensor,
                     out: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Add the sketch of the rows of (x: (B, C, H, W), dz: (B, O, Ho, Wo)) into out = (S_z (s, O),
    S_x (s, C·kh·kw)), row (b, oy, ox) going to bucket[row] with sign[row] (both (B·Ho·Wo,)).

    Only where `conv_sketch_applies(x, dz)`."""
    if not conv_sketch_applies(x, dz) or sign.dtype != torch.float32 \
            or bucket.dtype != torch.int64 or any(o.dtype != torch.float32 or o.device.type != "cpu"
                                                 or not o.is_contiguous() for o in out) \
            or bucket.device.type != "cpu" or sign.device.type != "cpu":
        raise ValueError("conv_sketch_into takes CPU float32 x, dz, sign and out, int64 bucket")
    if x.dim() != 4 or dz.dim() != 4 or x.shape[0] != dz.shape[0]:
        raise ValueError(f"conv_sketch_into takes x (B, C, H, W) and dz (B, O, Ho, Wo), got "
                         f"{tuple(x.shape)} and {tuple(dz.shape)}")
    B, C, H, W = x.shape
    _, O, Ho, Wo = dz.shape
    KH, KW = conv.kernel_size
    s = out[0].shape[0]
    if out[0].shape != (s, O) or out[1].shape != (s, C * KH * KW):
        raise ValueError(f"conv_sketch_into: out must be (S_z ({s}, {O}), S_x ({s}, {C * KH * KW}))"
                         f", got {tuple(out[0].shape)} and {tuple(out[1].shape)}")
    if bucket.shape != (B * Ho * Wo,) or sign.shape != (B * Ho * Wo,):
        raise ValueError(f"conv_sketch_into: bucket and sign need one entry per row (B*Ho*Wo = "
                         f"{B * Ho * Wo},), got {tuple(bucket.shape)} and {tuple(sign.shape)}")
    if bucket.numel():  # one O(B*Ho*Wo) pass; the kernel's own work is C*KH*KW times that
        lo, hi = (int(v) for v in torch.aminmax(bucket))
        if lo < 0 or hi >= s:
            raise ValueError(f"conv_sketch_into: bucket indices must lie in [0, {s}), got "
                             f"[{lo}, {hi}]")
    lib = _lib()
    x, dz = x.contiguous(), dz.contiguous()
    bucket, sign = bucket.contiguous(), sign.contiguous()
    lib.sg_conv_sketch_f32(x.data_ptr(), dz.data_ptr(), bucket.data_ptr(), sign.data_ptr(),
                           B, C, H, W, O, Ho, Wo, KH, KW, *conv.stride, *padding, *conv.dilation,
                           out[1].data_ptr(), out[0].data_ptr())
