"""Per-row candidate kernel for sampled growth: draw, deduplicate, exclude, score in one pass.

The sampled backends draw their pairs row by row (row j of S = Zᵀ X gets a Poisson number of
draws), so each row's candidates can be deduplicated with a stamp array over the M columns and
excluded with the row's active columns, with no sort of the whole candidate set; the survivors of a
row are sorted (a few hundred at most) and scored with one dot product each. Output is the sorted
flat keys, as the torch path (`sampled._candidates_torch`) gives with a global sort.

Each draw is the same inverse-CDF lookup as torch's searchsorted(right=True) on the same float64
tables and uniforms (a binary search within the row's slice of the table), so both paths draw the same
pairs; the C path is the CPU default, the torch path the fallback and the test oracle.
"""
from __future__ import annotations

import ctypes

import torch

from .. import _native

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

/* First k in [lo, hi) with cum[k] > v (clamped to hi - 1): torch.searchsorted(right=True). */
static inline int64_t first_above(const double* cum, int64_t lo, int64_t hi, double start,
                                  double u, double mass) {
  volatile double t = u * mass;  /* rounded as torch rounds it: no fused multiply-add */
  const double v = start + t;
  int64_t a = lo, b = hi;
  while (a < b) { int64_t m = a + (b - a) / 2; if (cum[m] > v) b = m; else a = m + 1; }
  return a < hi ? a : hi - 1;
}
static int cmp_i64(const void* a, const void* b) {
  int64_t x = *(const int64_t*)a, y = *(const int64_t*)b; return (x > y) - (x < y);
}

/* Row j gets draws [dptr[j], dptr[j+1]). For each draw d:
     r  = first_above(rcum, j*R, (j+1)*R, rstart[j] + u1[d]*rmass[j]) - j*R   (if rcum; else 0)
     i  = first_above(icum, r*M, (r+1)*M, istart[r] + u2[d]*imass[r]) - r*M
     r2 = first_above(ccum, j*R, (j+1)*R, cstart[j] + u3[d]*cmass[j]) - j*R   (diamond, if ccum)
     w  = sign(Z[r,j] Z[r2,j] X[r,i]) X[r2,i] cmass[j]                          (diamond)
   Distinct inactive columns of the row (active: acol[aptr[j]..aptr[j+1]]) are written sorted at
   out_i[dptr[j]..], with S_ji = <zt[j], xt[i]> in out_s; diamond keeps those with summed w > 0.
   cnt[j] = how many were written; ndist[j] = distinct before exclusion. */
void sg_row_candidates(int64_t N, int64_t M, int64_t R, const int64_t* dptr,
                       const double* u1, const double* u2, const double* u3,
                       const double* rcum, const double* rstart, const double* rmass,
                       const double* icum, const double* istart, const double* imass,
                       const double* ccum, const double* cstart, const double* cmass,
                       const float* zt, const float* xt, const int64_t* aptr, const int64_t* acol,
                       int64_t* out_i, float* out_s, int64_t* cnt, int64_t* ndist, int threads) {
  #pragma omp parallel num_threads(threads)
  {
    int64_t* stamp = (int64_t*)malloc(sizeof(int64_t) * M);
    int64_t* slot = (int64_t*)malloc(sizeof(int64_t) * M);
    double* acc = NULL; int64_t cap = 0;
    for (int64_t k = 0; k < M; ++k) stamp[k] = -1;
    #pragma omp for schedule(dynamic, 64)
    for (int64_t j = 0; j < N; ++j) {
      const int64_t d0 = dptr[j], d1 = dptr[j + 1];
      if (d1 == d0) { cnt[j] = 0; ndist[j] = 0; continue; }
      const int64_t act = 2 * j + 1, seen = 2 * j + 2;  /* stamps unique to row j */
      for (int64_t k = aptr[j]; k < aptr[j + 1]; ++k) stamp[acol[k]] = act;
      if (ccum && cap < d1 - d0) { free(acc); cap = d1 - d0; acc = (double*)malloc(sizeof(double) * cap); }
      int64_t c = 0, nd = 0;
      for (int64_t d = d0; d < d1; ++d) {
        int64_t r = 0;
        if (rcum) r = first_above(rcum, j * R, (j + 1) * R, rstart[j], u1[d], rmass[j]) - j * R;
        const int64_t i = first_above(icum, r * M, (r + 1) * M, istart[r], u2[d], imass[r]) - r * M;
        double w = 0;
        if (ccum) {
          const int64_t r2 = first_above(ccum, j * R, (j + 1) * R, cstart[j], u3[d], cmass[j]) - j * R;
          const float s = zt[j * R + r] * zt[j * R + r2] * xt[i * R + r];
          w = (double)(s > 0 ? 1.f : (s < 0 ? -1.f : 0.f)) * (double)xt[i * R + r2] * cmass[j];
        }
        if (stamp[i] == act) continue;
        if (stamp[i] != seen) {
          stamp[i] = seen; slot[i] = c; out_i[d0 + c] = i; if (ccum) acc[c] = 0; ++c; ++nd;
        }
        if (ccum) acc[slot[i]] += w;
      }
      if (ccum) {  /* keep positive estimates only */
        int64_t k2 = 0;
        for (int64_t k = 0; k < c; ++k) if (acc[k] > 0) out_i[d0 + k2++] = out_i[d0 + k];
        c = k2;
      }
      qsort(out_i + d0, c, sizeof(int64_t), cmp_i64);
      const float* zr = zt + j * R;
      for (int64_t k = 0; k < c; ++k) {
        const float* xr = xt + out_i[d0 + k] * R;
        float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  /* 8 lanes: the compiler vectorises */
        int64_t q = 0;
        for (; q + 8 <= R; q += 8)
          for (int u = 0; u < 8; ++u) part[u] += zr[q + u] * xr[q + u];
        float s = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
        for (; q < R; ++q) s += zr[q] * xr[q];
        out_s[d0 + k] = s;
        out_i[d0 + k] += j * M;
      }
      cnt[j] = c; ndist[j] = nd;
    }
    free(stamp); free(slot); free(acc);
  }
}
"""


def lib():
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    return _native.load("sample_candidates", _SOURCE, {"sg_row_candidates": (
        [i64, i64, i64] + [p] * 21 + [ctypes.c_int], None)})


def row_candidates(N, M, R, dptr, u1, u2, u3, rtab, itab, ctab, zt, xt, aptr, acol):
    """Run the kernel: -> (sorted flat keys, scores S_ji, distinct-drawn count) or None when no C
    compiler is available (the caller then runs the torch path)."""
    c_lib = lib()
    if c_lib is None:
        return None
    total = int(dptr[-1])
    out_i = torch.empty(total, dtype=torch.long)
    out_s = torch.empty(total, dtype=torch.float32)
    cnt = torch.empty(N, dtype=torch.long)
    ndist = torch.empty(N, dtype=torch.long)

    def ptr(t):
        return None if t is None else t.data_ptr()

    rc, rs, rm = rtab if rtab is not None else (None, None, None)
    cc, cs, cm = ctab if ctab is not None else (None, None, None)
    ic, is_, im = itab
    c_lib.sg_row_candidates(N, M, R, ptr(dptr), ptr(u1), ptr(u2), ptr(u3), ptr(rc), ptr(rs),
                            ptr(rm), ptr(ic), ptr(is_), ptr(im), ptr(cc), ptr(cs), ptr(cm),
                            ptr(zt), ptr(xt), ptr(aptr), ptr(acol), ptr(out_i), ptr(out_s),
                            ptr(cnt), ptr(ndist), torch.get_num_threads())
    keep = torch.arange(total) < torch.repeat_interleave(dptr[:-1] + cnt, dptr.diff())
    return out_i[keep], out_s[keep], int(ndist.sum())
