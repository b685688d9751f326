"""What growth reads without a dense gradient: each sparse layer's input X and output gradient dZ.

For a linear layer z = x Wᵀ the weight gradient is G = dZᵀ X (N × M), with dZ: (B, N) and
X: (B, M); for Conv2d the same holds with X replaced by the unfolded input patches and the rows
running over batch and spatial positions (B·P rows, M = in · kh · kw), in the flat order of the
weight (out, in, kh, kw). `LayerSignal` captures the two row groups with a forward hook (the
input) and a hook on the output tensor (its gradient, i.e. dZ before any in-place activation),
only while armed, so the dense weight gradient is never formed or read.

Optionally the rows are reduced by a seeded random-sign sketch: every row r goes to one of s
buckets h(r) with a random sign σ(r), S_z = R dZ, S_x = R X with R (s × rows) holding one ±1 per
column (the sparse, CountSketch form of a ±1/√s random-sign matrix). E[Rᵀ R] = I, so S_zᵀ S_x
estimates G without bias, at O(rows · (N + M)) cost and O(s · (N + M)) memory. With accumulation
the sketches of the ΔT steps since the last update add up, S_z = Σ_t R_t dZ_t, S_x = Σ_t R_t X_t,
with independent R_t, so S_zᵀ S_x estimates Σ_t G_t without bias (cross terms have mean zero).
s = 1 is GSE's single-row estimate (Heddes et al., "Guided stochastic exploration").
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from .conv_sketch import conv_sketch_applies, conv_sketch_into

_CHUNK_ROWS = 1 << 16  # rows sketched at once (bounds the unfolded patches held at a time)


def sketch_rows(Z: torch.Tensor, X: torch.Tensor, s: int, generator: torch.Generator,
                out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Add the random-sign sketch of rows (Z: (R, N), X: (R, M)) into out = (S_z (s, N), S_x (s, M))."""
    if out is None:
        out = (Z.new_zeros(s, Z.shape[1]), X.new_zeros(s, X.shape[1]))
    bucket, sign = _hash_rows(Z.shape[0], s, generator, Z.device, Z.dtype)
    out[0].index_add_(0, bucket, Z * sign[:, None])
    out[1].index_add_(0, bucket, X * sign[:, None])
    return out


def _hash_rows(R: int, s: int, generator: torch.Generator, device, dtype):
    """Each of R rows' bucket (R,) in [0, s) and sign (R,) in {-1, +1}, drawn on the CPU generator."""
    bucket = torch.randint(0, s, (R,), generator=generator).to(device)
    sign = (torch.randint(0, 2, (R,), generator=generator) * 2 - 1).to(device, dtype)
    return bucket, sign


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            if total % 2:
                raise ValueError("search grow: Conv2d padding='same' with an even kernel is not supported")
            pads.append(total // 2)
        return tuple(pads)
    return tuple(conv.padding)


def conv_rows(conv: nn.Conv2d, x: torch.Tensor, dz: torch.Tensor):
    """Unfolded patches and output gradients of a Conv2d as row groups.

    x: (B, C, H, W), dz: (B, O, H', W') -> ((B·P, O), (B·P, C·kh·kw)), P = H'·W'.
    """
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=_conv_padding(conv),
                    stride=conv.stride)  # (B, C·kh·kw, P)
    X = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    Z = dz.flatten(2).transpose(1, 2).reshape(-1, dz.shape[1])
    return Z, X


def check_module(module: nn.Module, shape: torch.Size, fqn: str) -> None:
    """Search grow reads Linear-like layers (2-D weight) and plain Conv2d."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"search grow: {fqn} is a grouped Conv2d (groups={module.groups}); "
                             "only groups=1 is supported")
        if module.padding_mode != "zeros":
            raise ValueError(f"search grow: {fqn} uses padding_mode={module.padding_mode!r}; "
                             "only 'zeros' is supported")
        _conv_padding(module)
    elif len(shape) != 2:
        raise ValueError(f"search grow: {fqn} has a {len(shape)}-D weight in a "
                         f"{type(module).__name__}; only Linear-like (2-D) and Conv2d are supported")


class LayerSignal:
    """Captures (dZ rows, X rows) of one layer while armed; `rows()` hands them over and resets.

    Each forward while armed stores its input and hooks its output; the pair becomes rows when
    the output's gradient arrives (several forwards per step, e.g. gradient accumulation or a
    shared layer, add their rows, i.e. their gradients). A forward without backward leaves nothing.
    sketch_dim s > 0 reduces the rows to s by the random-sign sketch as soon as each pair arrives,
    when that saves memory (always under accumulation, whose sketches must add up).
    """

    def __init__(self, module: nn.Module, shape: torch.Size, fqn: str, sketch_dim: int = 0,
                 accumulate: bool = False, generator: torch.Generator | None = None):
        check_module(module, shape, fqn)
        self.module, self.fqn = module, fqn
        self.N, self.M = shape[0], math.prod(shape[1:])
        self.sketch_dim, self.accumulate = sketch_dim, accumulate
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.armed = False
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # raw (dZ rows, X rows)
        self._sketch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.steps = 0  # arm periods that captured something, since the last rows()
        self._captured = False
        self.time_s = 0.0  # wall time in the gradient hook (sketching) since the last rows()
        self._handle = module.register_forward_hook(self._on_forward)

    def remove(self) -> None:
        self._handle.remove()

    def arm(self, on: bool) -> None:
        if self._captured:
            self.steps += 1
            self._captured = False
        if not on and not self.accumulate:
            self.reset()
        self.armed = on

    def reset(self) -> None:
        self._pairs, self._sketch, self.steps, self._captured = [], None, 0, False
        self.time_s = 0.0

    def _on_forward(self, module, args, output) -> None:
        if not self.armed or not torch.is_tensor(output) or not output.requires_grad:
            return
        x = args[0].detach()
        output.register_hook(lambda g, x=x: self._on_grad(x, g))

    def _on_grad(self, x: torch.Tensor, g: torch.Tensor) -> None:
        t0 = time.perf_counter()
        try:
            self._capture(x, g.detach())
        finally:
            self.time_s += time.perf_counter() - t0

    def _capture(self, x: torch.Tensor, g: torch.Tensor) -> None:
        self._captured = True
        if self.sketch_dim and (self.accumulate or g.numel() // self.N > self.sketch_dim):
            if isinstance(self.module, nn.Conv2d) and self._sketch_conv(x, g):
                return
            for Z, X in self._row_chunks(x, g):
                self._sketch = sketch_rows(Z.float(), X.float(), self.sketch_dim,
                                           self.generator, self._sketch)
        else:
            self._pairs.append((x, g))

    def _sketch_conv(self, x: torch.Tensor, g: torch.Tensor) -> bool:
        """Sketch a Conv2d's rows with the fused kernel (no unfolding); False if it does not apply.

        Draws the same buckets and signs, chunk by chunk, as the unfolding path would."""
        if not conv_sketch_applies(x, g):
            return False
        s, P = self.sketch_dim, g.shape[2] * g.shape[3]
        if self._sketch is None:
            self._sketch = (g.new_zeros(s, self.N), x.new_zeros(s, self.M))
        pad = _conv_padding(self.module)
        per = max(1, _CHUNK_ROWS // max(1, P))
        for b0 in range(0, x.shape[0], per):
            xb, gb = x[b0:b0 + per], g[b0:b0 + per]
            bucket, sign = _hash_rows(gb.shape[0] * P, s, self.generator, g.device, g.dtype)
            conv_sketch_into(self.module, pad, xb, gb, bucket, sign, self._sketch)
        return True

    def _row_chunks(self, x: torch.Tensor, g: torch.Tensor):
        """(dZ rows, X rows) of one forward, a few samples at a time for Conv2d."""
        if isinstance(self.module, nn.Conv2d):
            per = max(1, _CHUNK_ROWS // max(1, g.shape[2] * g.shape[3]))
            for b0 in range(0, x.shape[0], per):
                yield conv_rows(self.module, x[b0:b0 + per], g[b0:b0 + per])
        else:
            yield g.reshape(-1, self.N), x.reshape(-1, self.M)

    def has_rows(self) -> bool:
        return bool(self._pairs) or self._sketch is not None

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(dZ rows (R, N), X rows (R, M)) captured since the last call, in float32; resets."""
        if not self.has_rows():
            raise RuntimeError(
                f"search grow on {self.fqn}: no layer input/output gradient was captured for this "
                "update; run forward and loss.backward() (with gradients enabled) before "
                "sparsifier.step(), and let the Sparsifier attach and arm the criterion"
            )
        Zs, Xs = [], []
        for x, g in self._pairs:
            for Z, X in self._row_chunks(x, g):
                Zs.append(Z.float())
                Xs.append(X.float())
        if self._sketch is not None:
            Zs.append(self._sketch[0])
            Xs.append(self._sketch[1])
        self.steps += int(self._captured)
        self._captured = False
        steps, spent = self.steps, self.time_s
        self.reset()
        self.last_steps, self.last_time_s = steps, spent
        Z = Zs[0] if len(Zs) == 1 else torch.cat(Zs)
        X = Xs[0] if len(Xs) == 1 else torch.cat(Xs)
        return Z, X
