"""Sparse x dense kernels for truly sparse layers: SpMM and SDDMM on a CSR weight.

A weight W (n_rows, n_cols) is stored in CSR: `ptr` (n_rows + 1,), `idx` (nnz,) column indices
sorted within each row, `val` (nnz,). ptr and idx are int32 or int64, both the same: every backend
reads int32 natively (the C kernels are compiled for both index types; nothing is widened per
call), so a layer whose dimensions and nnz fit in int32 stores 4 bytes per index, not 8.
Activations are passed *feature-major*, i.e. transposed to (features, B) and contiguous, so each
nnz touches one contiguous row of B numbers:

    spmm(ptr, idx, val, xt, n_rows)   -> (n_rows, B)     out[r] = sum_k val[k] * xt[idx[k]]
    sddmm(ptr, idx, a, b)             -> (nnz,)          out[k] = <a[row_k], b[idx[k]]>

The layer uses spmm for Y^T = W X^T and (with the transposed CSR) dX^T = W^T dY^T, and sddmm for
the weight gradient at the nnz only, dW[k] = sum_b dY[b, row_k] X[b, col_k]. No kernel allocates
more than its output.

Backends, chosen by measurement (benchmarks/results/bench_sparse_step.md; 16384^2, density 0.01,
B=128, 2 shared cores): a small C/OpenMP kernel ("c", compiled on first use with the system C
compiler and called through ctypes, ~20 ms per SpMM or SDDMM) beats torch's CSR `mm` (~30-55 ms)
and `torch.sparse.sampled_addmm` (~30-40 ms), so it is the CPU default when a compiler is found.
"torch" (torch.sparse CSR mm + sampled_addmm) is used on CUDA and as the CPU fallback;
"reference" (gather + index_add, O(nnz * B) memory) is the test oracle.
Select one with `set_backend(name)` or the environment variable SPARSEGROW_KERNELS.

Dtypes: the kernels compute in float32 or float64; bfloat16 and float16 inputs are widened to
float32 inside (the sum over a row's nnz accumulates in float32) and the result is rounded back.

Validation: C reads through raw pointers and the torch backend builds its CSR tensor with
check_invariants=False, so every call first checks what it is given, and a bad index is a
ValueError naming it. O(1) checks (dtypes: ptr and idx int32 or int64 and the same, devices,
contiguity, sizes) run on every call; the
O(n_rows + nnz) ones (ptr[0] == 0, ptr non-decreasing, ptr[-1] == nnz, 0 <= idx < n_cols) run
once per version of the index tensors: a (ptr, idx) pair is remembered by identity (weakref) and
`_version`, which every in-place write bumps, so a layer pays them once per topology update.

torch.compile: spmm and sddmm are torch.library custom ops (`sparsegrow::spmm`,
`sparsegrow::sddmm`) with fake implementations, so dynamo traces a SparseLinear into one graph
and calls the kernels from it; the backend is read when the op runs, not when it is traced.
Eager calls skip the op's dispatch and run the same checked implementation directly.
"""
from __future__ import annotations

import ctypes
import os
import warnings
import weakref

import torch

from .. import _native

BACKENDS = ("auto", "c", "torch", "reference")
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
_backend = os.environ.get("SPARSEGROW_KERNELS", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"SPARSEGROW_KERNELS={_backend!r}; allowed: {', '.join(BACKENDS)}")


def set_backend(name: str) -> None:
    """'auto' (C on CPU when it compiles, torch.sparse otherwise), 'c', 'torch' or 'reference'."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; allowed: {', '.join(BACKENDS)}")
    if name == "c" and _c_lib() is None:
        raise RuntimeError(f"the C kernels are not available: {_native.errors.get('kernels')}")
    _backend = name


def get_backend() -> str:
    return _backend


# ---------------------------------------------------------------------------------------------
# Input validation.

_FLOATS = (torch.float32, torch.float64)  # what the kernels compute in
_WIDEN = {torch.bfloat16: torch.float32, torch.float16: torch.float32}  # computed in float32
# (id(ptr), id(idx)) or (id(perm),) -> (weak refs to those tensors, stamp): passed the O(nnz) check
_checked: dict[tuple, tuple] = {}


INDEX_DTYPES = (torch.int32, torch.int64)  # what ptr and idx may be (both the same)


def _check_index(t: torch.Tensor, what: str, op: str) -> None:
    if t.dtype not in INDEX_DTYPES or t.dim() != 1:
        raise ValueError(f"{op}: {what} must be a 1-D int32 or int64 tensor, got {t.dtype} of "
                         f"shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {what} must be contiguous")


def _check_floats(op: str, n0: str, t0: torch.Tensor, n1: str, t1: torch.Tensor) -> None:
    """One floating dtype and device for both; allowed: float32/64, bfloat16, float16."""
    if t0.dtype not in _FLOATS and t0.dtype not in _WIDEN:
        raise ValueError(f"{op}: {n0} is {t0.dtype}; allowed: float32, float64, bfloat16, float16")
    if t1.dtype != t0.dtype or t1.device != t0.device:
        raise ValueError(f"{op}: {n1} is {t1.dtype} on {t1.device} but {n0} is {t0.dtype} on "
                         f"{t0.device}; they must match")


def _stamp(ptr: torch.Tensor, idx: torch.Tensor, n_cols: int) -> tuple | None:
    try:
        return ptr._version, idx._version, n_cols
    except RuntimeError:  # inference-mode tensors have no version counter: check every call
        return None


def check_csr(ptr: torch.Tensor, idx: torch.Tensor, n_rows: int, n_cols: int,
              op: str = "csr") -> None:
    """Raise ValueError unless (ptr, idx) is a valid CSR pattern of an (n_rows, n_cols) matrix.

    ptr (n_rows + 1,) with ptr[0] == 0, non-decreasing, ptr[-1] == nnz; idx (nnz,) in [0, n_cols);
    both int32 or both int64. The O(nnz) part is skipped when this exact (ptr, idx) pair passed it unchanged.
    """
    _check_index(ptr, "ptr (row pointer)", op)
    _check_index(idx, "idx (column indices)", op)
    if ptr.device != idx.device:
        raise ValueError(f"{op}: ptr is on {ptr.device} but idx on {idx.device}")
    if ptr.dtype != idx.dtype:
        raise ValueError(f"{op}: ptr is {ptr.dtype} but idx is {idx.dtype}; they must match "
                         "(both int32 or both int64)")
    if n_rows < 0 or ptr.numel() != n_rows + 1:
        raise ValueError(f"{op}: ptr has {ptr.numel()} entries; a matrix of {n_rows} rows needs "
                         f"n_rows + 1 = {n_rows + 1}")
    key, stamp = (id(ptr), id(idx)), _stamp(ptr, idx, n_cols)
    if _passed(key, stamp, (ptr, idx)):
        return
    nnz = idx.numel()
    first, last = int(ptr[0]), int(ptr[-1])
    if first != 0 or last != nnz:
        raise ValueError(f"{op}: ptr must run from 0 to nnz = {nnz} (the length of idx), got "
                         f"ptr[0] = {first}, ptr[-1] = {last}")
    if n_rows > 1:
        down = torch.nonzero(ptr[1:] < ptr[:-1])
        if down.numel():
            r = int(down[0])
            raise ValueError(f"{op}: ptr must be non-decreasing, but ptr[{r + 1}] = "
                             f"{int(ptr[r + 1])} < ptr[{r}] = {int(ptr[r])}")
    if nnz:
        lo, hi = (int(v) for v in torch.aminmax(idx))
        if lo < 0 or hi >= n_cols:
            raise ValueError(f"{op}: column index {lo if lo < 0 else hi} is out of range "
                             f"[0, {n_cols})")
    _remember(key, stamp, (ptr, idx))


def _passed(key: tuple, stamp: tuple | None, tensors: tuple) -> bool:
    """Whether these exact tensors, unchanged since (same stamp), passed an O(nnz) check."""
    hit = _checked.get(key)
    return (stamp is not None and hit is not None and hit[1] == stamp
            and all(ref() is t for ref, t in zip(hit[0], tensors)))


def _remember(key: tuple, stamp: tuple | None, tensors: tuple) -> None:
    if stamp is not None:
        forget = lambda _, key=key: _checked.pop(key, None)  # noqa: E731
        _checked[key] = (tuple(weakref.ref(t, forget) for t in tensors), stamp)


# ---------------------------------------------------------------------------------------------
# Reference (test oracle): obviously right, O(nnz * B) memory.


def rows_of(ptr: torch.Tensor) -> torch.Tensor:
    """Row index of every nnz, (nnz,), from the CSR row pointer."""
    n_rows = ptr.numel() - 1
    counts = ptr[1:] - ptr[:-1]
    return torch.repeat_interleave(torch.arange(n_rows, device=ptr.device), counts)


def spmm_reference(ptr, idx, val, xt, n_rows):
    out = xt.new_zeros(n_rows, xt.shape[1])
    return out.index_add_(0, rows_of(ptr), val[:, None] * xt[idx])


def sddmm_reference(ptr, idx, a, b):
    return (a[rows_of(ptr)] * b[idx]).sum(1)


# ---------------------------------------------------------------------------------------------
# torch.sparse (any device).


def spmm_torch(ptr, idx, val, xt, n_rows):
    w = torch.sparse_csr_tensor(ptr, idx, val, (n_rows, xt.shape[0]), check_invariants=False)
    return torch.mm(w, xt)


def sddmm_torch(ptr, idx, a, b):
    # sampled_addmm(input, m1, m2) = beta * input + alpha * (m1 @ m2) at input's nnz.
    template = torch.sparse_csr_tensor(ptr, idx, a.new_zeros(idx.numel()),
                                       (a.shape[0], b.shape[0]), check_invariants=False)
    return torch.sparse.sampled_addmm(template, a, b.t(), beta=0.0).values()


# ---------------------------------------------------------------------------------------------
# C / OpenMP (CPU, float32 and float64).

_C_SOURCE = r"""
#include <stdint.h>
#include <omp.h>
/* One CSR row per iteration; x rows of B numbers are prefetched 8 nnz ahead (the loads are
   random over a (n_cols, B) array that exceeds L2, so the kernel is latency bound). */
#define PREFETCH(base, k, end, B, T) \
  if ((k) + 8 < (end)) { const char* q = (const char*)((base) + (int64_t)idx[(k) + 8] * (B)); \
    for (int64_t o = 0; o < (B) * (int64_t)sizeof(T); o += 64) __builtin_prefetch(q + o); }
/* T: the value type, I: the index type of ptr and idx (int32_t or int64_t); positions k and
   offsets are computed in int64_t whatever I is. */
#define DEF(T, I, SUF)                                                                       \
void sg_spmm_##SUF(const I* ptr, const I* idx, const T* val, const T* X, T* Y,  \
                   int64_t n_rows, int64_t B, int nthreads) {                                \
  _Pragma("omp parallel for schedule(dynamic, 64) num_threads(nthreads)")                   \
  for (int64_t r = 0; r < n_rows; ++r) {                                                     \
    T* y = Y + r * B;                                                                        \
    for (int64_t b = 0; b < B; ++b) y[b] = 0;                                                \
    const int64_t end = (int64_t)ptr[r + 1];                                                          \
    for (int64_t k = (int64_t)ptr[r]; k < end; ++k) {                                                 \
      PREFETCH(X, k, end, B, T)                                                              \
      const T v = val[k];                                                                    \
      const T* x = X + (int64_t)idx[k] * B;                                                           \
      _Pragma("omp simd")                                                                    \
      for (int64_t b = 0; b < B; ++b) y[b] += v * x[b];                                      \
    }                                                                                        \
  }                                                                                          \
}                                                                                            \
/* Both gradients of Y^T = W X^T in one pass over W's columns (the CSC view ccol/row_t, with   \
   W's row-major value positions perm): for column i and each of its connections (j, i),       \
   dv[perm[k]] = <dY^T[j], X^T[i]> and dX^T[i] += W_ji dY^T[j]. X^T[i] and dX^T[i] stay in      \
   cache for the column, so each connection gathers one random row (dY^T[j]) where the SDDMM    \
   and the transposed SpMM apart gather two. Threads own columns: no write is shared. */        \
void sg_cscgrad_##SUF(const I* ccol, const I* row_t, const I* perm, const T* val,            \
                      const T* dYt, const T* Xt, T* dXt, T* dv, int64_t n_cols, int64_t B,    \
                      int nthreads) {                                                        \
  const I* idx = row_t;                                                                      \
  _Pragma("omp parallel for schedule(dynamic, 64) num_threads(nthreads)")                   \
  for (int64_t i = 0; i < n_cols; ++i) {                                                     \
    const T* x = Xt + i * B;                                                                 \
    T* dx = dXt + i * B;                                                                     \
    for (int64_t b = 0; b < B; ++b) dx[b] = 0;                                               \
    const int64_t end = (int64_t)ccol[i + 1];                                                \
    for (int64_t k = (int64_t)ccol[i]; k < end; ++k) {                                       \
      PREFETCH(dYt, k, end, B, T)                                                            \
      const int64_t p = (int64_t)perm[k];                                                    \
      const T v = val[p];                                                                    \
      const T* dy = dYt + (int64_t)row_t[k] * B;                                             \
      T s = 0;                                                                               \
      _Pragma("omp simd reduction(+:s)")                                                     \
      for (int64_t b = 0; b < B; ++b) s += dy[b] * x[b];                                     \
      dv[p] = s;                                                                             \
      _Pragma("omp simd")                                                                    \
      for (int64_t b = 0; b < B; ++b) dx[b] += v * dy[b];                                    \
    }                                                                                        \
  }                                                                                          \
}                                                                                            \
void sg_sddmm_##SUF(const I* ptr, const I* idx, const T* A, const T* Bm, T* out,\
                    int64_t n_rows, int64_t B, int nthreads) {                               \
  _Pragma("omp parallel for schedule(dynamic, 64) num_threads(nthreads)")                   \
  for (int64_t r = 0; r < n_rows; ++r) {                                                     \
    const T* a = A + r * B;                                                                  \
    const int64_t end = (int64_t)ptr[r + 1];                                                          \
    for (int64_t k = (int64_t)ptr[r]; k < end; ++k) {                                                 \
      PREFETCH(Bm, k, end, B, T)                                                             \
      const T* bm = Bm + (int64_t)idx[k] * B;                                                         \
      T s = 0;                                                                               \
      _Pragma("omp simd reduction(+:s)")                                                     \
      for (int64_t b = 0; b < B; ++b) s += a[b] * bm[b];                                     \
      out[k] = s;                                                                            \
    }                                                                                        \
  }                                                                                          \
}
DEF(float, int64_t, f32_i64)
DEF(double, int64_t, f64_i64)
DEF(float, int32_t, f32_i32)
DEF(double, int32_t, f64_i32)
/* The positions of a CSR pattern's nnz in column-major order, rows ascending within a column
   (csc_order): a counting sort over the columns, O(nnz). pos (m,) holds each column's first
   slot (the CSC column pointer) and is advanced in place; one thread, since the scatter's order
   over k (rows ascending) is what makes it stable. */
void sg_csc_perm(const int64_t* col, int64_t nnz, int64_t* pos, int64_t* perm) {
  for (int64_t k = 0; k < nnz; ++k) perm[pos[col[k]]++] = k;
}
/* out[i] = #{j : seq[j] < q[i]} for sorted seq and sorted q: a linear merge */
void sg_rank_sorted(const int64_t* seq, int64_t n, const int64_t* q, int64_t m, int64_t* out) {
  int64_t j = 0;
  for (int64_t i = 0; i < m; ++i) {
    while (j < n && seq[j] < q[i]) ++j;
    out[i] = j;
  }
}
"""

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {f"sg_{op}_{suf}": ([_P, _P, _P, _P, _P, _I64, _I64, _I32], None)
               for op in ("spmm", "sddmm") for suf in ("f32_i64", "f64_i64", "f32_i32", "f64_i32")}
_SIGNATURES.update({f"sg_cscgrad_{suf}": ([_P] * 8 + [_I64, _I64, _I32], None)
                    for suf in ("f32_i64", "f64_i64", "f32_i32", "f64_i32")})
_SIGNATURES["sg_rank_sorted"] = ([_P, _I64, _P, _I64, _P], None)
_SIGNATURES["sg_csc_perm"] = ([_P, _I64, _P, _P], None)


def _c_lib():
    """The compiled kernels (built once per source version, see `sparsegrow._native`), or None."""
    return _native.load("kernels", _C_SOURCE, _SIGNATURES)


_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.int32: "i32", torch.int64: "i64"}


def _c_fn(op: str, val_dtype: torch.dtype, index_dtype: torch.dtype):
    """The C kernel for (value type, index type), e.g. sg_spmm_f32_i32."""
    return getattr(_c_lib(), f"sg_{op}_{_SUFFIX[val_dtype]}_{_SUFFIX[index_dtype]}")


def _use_c(device: torch.device) -> bool:
    """Whether to call C for (validated, contiguous, float32/64) tensors on `device`."""
    if _backend in ("torch", "reference"):
        return False
    if device.type != "cpu":
        if _backend == "c":
            raise RuntimeError(f"the C kernels take CPU tensors, got {device}; use "
                               "set_backend('auto') to use torch.sparse there")
        return False
    if _c_lib() is None:
        if _backend == "c":  # SPARSEGROW_KERNELS=c without a working compiler
            raise RuntimeError(f"the C kernels are not available: {_native.errors.get('kernels')}")
        return False
    return True


def _spmm(ptr, idx, val, xt, n_rows):
    """spmm on validated inputs of a float dtype the backends compute in."""
    if _backend == "reference":
        return spmm_reference(ptr, idx, val, xt, n_rows)
    if _use_c(xt.device):
        out = torch.empty(n_rows, xt.shape[1], dtype=xt.dtype)
        _c_fn("spmm", xt.dtype, idx.dtype)(
            ptr.data_ptr(), idx.data_ptr(), val.data_ptr(), xt.data_ptr(), out.data_ptr(),
            n_rows, xt.shape[1], torch.get_num_threads())
        return out
    return spmm_torch(ptr, idx, val, xt, n_rows)


def _sddmm(ptr, idx, a, b):
    if _backend == "reference":
        return sddmm_reference(ptr, idx, a, b)
    if _use_c(a.device):
        out = torch.empty(idx.numel(), dtype=a.dtype)
        _c_fn("sddmm", a.dtype, idx.dtype)(
            ptr.data_ptr(), idx.data_ptr(), a.data_ptr(), b.data_ptr(), out.data_ptr(),
            ptr.numel() - 1, a.shape[1], torch.get_num_threads())
        return out
    return sddmm_torch(ptr, idx, a, b)


def _check_spmm(ptr, idx, val, xt, n_rows) -> None:
    """The O(1) checks, valid on fake tensors too (dynamo runs them while tracing)."""
    _check_floats("spmm", "val", val, "xt", xt)
    if val.dim() != 1 or val.numel() != idx.numel() or xt.dim() != 2:
        raise ValueError(f"spmm: val {tuple(val.shape)} must be (nnz,) = ({idx.numel()},) and "
                         f"xt 2-D (n_cols, B), got {tuple(xt.shape)}")
    if ptr.device != val.device:
        raise ValueError(f"spmm: indices are on {ptr.device} but values on {val.device}")


def _check_sddmm(ptr, idx, a, b) -> None:
    _check_floats("sddmm", "a", a, "b", b)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"sddmm: a (n_rows, B) and b (n_cols, B) must share B, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if ptr.device != a.device:
        raise ValueError(f"sddmm: indices are on {ptr.device} but a and b on {a.device}")


def _spmm_checked(ptr, idx, val, xt, n_rows):
    _check_spmm(ptr, idx, val, xt, n_rows)
    check_csr(ptr, idx, n_rows, xt.shape[0], "spmm")
    wide = _WIDEN.get(xt.dtype)
    if wide is not None:  # bfloat16 / float16: accumulate in float32, round the result once
        return _spmm(ptr, idx, val.to(wide), xt.to(wide).contiguous(), n_rows).to(xt.dtype)
    return _spmm(ptr, idx, val.contiguous(), xt.contiguous(), n_rows)


def _sddmm_checked(ptr, idx, a, b):
    _check_sddmm(ptr, idx, a, b)
    check_csr(ptr, idx, a.shape[0], b.shape[0], "sddmm")
    wide = _WIDEN.get(a.dtype)
    if wide is not None:
        return _sddmm(ptr, idx, a.to(wide).contiguous(), b.to(wide).contiguous()).to(a.dtype)
    return _sddmm(ptr, idx, a.contiguous(), b.contiguous())


@torch.library.custom_op("sparsegrow::spmm", mutates_args=())
def _spmm_op(ptr: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, xt: torch.Tensor,
             n_rows: int) -> torch.Tensor:
    return _spmm_checked(ptr, idx, val, xt, n_rows)


@_spmm_op.register_fake
def _(ptr, idx, val, xt, n_rows):
    _check_spmm(ptr, idx, val, xt, n_rows)
    return xt.new_empty(n_rows, xt.shape[1])


@torch.library.custom_op("sparsegrow::sddmm", mutates_args=())
def _sddmm_op(ptr: torch.Tensor, idx: torch.Tensor, a: torch.Tensor,
              b: torch.Tensor) -> torch.Tensor:
    out = _sddmm_checked(ptr, idx, a, b)
    # a custom op returns fresh tensors; the torch backend's is a view of a temporary's values
    return out if out._base is None else out.clone()


@_sddmm_op.register_fake
def _(ptr, idx, a, b):
    _check_sddmm(ptr, idx, a, b)
    return a.new_empty(idx.shape[0])


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager(t: torch.Tensor) -> bool:
    """Whether to call the kernels directly rather than through the custom op: yes unless
    something traces (dynamo, export: then `t` is fake, functional or on meta). The op's dispatch
    layers cost about 0.1 ms per call in eager mode here, 3 calls per layer per training step."""
    return not torch.compiler.is_compiling() and type(t) in _PLAIN and t.device.type != "meta"


def spmm(ptr: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, xt: torch.Tensor,
         n_rows: int) -> torch.Tensor:
    """CSR (n_rows, xt.shape[0]) @ xt (n_cols, B) -> (n_rows, B), in xt's dtype.

    Not differentiable by itself (SparseLinear's autograd.Function calls it in both passes)."""
    if _eager(xt):
        return _spmm_checked(ptr, idx, val, xt, n_rows)
    return _spmm_op(ptr, idx, val, xt, n_rows)


def sddmm(ptr: torch.Tensor, idx: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out[k] = <a[row_k], b[idx[k]]> for every nnz k; a (n_rows, B), b (n_cols, B) -> (nnz,)."""
    if _eager(a):
        return _sddmm_checked(ptr, idx, a, b)
    return _sddmm_op(ptr, idx, a, b)


def check_perm(perm: torch.Tensor, idx: torch.Tensor, op: str = "csc_grads") -> None:
    """Raise ValueError unless perm is a permutation of [0, nnz), nnz = idx.numel(), of idx's
    dtype and device (where a kernel reads and writes values). The O(nnz) checks are skipped when
    this perm passed them unchanged."""
    _check_index(perm, "perm (value positions)", op)
    if perm.dtype != idx.dtype or perm.device != idx.device:
        raise ValueError(f"{op}: perm is {perm.dtype} on {perm.device} but idx {idx.dtype} on "
                         f"{idx.device}; they must match")
    nnz = idx.numel()
    if perm.numel() != nnz:
        raise ValueError(f"{op}: perm has {perm.numel()} entries, the pattern {nnz}")
    key, stamp = (id(perm),), _stamp(perm, perm, nnz)
    if _passed(key, stamp, (perm,)):
        return
    if nnz:
        lo, hi = (int(v) for v in torch.aminmax(perm))
        if lo < 0 or hi >= nnz:
            raise ValueError(f"{op}: perm holds position {lo if lo < 0 else hi}, out of range "
                             f"[0, {nnz})")
        # a permutation: each position written once (a repeat would leave one unwritten and
        # let two threads write the other)
        counts = torch.bincount(perm.long(), minlength=nnz)
        off = torch.nonzero(counts != 1)
        if off.numel():
            raise ValueError(f"{op}: perm is not a permutation of [0, {nnz}): position "
                             f"{int(off[0])} appears {int(counts[off[0]])} times")
    _remember(key, stamp, (perm,))


def csc_grads(crow: torch.Tensor, col: torch.Tensor, ccol: torch.Tensor, row_t: torch.Tensor,
              perm: torch.Tensor, val: torch.Tensor, dyt: torch.Tensor,
              xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX^T (M, B), dW at the nnz in row-major order (nnz,)) of Y^T = W X^T, W (N, M) in CSR
    (crow, col, val) with its CSC view (ccol, row_t) and perm (val[perm] in column order).

    On CPU with the C kernels, float32/64, no tracing and at least 64 columns per thread: one pass
    over W's columns that gathers one random row per connection (sg_cscgrad) instead of two (SDDMM,
    then the transposed SpMM). Otherwise the two kernels: the same numbers."""
    if not _eager(xt):  # traced (compile, export): the two custom ops, which check themselves
        return spmm(ccol, row_t, val[perm], dyt, ccol.numel() - 1), sddmm(crow, col, dyt, xt)
    n, m = crow.numel() - 1, ccol.numel() - 1
    _check_sddmm(crow, col, dyt, xt)
    _check_spmm(ccol, row_t, val, dyt, m)
    check_perm(perm, row_t, "csc_grads")
    if dyt.shape[0] != n or xt.shape[0] != m:
        raise ValueError(f"csc_grads: dyt {tuple(dyt.shape)} and xt {tuple(xt.shape)} must be "
                         f"({n}, B) and ({m}, B) for a {n}x{m} weight")
    # a chunk of 64 columns per thread at a time: narrower weights keep the row-parallel kernels
    if (dyt.dtype in _FLOATS and _backend != "reference" and _use_c(xt.device)
            and m >= 64 * torch.get_num_threads()):
        check_csr(ccol, row_t, m, n, "csc_grads")
        dyt, xt, val = dyt.contiguous(), xt.contiguous(), val.contiguous()
        dxt = torch.empty(m, xt.shape[1], dtype=xt.dtype)
        dv = torch.empty(val.numel(), dtype=xt.dtype)
        _c_fn("cscgrad", xt.dtype, row_t.dtype)(
            ccol.data_ptr(), row_t.data_ptr(), perm.data_ptr(), val.data_ptr(), dyt.data_ptr(),
            xt.data_ptr(), dxt.data_ptr(), dv.data_ptr(), m, xt.shape[1], torch.get_num_threads())
        return dxt, dv
    dv = sddmm(crow, col, dyt, xt)
    return spmm(ccol, row_t, val[perm], dyt, ccol.numel() - 1), dv


def csc_order(col: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ccol (m + 1,), perm (nnz,)), int64, the CSC view of a row-major (CSR) pattern: ccol the
    column pointer, perm the nnz's positions in column-major order with rows ascending within
    each column (torch.sort(col, stable=True).indices). col (nnz,) int64 in [0, m): the column
    of each nnz in row-major order. On CPU with the C kernels perm is a counting sort, O(nnz + m)
    (40 M nnz at m = 10⁶: benchmarks/bench_csc_perm.py); elsewhere the stable sort."""
    if col.dim() != 1 or col.dtype != torch.long:
        raise ValueError(f"csc_order: col must be 1-D int64, got {col.dtype} {tuple(col.shape)}")
    nnz = col.numel()
    if nnz:  # the C scatter writes perm[pos[col[k]]]: a column outside [0, m) would write outside
        lo, hi = (int(v) for v in torch.aminmax(col))
        if lo < 0 or hi >= m:
            raise ValueError(f"csc_order: col holds {lo if lo < 0 else hi}, outside [0, {m})")
    ccol = torch.cat([col.new_zeros(1), torch.cumsum(torch.bincount(col, minlength=m), 0)])
    if (_backend in ("torch", "reference") or col.device.type != "cpu" or _c_lib() is None
            or nnz == 0):
        return ccol, torch.sort(col, stable=True).indices
    col = col.contiguous()
    pos = ccol[:-1].clone()  # each column's next free slot, advanced by the scatter
    perm = torch.empty_like(col)
    _c_lib().sg_csc_perm(col.data_ptr(), nnz, pos.data_ptr(), perm.data_ptr())
    return ccol, perm


def searchsorted_sorted(seq: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """torch.searchsorted(seq, queries) (left side) for sorted 1-D `seq` and `queries`: a linear
    merge on CPU for int64, O(len(seq) + len(queries)), instead of a binary search per query
    (random accesses). Both must be sorted (checked: O(n), like the merge itself)."""
    for what, t in (("seq", seq), ("queries", queries)):
        if t.dim() != 1:
            raise ValueError(f"searchsorted_sorted: {what} must be 1-D, got {tuple(t.shape)}")
        if t.numel() > 1 and bool((t[1:] < t[:-1]).any()):
            raise ValueError(f"searchsorted_sorted: {what} must be sorted ascending")
    if (_backend in ("torch", "reference") or seq.device.type != "cpu"
            or queries.device.type != "cpu" or seq.dtype != torch.long
            or queries.dtype != torch.long or _c_lib() is None):
        return torch.searchsorted(seq, queries)
    seq, queries = seq.contiguous(), queries.contiguous()
    out = torch.empty_like(queries)
    _c_lib().sg_rank_sorted(seq.data_ptr(), seq.numel(), queries.data_ptr(), queries.numel(),
                            out.data_ptr())
    return out
