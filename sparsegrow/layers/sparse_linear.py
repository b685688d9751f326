"""A truly sparse Linear layer: values (nnz,) + CSR indices, no (out, in) tensor at any stage.

    layer = SparseLinear(in_features, out_features, active)    # active: sorted flat indices
    sparsifier = sparsegrow.sparsify(model, density=0.001, method="set", storage="sparse", ...)

The weight W (N=out, M=in) is stored as
    values  (nnz,)   nn.Parameter, row-major order: the same order as the sorted flat indices
                     j * M + i, so position k of `values` is the k-th active connection
    crow    (N+1,)   CSR row pointer;   col (nnz,) column of each value
    ccol, row_t, perm  the transposed (CSC) view backward needs: ccol (M+1,), row_t (nnz,) and
                     perm (nnz,) with values[perm] in column-major order (rebuilt on updates,
                     not saved in checkpoints)
All five index buffers share one dtype, `index_dtype(N, M, nnz)`: int32 when N, M and nnz fit
in int32 (any layer below 2^31 units a side and 2^31 connections), else int64; re-chosen when a
topology update changes nnz. Flat indices (`active()`, row * M + col, everything the Sparsifier
sees) are always int64 and computed in int64: 1,000,000^2 overflows int32. A checkpoint holding
int64 buffers (older runs) loads into an int32 layer and vice versa (cast on load).

Forward Y = X W^T and dX = dY W are sparse x dense products (SpMM), the weight gradient is
needed at the nnz only, dW[k] = sum_b dY[b, row_k] X[b, col_k] (SDDMM); see kernels.py. The
output is returned as the transpose of a contiguous (N, B) tensor, so the next sparse layer's
X^T is free; it is a valid strided (B, N) tensor (use .reshape, not .view, on it).

Dtypes: float32 and float64 weights compute in their own dtype; bfloat16/float16 weights and
inputs, and float32 layers under `torch.autocast(device, dtype)`, compute in float32 (the kernels
accumulate in float32) and return the low-precision dtype, as nn.Linear does under autocast.

torch.compile: the kernels are custom ops with fake implementations (see kernels.py), so a model
of SparseLinear layers compiles into one graph; topology updates keep nnz and write crow/col/
ccol/row_t/perm, values and their gradient in place, so nothing the graph holds changes shape or
storage and no update recompiles (tests/test_sparse_linear.py).

Topology: `SparseLinearParam` is the `SparseParam` view the Sparsifier drives (active, values,
update, enforce, state_dict); registered as STORAGES["sparse"]. On update, values and every
per-nnz optimizer state tensor (SGD momentum, Adam moments) are re-indexed together: kept
connections keep their value and state, dropped ones vanish, grown ones start at `init` with
the state of a fresh parameter (`optim_state.RESETS`, e.g. zero Adam moments). The Parameter object stays the same, so `optimizer.state[param]` stays keyed.

Export: `to_masked(model)` turns every SparseLinear into nn.Linear + MaskedParam (the reference
storage), `to_sparse(model, params)` turns them back; the round trip is exact.

Reference: "no need for dense operations in any stage of training" (Mocanu et al. 2018, SET);
truly sparse implementations: Curci, Mocanu & Pechenizkiy 2021, arXiv:2102.01732.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import optim_state
from ..topology import MaskedParam, isin_sorted
from ..updater import STORAGES
from . import kernels

_AUTOCAST = (torch.float32, torch.bfloat16, torch.float16)  # the dtypes autocast mixes
_INT32_MAX = torch.iinfo(torch.int32).max
# Tests only: force every new layer's index dtype (None: choose by `index_dtype`). A layer's own
# `index_dtype=` constructor argument wins over this.
_FORCE_INDEX_DTYPE: torch.dtype | None = None


def index_dtype(n_rows: int, n_cols: int, nnz: int) -> torch.dtype:
    """The dtype of a CSR layer's index buffers (crow, col, ccol, row_t, perm): int32 when every
    value they hold fits (row and column indices < n_rows, n_cols; pointers and positions <= nnz),
    else int64. Flat indices row * n_cols + col never use it: they are int64."""
    fits = max(int(n_rows), int(n_cols), int(nnz)) <= _INT32_MAX
    return torch.int32 if fits else torch.int64


class _SparseLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, crow, col, ccol, row_t, perm):
        # x (B, M) -> (B, N); the weight is CSR (crow, col, values), N = len(crow) - 1.
        xt = x.t().contiguous()  # (M, B); free when x is itself a transposed view
        yt = kernels.spmm(crow, col, values, xt, crow.numel() - 1)  # (N, B)
        ctx.save_for_backward(xt, values, crow, col, ccol, row_t, perm)
        return yt.t()

    @staticmethod
    def backward(ctx, dy):
        xt, values, crow, col, ccol, row_t, perm = ctx.saved_tensors
        dyt = dy.t().contiguous()  # (N, B)
        if all(ctx.needs_input_grad[:2]):  # xt is saved anyway: both gradients in one pass
            dxt, dv = kernels.csc_grads(crow, col, ccol, row_t, perm, values, dyt, xt)
        else:
            dxt, dv = csr_grads(dyt, lambda: xt, ctx.needs_input_grad[:2], values, crow, col,
                                ccol, row_t, perm)
        return (dxt.t() if dxt is not None else None), dv, None, None, None, None, None


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; no cast op when it already is (a no-op .to still costs a dispatch)."""
    return t if t.dtype == dtype else t.to(dtype)


def csr_grads(dyt: torch.Tensor, xt_fn, needs: tuple[bool, bool], values, crow, col, ccol,
              row_t, perm) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dX^T (M, B), dW at the nnz (nnz,)) of Y^T = W X^T from dY^T (N, B), as needed.

    xt_fn() gives X^T (M, B) (saved, or recomputed by SparseConv2d); it is called first and
    dropped before dX^T is made, so the two never coexist."""
    dxt = dv = None
    if needs[1]:
        dv = kernels.sddmm(crow, col, dyt, xt_fn())  # (nnz,)
    if needs[0]:
        # dX^T (M, B) = W^T dY^T, with W^T in CSR = (ccol, row_t, values[perm])
        dxt = kernels.spmm(ccol, row_t, values[perm], dyt, ccol.numel() - 1)
    return dxt, dv


def _check_active(active: torch.Tensor, numel: int, what: str = "active") -> None:
    if active.dim() != 1 or active.dtype != torch.long:
        raise ValueError(f"{what} must be a 1-D int64 tensor of flat indices, "
                         f"got {active.dtype} of shape {tuple(active.shape)}")
    if active.numel():
        if int(active[0]) < 0 or int(active[-1]) >= numel:
            raise ValueError(f"{what} has indices outside [0, {numel})")
        if active.numel() > 1 and not bool((active[1:] > active[:-1]).all()):
            raise ValueError(f"{what} must be sorted and free of duplicates")


def no_autocast(device: torch.device):
    """A context with autocast off on `device`: the kernels compute in the dtype compute_dtypes
    chose. Left on, CUDA autocast would run torch.sparse's products in float16/bfloat16 inside
    the autograd Function, so dY arrived in float16 beside a float32 X in backward."""
    return torch.autocast(device_type=device.type, enabled=False)


def compute_dtypes(x: torch.Tensor, w: torch.Tensor, what: str) -> tuple[torch.dtype, torch.dtype]:
    """(dtype the kernels compute in, dtype returned) for input x and weights w, as nn.Linear /
    nn.Conv2d would return under autocast; a clear error for mismatched dtypes or devices."""
    dev = x.device.type
    if x.device != w.device:
        out_dtype = None
    elif torch.is_autocast_enabled(dev) and x.dtype in _AUTOCAST and w.dtype in _AUTOCAST:
        out_dtype = torch.get_autocast_dtype(dev)  # what nn.Linear returns under autocast
    else:
        out_dtype = w.dtype if x.dtype == w.dtype else None
    if out_dtype is None:
        raise ValueError(f"{what} holds {w.dtype} weights on {w.device}, got input "
                         f"{x.dtype} on {x.device}; move the layer or the input "
                         "(layer.to(...)), or mix float32/bfloat16/float16 only under "
                         "torch.autocast")
    # The kernels compute in float32 (float64 for float64 weights): bfloat16/float16 inputs
    # and weights are widened (exactly), the bias is added in that precision too, and the
    # output is rounded once to out_dtype, as nn.Linear's addmm does. (Rounding before the
    # bias add would flip the sign of small pre-activations, and with it ReLU's mask.)
    return (torch.float64 if w.dtype == torch.float64 else torch.float32), out_dtype


class CSRModule(nn.Module):
    """What every truly sparse layer shares: a weight matrix W (n_rows, n_cols) stored as CSR
    values + indices, its topology, checkpoints, and the product `_matmul` (x (R, n_cols) ->
    (R, n_rows)). SparseLinear has n_rows, n_cols = out, in; SparseConv2d has out_channels,
    in_channels * kh * kw (the order of nn.Conv2d's weight.view(out, -1)).

    active: sorted flat indices row * n_cols + col of the connections, (nnz,).
    values: their initial weights (nnz,); default U(-1/sqrt(n_cols), 1/sqrt(n_cols)), the
        default of nn.Linear and nn.Conv2d (fan_in = n_cols).
    min_per_row: every output unit must keep at least this many inputs (checked at construction
        and after every topology update; 0 allows empty rows).
    """

    def _init_csr(self, n_rows: int, n_cols: int, active: torch.Tensor,
                  values: torch.Tensor | None, bias: bool | torch.Tensor, min_per_row: int,
                  generator: torch.Generator | None, device, dtype,
                  index_dtype: torch.dtype | None = None) -> None:
        self.n_rows, self.n_cols = int(n_rows), int(n_cols)
        forced = index_dtype if index_dtype is not None else _FORCE_INDEX_DTYPE
        if forced is not None and forced not in kernels.INDEX_DTYPES:
            raise ValueError(f"index_dtype={forced}; allowed: torch.int32, torch.int64")
        self._forced_index_dtype = forced  # None: chosen from the shape and nnz
        self.min_per_row = int(min_per_row)
        device = torch.device(device) if device is not None else active.device
        dtype = dtype or (values.dtype if values is not None else torch.get_default_dtype())
        active = active.to(device)
        _check_active(active, self.n_rows * self.n_cols)
        bound = 1.0 / math.sqrt(self.n_cols)
        if values is None:
            u = torch.rand(active.numel(), generator=generator, dtype=dtype)
            values = ((2 * u - 1) * bound).to(device)
        elif values.shape != active.shape:
            raise ValueError(f"values {tuple(values.shape)} must match active {tuple(active.shape)}")
        self.values = nn.Parameter(values.detach().to(device=device, dtype=dtype).clone())
        if isinstance(bias, torch.Tensor):
            if bias.shape != (self.n_rows,):
                raise ValueError(f"bias must have shape ({self.n_rows},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype).clone())
        elif bias:
            u = torch.rand(self.n_rows, generator=generator, dtype=dtype)
            self.bias = nn.Parameter(((2 * u - 1) * bound).to(device))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("crow", torch.empty(0, dtype=torch.long, device=device))
        self.register_buffer("col", torch.empty(0, dtype=torch.long, device=device))
        for name in ("ccol", "row_t", "perm"):  # derived; rebuilt, never saved
            self.register_buffer(name, torch.empty(0, dtype=torch.long, device=device),
                                 persistent=False)
        self._set_topology(active)

    def _matmul(self, x: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
        """x (R, n_cols) -> x W^T (R, n_rows) in `compute`, the transpose of a contiguous
        (n_rows, R); x may itself be the transpose of a contiguous (n_cols, R) (then free)."""
        with no_autocast(x.device):
            return _SparseLinearFn.apply(_to(x, compute), _to(self.values, compute), self.crow,
                                         self.col, self.ccol, self.row_t, self.perm)

    # -- topology ----------------------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        raise NotImplementedError

    def nnz(self) -> int:
        return self.values.numel()

    def density(self) -> float:
        return self.nnz() / (self.n_rows * self.n_cols)

    def index_dtype(self) -> torch.dtype:
        """The dtype of the index buffers (crow, col, ccol, row_t, perm)."""
        return self.col.dtype

    def _choose_index_dtype(self, nnz: int) -> torch.dtype:
        forced = self._forced_index_dtype
        if forced is None:
            return index_dtype(self.n_rows, self.n_cols, nnz)
        if forced == torch.int32 and index_dtype(self.n_rows, self.n_cols, nnz) != torch.int32:
            raise ValueError(f"index_dtype=torch.int32 cannot hold a {self.n_rows}x{self.n_cols} "
                             f"weight with {nnz} connections")
        return forced

    def rows(self) -> torch.Tensor:
        """Row (output unit) of every nnz, (nnz,) int64."""
        return kernels.rows_of(self.crow)

    def active(self) -> torch.Tensor:
        """Sorted flat indices row * n_cols + col, (nnz,) int64 (computed in int64 whatever the
        index dtype: rows() is int64, so the product cannot overflow int32)."""
        return self.rows() * self.n_cols + self.col.long()

    def to_dense_module(self) -> nn.Module:
        """The dense module (nn.Linear / nn.Conv2d) holding W (zeros off the active set)."""
        raise NotImplementedError

    @torch.no_grad()
    def scale_to_active_fan_in(self) -> None:
        """Sparse-aware init: scale each output unit's weights by sqrt(fan_in / active fan_in).

        With default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) weights and only d * fan_in inputs kept,
        each layer would shrink the signal by sqrt(d); at d = 0.001 a few layers silence it.
        """
        per_row = (self.crow[1:] - self.crow[:-1]).clamp(min=1).to(self.values.dtype)
        scale = (self.n_cols / per_row).sqrt()  # (N,)
        self.values.mul_(scale[self.rows()])

    @torch.no_grad()
    def _fill_dense(self, weight: torch.Tensor) -> None:
        weight.zero_()
        weight.view(-1)[self.active()] = self.values.detach()

    def _set_topology(self, active: torch.Tensor) -> None:
        n, m = self.n_rows, self.n_cols
        what = type(self).__name__
        rows = torch.div(active, m, rounding_mode="floor")
        per_row = torch.bincount(rows, minlength=n)
        if self.min_per_row > 0:
            short = per_row < self.min_per_row
            if bool(short.any()):
                j = int(torch.nonzero(short)[0])
                raise ValueError(
                    f"{int(short.sum())} of {n} output units would keep fewer than min_per_row="
                    f"{self.min_per_row} inputs (unit {j} keeps {int(per_row[j])}); raise the "
                    "density or lower min_per_row")
        col = active - rows * m
        # the CSC view: column pointer, and the nnz in column-major order, rows ascending
        ccol, perm = kernels.csc_order(col, m)
        # computed in int64 (transient, once per update), stored in the layer's index dtype
        it = self._choose_index_dtype(active.numel())
        new = {"crow": torch.cat([per_row.new_zeros(1), torch.cumsum(per_row, 0)]), "col": col,
               "ccol": ccol, "perm": perm, "row_t": rows[perm]}
        for name, value in new.items():
            value = value.to(it)
            buf = getattr(self, name)
            if buf.shape == value.shape and buf.dtype == value.dtype and not buf.is_inference():
                # nnz is constant across updates: write in place, so the buffers keep their
                # storage (compiled graphs and CUDA graphs hold them; no recompile, no re-record)
                buf.copy_(value)
            else:
                setattr(self, name, value)
        # O(nnz) validation once per topology; the kernels then recognise these exact tensors
        kernels.check_csr(self.crow, self.col, n, m, what)
        kernels.check_csr(self.ccol, self.row_t, m, n, f"{what} (transposed)")
        kernels.check_perm(self.perm, self.row_t, f"{what} (transposed)")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The topology in the checkpoint may differ in nnz: resize before the default copy,
        # keeping the Parameter object (optimizer.state is keyed by it). The buffers take the
        # checkpoint's index dtype (int64 from older runs, or int32) until it is validated, then
        # _set_topology stores them in this layer's index dtype.
        for name in ("crow", "col"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.crow.device))
        if prefix + "values" in state_dict:
            src = state_dict[prefix + "values"]
            if src.shape != self.values.shape:
                self.values.data = self.values.data.new_empty(src.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.crow.numel() != self.n_rows + 1 or self.col.numel() != self.values.numel():
            raise ValueError(f"{prefix}: checkpoint CSR does not fit a {self.n_rows}x"
                             f"{self.n_cols} weight with {self.values.numel()} values")
        try:
            kernels.check_csr(self.crow, self.col, self.n_rows, self.n_cols, "")
        except ValueError as e:
            raise ValueError(f"{prefix}: checkpoint CSR is invalid{e}") from None
        self._set_topology(self.active())


class SparseLinear(CSRModule):
    """y = x W^T + b with W (out_features, in_features) stored as CSR values + indices.

    active: sorted flat indices j * in_features + i of the connections, (nnz,).
    values: their initial weights (nnz,); default nn.Linear's U(-1/sqrt(in), 1/sqrt(in)).
    min_per_row: every output unit must keep at least this many inputs (checked at construction
        and after every topology update; 0 allows empty rows).
    index_dtype: None (default) chooses int32 indices where they fit (see `index_dtype`); pass
        torch.int64 (or torch.int32) to force one, e.g. to compare the two.

    The output (B, out_features) is the transpose of a contiguous (out_features, B) array, which
    the next SparseLinear reads without a copy. A dense nn.Linear reading it at a wide
    out_features should be given `y.contiguous()`: MKL's GEMM on the transposed operand was 6x
    slower at 10⁶ -> 10 (benchmarks/results/bench_readout_layout.md; the experiments' MLP does it).
    """

    def __init__(self, in_features: int, out_features: int, active: torch.Tensor,
                 values: torch.Tensor | None = None, bias: bool | torch.Tensor = True, *,
                 min_per_row: int = 0, generator: torch.Generator | None = None,
                 device=None, dtype=None, index_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_csr(out_features, in_features, active, values, bias, min_per_row, generator,
                       device, dtype, index_dtype)

    # -- construction / conversion -----------------------------------------------------------

    @classmethod
    def from_dense(cls, linear: nn.Linear, active: torch.Tensor, **kwargs) -> "SparseLinear":
        """The weights of `linear` at `active` (a meta-device Linear gets the default init)."""
        w = linear.weight
        bias = linear.bias
        if w.device.type == "meta":
            return cls(linear.in_features, linear.out_features, active.cpu(), None,
                       bias is not None, dtype=w.dtype, device="cpu", **kwargs)
        active = active.to(w.device)
        return cls(linear.in_features, linear.out_features, active,
                   w.detach().reshape(-1)[active], bias.detach() if bias is not None else False,
                   **kwargs)

    def to_dense_linear(self) -> nn.Linear:
        """An nn.Linear holding W densely (zeros off the active set): only where it fits."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            self._fill_dense(lin.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    to_dense_module = to_dense_linear

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects (..., {self.in_features}) input, got {tuple(x.shape)}")
        compute, out_dtype = compute_dtypes(x, self.values, "SparseLinear")
        # The casts are autograd ops, so dX and dW come back in x's and the weights' dtypes.
        lead = x.shape[:-1]
        y = self._matmul(x.reshape(-1, self.in_features), compute)
        if self.bias is not None:
            y = y + _to(self.bias, compute)
        if out_dtype != compute:
            y = y.to(out_dtype)  # (B, N), still the transpose of a contiguous (N, B)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={self.nnz()}, density={self.density():.3g}, bias={self.bias is not None}")


class SparseLinearParam:
    """The `SparseParam` view of a SparseLinear's weight, driven by the Sparsifier.

    There is no dense gradient (no `capture_dense_grad`), so the Sparsifier refuses grow
    criteria that need one (RigL's gradient grow); use random or search grow.
    """

    def __init__(self, fqn: str, module: CSRModule):
        self.fqn = fqn
        self.module = module
        self.shape = module.shape
        self.numel = module.n_rows * module.n_cols

    @property
    def param(self) -> nn.Parameter:
        return self.module.values

    def active(self) -> torch.Tensor:
        return self.module.active()

    def nnz(self) -> int:
        return self.module.nnz()

    def values(self, idx: torch.Tensor) -> torch.Tensor:
        active = self.active()
        if idx.numel() == active.numel() and torch.equal(idx, active):
            return self.module.values.detach()  # the Sparsifier asks for all of them
        pos = torch.searchsorted(active, idx)
        if idx.numel() and not bool(isin_sorted(idx, active).all()):
            raise ValueError(f"{self.fqn}: values() asked for inactive connections")
        return self.module.values.detach()[pos]

    @torch.no_grad()
    def update(self, drop: torch.Tensor, grow: torch.Tensor, init: torch.Tensor,
               optimizer: torch.optim.Optimizer | None = None) -> None:
        """Remove `drop`, add `grow` (sorted flat indices) with values `init`; re-index state."""
        layer, param = self.module, self.module.values
        active = self.active()
        dev = active.device
        drop, grow, init = drop.to(dev), grow.to(dev), init.to(dev)
        _check_active(grow, self.numel, f"{self.fqn}: grow")
        if init.shape != grow.shape:
            raise ValueError(f"{self.fqn}: init {tuple(init.shape)} must match grow {tuple(grow.shape)}")
        # Every search below has the (small) drop/grow sets as queries: O(n log nnz), not
        # O(nnz log n); the merge itself is linear.
        if drop.numel() > 1 and not bool((drop[1:] > drop[:-1]).all()):
            drop = torch.unique(drop)  # sorted, deduplicated
        pos = kernels.searchsorted_sorted(active, drop).clamp_(max=max(active.numel() - 1, 0))
        if drop.numel() and (active.numel() == 0 or not bool((active[pos] == drop).all())):
            raise ValueError(f"{self.fqn}: drop contains connections that are not active")
        kept_mask = torch.ones(active.numel(), dtype=torch.bool, device=dev)
        kept_mask[pos[: drop.numel()]] = False
        keep_src = torch.nonzero(kept_mask).squeeze(1)
        kept = active[keep_src]
        # New position of a grown connection: its rank among the grown plus the kept ones below
        # it; the kept connections fill the remaining positions in order.
        below = kernels.searchsorted_sorted(kept, grow)
        if grow.numel() and kept.numel() and bool(
                (kept[below.clamp(max=kept.numel() - 1)] == grow).any()):
            raise ValueError(f"{self.fqn}: grow contains connections that are already active")
        n_new = kept.numel() + grow.numel()
        grow_dst = torch.arange(grow.numel(), device=dev) + below
        is_grown = torch.zeros(n_new, dtype=torch.bool, device=dev)
        is_grown[grow_dst] = True
        keep_dst = torch.nonzero(~is_grown).squeeze(1)
        new_active = torch.empty(n_new, dtype=torch.long, device=dev)
        new_active[keep_dst] = kept
        new_active[grow_dst] = grow
        new_values = param.new_zeros(n_new)
        new_values[keep_dst] = param[keep_src]
        new_values[grow_dst] = init.to(param.dtype)
        layer._set_topology(new_active)  # raises (changing nothing) if a row would get too short
        if optimizer is not None:
            optim_state.reindex(optimizer, param, keep_src, keep_dst, n_new)
        grad = None
        if param.grad is not None:
            grad = param.grad.new_zeros(n_new)
            grad[keep_dst] = param.grad[keep_src]
        if n_new == param.numel():  # every Sparsifier update: same storage, like the indices
            param.copy_(new_values)
            if grad is not None:
                param.grad.copy_(grad)
        else:
            param.grad = None
            param.data = new_values
            param.grad = grad

    def scale_init_to_active_fan_in(self) -> None:
        self.module.scale_to_active_fan_in()

    def enforce(self) -> None:
        """Nothing to do: inactive weights are not stored, so they are exactly zero."""

    def reset_inactive_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to do: inactive connections have no optimizer state."""

    def squash(self, model: nn.Module) -> None:
        """Replace the sparse layer by its dense module (nn.Linear / nn.Conv2d) holding W densely
        (only where it fits)."""
        _replace_module(model, self.fqn.rpartition(".")[0], self.module.to_dense_module())

    def state_dict(self) -> dict:
        return {"active": self.active()}

    def load_state_dict(self, state: dict) -> None:
        """Set the topology to state["active"]: shared connections keep their values and new
        ones start at zero. A no-op after model.load_state_dict of the same checkpoint."""
        target = state["active"].to(self.module.crow.device)
        _check_active(target, self.numel, f"{self.fqn}: checkpoint active set")
        active = self.active()
        if torch.equal(target, active):
            return
        drop = active[~isin_sorted(active, target)]
        grow = target[~isin_sorted(target, active)]
        self.update(drop, grow, torch.zeros(grow.numel(), device=grow.device), None)


# ---------------------------------------------------------------------------------------------
# Storage factory (STORAGES["sparse"]) and conversion between storages.


def _replace_module(model: nn.Module, module_name: str, new: nn.Module) -> None:
    if not module_name:
        raise ValueError("sparse storage replaces the layer inside its parent; the model itself "
                         "cannot be a bare nn.Linear or nn.Conv2d (wrap it in nn.Sequential)")
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


# dense module type -> its truly sparse form's `from_dense(module, active, min_per_row=...)`;
# sparse_conv.py adds nn.Conv2d -> SparseConv2d.from_dense
FROM_DENSE: dict[type, object] = {nn.Linear: SparseLinear.from_dense}


def make_sparse(model: nn.Module, fqn: str, module: nn.Module, param_name: str,
                active: torch.Tensor, min_per_row: int = 0) -> SparseLinearParam:
    """Replace the nn.Linear / nn.Conv2d owning `fqn` inside `model` by its truly sparse form
    (SparseLinear / SparseConv2d) with `active`."""
    from_dense = next((f for t, f in FROM_DENSE.items() if isinstance(module, t)), None)
    if from_dense is None or param_name != "weight":
        raise ValueError(f"sparse storage handles nn.Linear and nn.Conv2d weights only, not "
                         f"{type(module).__name__}.{param_name} ({fqn}); use storage='masked' or "
                         "leave it out with include=...")
    if active.device.type == "meta":
        raise ValueError(f"{fqn}: the active set was sampled on the meta device; sample it on "
                         "the CPU (the Sparsifier must not pass device='meta' to sample_inactive)")
    try:
        layer = from_dense(module, active, min_per_row=min_per_row)
    except ValueError as e:
        raise ValueError(f"{fqn}: {e}") from None
    _replace_module(model, fqn.rpartition(".")[0], layer)
    return SparseLinearParam(fqn, layer)


def sparse_storage(min_per_row: int = 0):
    """A storage factory like STORAGES["sparse"] that also enforces `min_per_row`."""
    def factory(model, fqn, module, param_name, active):
        return make_sparse(model, fqn, module, param_name, active, min_per_row)
    return factory


STORAGES.add("sparse", make_sparse,
             "truly sparse CSR values + indices, no dense tensor (nn.Linear and nn.Conv2d)")


def sparse_layers(model: nn.Module) -> dict[str, CSRModule]:
    """{name: layer} of every truly sparse layer (SparseLinear, SparseConv2d) in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CSRModule)}


def to_masked(model: nn.Module) -> dict[str, MaskedParam]:
    """Replace every SparseLinear / SparseConv2d in `model` by nn.Linear / nn.Conv2d +
    MaskedParam, in place.

    Returns {fqn: MaskedParam}. The dense weights hold the same values (zeros elsewhere), so
    outputs agree up to float summation order. Only for layers whose dense form fits in memory.
    """
    out = {}
    for name, layer in sparse_layers(model).items():
        active = layer.active()
        dense = layer.to_dense_module()
        _replace_module(model, name, dense)
        out[f"{name}.weight"] = MaskedParam(f"{name}.weight", dense, "weight", active)
    return out


def to_sparse(model: nn.Module, params: dict, min_per_row: int = 0) -> dict[str, SparseLinearParam]:
    """Replace the nn.Linear / nn.Conv2d layers named in `params` by SparseLinear /
    SparseConv2d, in place.

    params: {fqn: MaskedParam} (from `to_masked` or a masked Sparsifier's `params`) or
    {fqn: sorted flat active indices} (e.g. `Sparsifier.masks()`). Returns {fqn: SparseLinearParam}.
    """
    out = {}
    for fqn, p in params.items():
        module_name, _, param_name = fqn.rpartition(".")
        module = model.get_submodule(module_name)
        active = p.active() if hasattr(p, "active") else p
        if isinstance(p, MaskedParam):
            p.remove()  # the mask's gradient hook belongs to the dense weight we drop
        out[fqn] = make_sparse(model, fqn, module, param_name, active, min_per_row)
    return out


from . import sparse_conv  # noqa: E402,F401  (adds nn.Conv2d to FROM_DENSE)
