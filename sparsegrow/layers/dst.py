"""Trainable masked layers of Dynamic Sparse Training (Liu et al. 2020, arXiv:2005.06870).

A DST layer keeps its dense weight W and adds trainable thresholds t. The weight it computes with
is W * M, where

    Q = |W| - t                 t broadcast per output unit ("vector"), per layer ("scalar")
                                or per weight ("weight", the paper's matrix form)
    M = S(Q)                    S(x) = 1 if x >= 0 else 0, the unit step

S has derivative zero almost everywhere, so backward replaces dS/dQ with the paper's long-tailed
estimator

    H(x) = 2 - 4|x|   for |x| <= 0.4
           0.4        for 0.4 < |x| <= 1
           0          otherwise

(`LongTailedStep`). Autograd then gives, with g = dL/d(W * M):

    dL/dt_i  = -sum_j g_ij * W_ij * H(Q_ij)               (the structure gradient)
    dL/dW_ij =  g_ij * M_ij + g_ij * |W_ij| * H(Q_ij)     (performance + structure paths)

so a masked weight (M = 0) whose |W| is within 1 of its threshold still moves along -g, scaled by
|W| H(Q), and can come back when |W| climbs over t. Weights are never zeroed by the mask: the
topology is a function of (W, t) at every step. Thresholds start at 0 (the layer starts dense).
The paper's density floor (reset a layer's thresholds when fewer than 1% of its weights are
active) is applied by `sparsegrow.dst.DSTSparsifier.step`, not here.

The comparison is `>= 0` as in the paper; the authors' code uses `> 0`. They differ only for
|W| == t exactly, e.g. a weight of exactly 0 under threshold 0 (active here, but contributing 0).
"""
from __future__ import annotations

import torch
from torch import nn

# kind -> description; the kind is a config string, so the allowed names live in one place.
THRESHOLD_KINDS = {
    "vector": "one threshold per output unit (row / output channel), the paper's choice",
    "scalar": "one threshold for the whole layer",
    "weight": "one threshold per weight (the paper's matrix form)",
}


def long_tailed(x: torch.Tensor) -> torch.Tensor:
    """H(x), the long-tailed estimator of the unit step's derivative (elementwise)."""
    a = x.abs()
    return torch.where(a <= 0.4, 2 - 4 * a, torch.where(a <= 1, 0.4, 0.0).to(x.dtype))


class LongTailedStep(torch.autograd.Function):
    """Unit step S(x) = [x >= 0] forward; dS/dx := H(x) backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad_out * long_tailed(x)


unit_step = LongTailedStep.apply


def threshold_shape(kind: str, weight_shape: torch.Size) -> tuple[int, ...]:
    if kind not in THRESHOLD_KINDS:
        allowed = "; ".join(f"{k!r}: {d}" for k, d in THRESHOLD_KINDS.items())
        raise ValueError(f"unknown threshold kind {kind!r}; allowed: {allowed}")
    if kind == "vector":
        return (weight_shape[0],)
    if kind == "scalar":
        return (1,)
    return tuple(weight_shape)


class _Thresholded:
    """What Linear and Conv2d share: thresholds, the mask and the masked weight.

    A mixin rather than a base class so that DSTLinear *is* an nn.Linear (state_dict keys,
    isinstance checks, init and extra_repr stay those of torch) and adds only a `threshold`.
    """

    weight: nn.Parameter
    threshold: nn.Parameter
    threshold_kind: str

    def _adopt(self, dense: nn.Module, threshold: str) -> None:
        """Share `dense`'s weight and bias Parameters (no copy, no re-init); new thresholds."""
        self.weight = dense.weight
        self.bias = dense.bias
        self._make_threshold(threshold)
        self.train(dense.training)

    def _make_threshold(self, kind: str) -> None:
        shape = threshold_shape(kind, self.weight.shape)
        self.threshold_kind = kind
        # Thresholds start at 0: every nonzero weight is active, the layer starts dense.
        self.threshold = nn.Parameter(
            torch.zeros(shape, device=self.weight.device, dtype=self.weight.dtype)
        )

    def _broadcast_threshold(self) -> torch.Tensor:
        t = self.threshold
        if self.threshold_kind == "vector":  # (out,) -> (out, 1, ...) against (out, in, *k)
            return t.view(-1, *([1] * (self.weight.dim() - 1)))
        return t  # (1,) or the weight's own shape

    def masked_weight(self) -> torch.Tensor:
        """W * S(|W| - t), differentiable in W and t through the long-tailed estimator."""
        return self.weight * unit_step(self.weight.abs() - self._broadcast_threshold())

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        """Boolean mask M, the weight's shape; True where the connection is active."""
        return self.weight.abs() - self._broadcast_threshold() >= 0

    def density(self) -> float:
        return float(self.mask().float().mean())

    @torch.no_grad()
    def reset_thresholds(self) -> None:
        self.threshold.zero_()

    def _check_threshold_shape(self) -> None:
        want = threshold_shape(self.threshold_kind, self.weight.shape)
        if tuple(self.threshold.shape) != want:
            raise ValueError(
                f"threshold of shape {tuple(self.threshold.shape)} does not fit kind "
                f"{self.threshold_kind!r} for weight {tuple(self.weight.shape)}; expected {want}"
            )


class DSTLinear(_Thresholded, nn.Linear):
    """nn.Linear whose weight is masked by trainable thresholds; weight (out, in), t per kind."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 threshold: str = "vector", device=None, dtype=None):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._make_threshold(threshold)

    @classmethod
    def from_dense(cls, linear: nn.Linear, threshold: str = "vector") -> "DSTLinear":
        """A DSTLinear sharing `linear`'s weight and bias Parameters (no copy, no re-init)."""
        threshold_shape(threshold, linear.weight.shape)  # validate before building anything
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    threshold=threshold, device="meta")
        layer._adopt(linear, threshold)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.masked_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, threshold={self.threshold_kind}"


class DSTConv2d(_Thresholded, nn.Conv2d):
    """nn.Conv2d whose weight (out, in/groups, kh, kw) is masked by trainable thresholds."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 threshold: str = "vector", device=None, dtype=None):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding,
                           dilation, groups, bias, padding_mode, device=device, dtype=dtype)
        self._make_threshold(threshold)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, threshold: str = "vector") -> "DSTConv2d":
        """A DSTConv2d sharing `conv`'s weight and bias Parameters (no copy, no re-init)."""
        threshold_shape(threshold, conv.weight.shape)
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                    conv.padding_mode, threshold=threshold, device="meta")
        layer._adopt(conv, threshold)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, threshold={self.threshold_kind}"


DST_LAYERS = {nn.Linear: DSTLinear, nn.Conv2d: DSTConv2d}  # dense type -> its DST layer
