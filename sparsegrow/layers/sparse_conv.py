"""A truly sparse Conv2d: values (nnz,) + CSR indices, no (out, in, kh, kw) tensor at any stage.

    layer = SparseConv2d(in_channels, out_channels, 3, active, padding=1)   # active: sorted
    sparsifier = sparsegrow.sparsify(cnn, density=0.1, method="search", storage="sparse", ...)

The weight is the matrix W (N=out_channels, K=in_channels·kh·kw) of nn.Conv2d's
weight.view(out, -1): connection j*K + i joins output channel j to patch entry i = c·kh·kw +
u·kw + v, the order of F.unfold's rows. It is stored exactly as SparseLinear's (the shared
`CSRModule`: values, crow/col, the transposed view, topology updates, checkpoints), so every
drop/grow criterion, distribution, schedule, sketch and search backend drives it through the same
`SparseLinearParam` view; its `shape` is the 4-D (out, in, kh, kw) the distributions (ERK) read.

Forward, with P = H'·W' output positions per sample:
    Xᵀ   = patches(x)                     (K, B·P)      im2col, feature-major, one strided copy
    Yᵀ   = W Xᵀ                           (N, B·P)      SpMM (kernels.spmm)
    y    = Yᵀ as (B, N, H', W') + bias
Backward (SparseLinear's `csr_grads`): dW only at the nnz, dW[k] = <dYᵀ[row_k], Xᵀ[col_k]> over
the B·P positions (SDDMM), with Xᵀ extracted again from the saved x; then dXᵀ = Wᵀ dYᵀ (SpMM on
the transposed CSR) and `fold` sums the patch gradients back onto the input. Between forward
and backward only x is held (not the K/C = kh·kw times larger patches); the largest temporary is
one (K, B·P) tensor at a time, which nn.Conv2d's own CPU path also builds.

Search grow reads this layer like an nn.Conv2d: it exposes kernel_size, stride, padding,
dilation, groups (1) and padding_mode ("zeros"), its forward takes the input as args[0] and
returns the convolution output, so `signals.LayerSignal`'s hooks capture (dZ, patch) rows, or
sketch them with the fused kernel, unchanged.

Supported: stride, padding (int, pair, 'valid', or 'same' where the total padding d·(k-1) is even
in both dimensions and stride is 1), dilation, bias. groups > 1 and padding_mode other than
'zeros' are refused at construction.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from . import kernels
from .sparse_linear import FROM_DENSE, CSRModule, compute_dtypes, csr_grads, no_autocast


def patches(x: torch.Tensor, geometry: tuple) -> torch.Tensor:
    """The unfolded input, feature-major: (B, C, H, W) -> Xᵀ (K, B·P), row c·kh·kw + u·kw + v.

    F.unfold's result (B, K, P) would still need a transposing copy, and its CPU im2col is
    single-threaded and ~10x slower than a strided copy here (3.2 s vs 0.2 s for B=128,
    16 channels, 32x32). Instead: zero-pad, take the windows as a view with Tensor.unfold
    (stride s, span d·(k-1)+1, every d-th element for dilation d) and copy that
    (C, kh, kw, B, H', W') view once."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    win = x.unfold(2, dh * (kh - 1) + 1, sh)[..., ::dh]  # (B, C, H', Wp, kh)
    win = win.unfold(3, dw * (kw - 1) + 1, sw)[..., ::dw]  # (B, C, H', W', kh, kw)
    return win.permute(1, 4, 5, 0, 2, 3).reshape(-1, win.shape[0] * win.shape[2] * win.shape[3])


def fold(dxt: torch.Tensor, x_shape: torch.Size, geometry: tuple) -> torch.Tensor:
    """The adjoint of `patches`: Xᵀ-shaped (K, B·P) -> (B, C, H, W), summing overlaps.

    One strided add per kernel offset (kh·kw of them), each over all of (B, C, H', W')."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry
    B, C, H, W = x_shape
    g = dxt.new_zeros(B, C, H + 2 * ph, W + 2 * pw)
    ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    d6 = dxt.view(C, kh, kw, B, ho, wo)
    for u in range(kh):
        for v in range(kw):
            g[:, :, u * dh: u * dh + sh * (ho - 1) + 1: sh,
              v * dw: v * dw + sw * (wo - 1) + 1: sw] += d6[:, u, v].transpose(0, 1)
    return g[:, :, ph: ph + H, pw: pw + W]


_EVAL_PATCH_NUMEL = 1 << 24  # patch numbers unfolded at once without autograd (64 MiB float32)


class _SparseConvFn(torch.autograd.Function):
    """Yᵀ (N, B·P) = W Xᵀ over the patches Xᵀ = patches(x). Saves x, not its K/C times larger
    patches (autograd usually holds x anyway, e.g. for the ReLU before the conv), and extracts
    them again in backward for the weight gradient, dropping them before dXᵀ is made."""

    @staticmethod
    def forward(ctx, x, values, geometry, crow, col, ccol, row_t, perm):
        ctx.geometry = geometry
        ctx.save_for_backward(x, values, crow, col, ccol, row_t, perm)
        return kernels.spmm(crow, col, values, patches(x, geometry), crow.numel() - 1)

    @staticmethod
    def backward(ctx, dyt):
        x, values, crow, col, ccol, row_t, perm = ctx.saved_tensors
        dxt, dv = csr_grads(dyt.contiguous(), lambda: patches(x, ctx.geometry),
                            ctx.needs_input_grad[:2], values, crow, col, ccol, row_t, perm)
        dx = fold(dxt, x.shape, ctx.geometry) if dxt is not None else None
        return dx, dv, None, None, None, None, None, None


def _resolve_padding(padding, kernel_size: tuple[int, int], stride: tuple[int, int],
                     dilation: tuple[int, int]) -> tuple[int, int]:
    """Padding as (ph, pw): the pair, or what 'valid' / 'same' mean for this kernel."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding != "same":
            raise ValueError(f"SparseConv2d: padding={padding!r}; allowed: an int, a pair, "
                             "'valid' or 'same'")
        if stride != (1, 1):
            raise ValueError("SparseConv2d: padding='same' needs stride 1 (as nn.Conv2d)")
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        if any(t % 2 for t in totals):
            raise ValueError(f"SparseConv2d: padding='same' with kernel {kernel_size} and "
                             f"dilation {dilation} pads unevenly, which unfold cannot; give the "
                             "padding as numbers or use an odd kernel")
        return (totals[0] // 2, totals[1] // 2)
    pad = _pair(padding)
    if len(pad) != 2 or any(not isinstance(p, int) or p < 0 for p in pad):
        raise ValueError(f"SparseConv2d: padding={padding!r}; allowed: a non-negative int, a "
                         "pair of them, 'valid' or 'same'")
    return tuple(pad)


class SparseConv2d(CSRModule):
    """y = conv2d(x, W) + b with W (out, in, kh, kw) stored as CSR values + indices over
    (out, in·kh·kw).

    active: sorted flat indices j * (in·kh·kw) + i into weight.view(out, -1), (nnz,).
    values: their initial weights (nnz,); default nn.Conv2d's U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    min_per_row: every output channel must keep at least this many inputs.
    index_dtype: as SparseLinear's (None: int32 where it fits).
    """

    conv2d_like = True  # read by signals.is_conv2d: search grow unfolds its input like a Conv2d's

    def __init__(self, in_channels: int, out_channels: int, kernel_size, active: torch.Tensor,
                 values: torch.Tensor | None = None, bias: bool | torch.Tensor = True, *,
                 stride=1, padding=0, dilation=1, groups: int = 1, padding_mode: str = "zeros",
                 min_per_row: int = 0, generator: torch.Generator | None = None,
                 device=None, dtype=None, index_dtype: torch.dtype | None = None):
        super().__init__()
        if groups != 1:
            raise ValueError(f"SparseConv2d: groups={groups}; only groups=1 is supported (a "
                             "grouped convolution is block-sparse already: use storage='masked')")
        if padding_mode != "zeros":
            raise ValueError(f"SparseConv2d: padding_mode={padding_mode!r}; only 'zeros' is "
                             "supported (use storage='masked')")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.dilation = _pair(dilation)
        self.padding = _resolve_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.groups, self.padding_mode = 1, "zeros"
        self._init_csr(out_channels, self.in_channels * math.prod(self.kernel_size), active,
                       values, bias, min_per_row, generator, device, dtype, index_dtype)

    # -- construction / conversion -----------------------------------------------------------

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, active: torch.Tensor, **kwargs) -> "SparseConv2d":
        """The weights of `conv` at `active` (a meta-device Conv2d gets the default init)."""
        w, bias = conv.weight, conv.bias
        geometry = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                        groups=conv.groups, padding_mode=conv.padding_mode)
        args = (conv.in_channels, conv.out_channels, conv.kernel_size)
        if w.device.type == "meta":
            return cls(*args, active.cpu(), None, bias is not None, dtype=w.dtype, device="cpu",
                       **geometry, **kwargs)
        active = active.to(w.device)
        return cls(*args, active, w.detach().reshape(-1)[active],
                   bias.detach() if bias is not None else False, **geometry, **kwargs)

    def to_dense_module(self) -> nn.Conv2d:
        """An nn.Conv2d holding W densely (zeros off the active set): only where it fits."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, bias=self.bias is not None,
                         device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            self._fill_dense(conv.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_channels, self.in_channels, *self.kernel_size))

    # -- forward -----------------------------------------------------------------------------

    def _geometry(self) -> tuple:
        return self.kernel_size, self.stride, self.padding, self.dilation

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in zip(
            (h, w), self.padding, self.dilation, self.kernel_size, self.stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SparseConv2d expects (B, {self.in_channels}, H, W) input, got "
                             f"{tuple(x.shape)}")
        compute, out_dtype = compute_dtypes(x, self.values, "SparseConv2d")
        B = x.shape[0]
        ho, wo = self.output_size(x.shape[2], x.shape[3])
        if ho <= 0 or wo <= 0:
            raise ValueError(f"SparseConv2d: input {tuple(x.shape)} is smaller than the "
                             f"(dilated) kernel {self.kernel_size}")
        x, w = x.to(compute), self.values.to(compute)
        csr = (self.crow, self.col, self.ccol, self.row_t, self.perm)
        with no_autocast(x.device):
            if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
                yt = _SparseConvFn.apply(x, w, self._geometry(), *csr)  # (N, B·P)
            else:
                # Without a graph, nothing has to outlive a chunk: unfold a few samples at a
                # time, so evaluation batches (e.g. 1000) never hold all their patches at once.
                per = max(1, _EVAL_PATCH_NUMEL // (self.n_cols * ho * wo))
                yt = torch.cat([_SparseConvFn.apply(x[b0:b0 + per], w, self._geometry(), *csr)
                                for b0 in range(0, B, per)], dim=1)  # (N, B·P), sample-major
        y = yt.view(self.out_channels, B, ho, wo)
        if self.bias is not None:
            y = y + self.bias.to(compute)[:, None, None, None]
        # (B, N, H', W') in the standard layout the next layers (BatchNorm, adds) expect
        return y.transpose(0, 1).to(out_dtype).contiguous()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"nnz={self.nnz()}, density={self.density():.3g}, bias={self.bias is not None}")


FROM_DENSE[nn.Conv2d] = SparseConv2d.from_dense
