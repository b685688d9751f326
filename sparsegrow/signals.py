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

`GrowSignals` is the one component that owns what growth reads, for every updated layer: the
dense weight gradient (RigL, masked storage only) or the (dZ, X) rows / their sketches (search).
The Sparsifier arms it per step; it sums micro-batches within a step (every backward while
armed adds) and, with accumulation, the steps of the window; `collect()` reduces it across ranks
(`sparsegrow.distributed`) and hands each layer's `Signal` to the grow criterion;
`state_dict()` checkpoints it whole, partial sums included, so a run resumed mid-window reads the
same window as an uninterrupted one.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .conv_sketch import conv_sketch_applies, conv_sketch_into
from .distributed import Collective
from .topology import DenseGradSource

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


def is_conv2d(module: nn.Module) -> bool:
    """nn.Conv2d, or a layer that applies its weight as one (SparseConv2d: `conv2d_like`), with
    kernel_size, stride, padding, dilation, groups and padding_mode like nn.Conv2d's."""
    return isinstance(module, nn.Conv2d) or getattr(module, "conv2d_like", False)


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
    if is_conv2d(module):
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


@dataclass(frozen=True)
class SignalSpec:
    """What a grow criterion reads at an update (its `needs_signal`).

    kind        "dense_grad": the dense weight gradient (masked storage: RigL's oracle);
                "rows": each layer's (dZ, X) rows, or their random-sign sketch (search)
    sketch_dim  rows of the random-sign sketch (0: raw rows; "rows" only)
    accumulate  sum the signal over every step of the window since the last update, not just
                the update step's micro-batches
    seed        seeds the sketch's buckets and signs
    momentum    beta in [0, 1) ("dense_grad" with accumulate only): 0 sums the window's steps;
                beta > 0 keeps the exponential moving average m <- beta * m + g_t over every
                step read, kept across updates (SNFS's momentum of the dense gradient)
    """

    kind: str
    sketch_dim: int = 0
    accumulate: bool = False
    seed: int = 0
    momentum: float = 0.0

    def __post_init__(self):
        if self.kind not in ("dense_grad", "rows"):
            raise ValueError(f"unknown signal kind {self.kind!r}; allowed: dense_grad, rows")
        if self.kind == "dense_grad" and self.sketch_dim:
            raise ValueError("sketch_dim applies to the rows signal (search grow), not to the "
                             "dense gradient")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"signal momentum must be in [0, 1), got {self.momentum!r}")
        if self.momentum and (self.kind != "dense_grad" or not self.accumulate):
            raise ValueError("signal momentum averages the dense gradient over every step: it "
                             "needs kind='dense_grad' and accumulate=True")


@dataclass
class Signal:
    """One layer's growth signal at an update: summed over micro-batches, steps and ranks."""

    dense_grad: torch.Tensor | None = None  # (*weight shape), Σ dL/dW (masked storage)
    Z: torch.Tensor | None = None  # (R, N) output-gradient rows (or sketch rows), float32
    X: torch.Tensor | None = None  # (R, M) input rows (or sketch rows), float32
    steps: int = 0  # armed steps that captured something
    time_s: float = 0.0  # wall time in the capture hooks (this rank)


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
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # raw (X, dZ) of a forward
        self._loaded: tuple[torch.Tensor, torch.Tensor] | None = None  # raw rows from a checkpoint
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
        self._pairs, self._loaded, self._sketch = [], None, None
        self.steps, self._captured, self.time_s = 0, False, 0.0

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
            if is_conv2d(self.module) and self._sketch_conv(x, g):
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
        if is_conv2d(self.module):
            per = max(1, _CHUNK_ROWS // max(1, g.shape[2] * g.shape[3]))
            for b0 in range(0, x.shape[0], per):
                yield conv_rows(self.module, x[b0:b0 + per], g[b0:b0 + per])
        else:
            yield g.reshape(-1, self.N), x.reshape(-1, self.M)

    def has_rows(self) -> bool:
        return bool(self._pairs) or self._loaded is not None or self._sketch is not None

    def parts(self) -> tuple[tuple | None, tuple | None]:
        """(raw (dZ rows (R, N), X rows (R, M)) or None, sketch (S_z (s, N), S_x (s, M)) or None),
        float32, without resetting. Raw rows of several ranks concatenate; sketches add up."""
        Zs, Xs = [], []
        if self._loaded is not None:
            Zs.append(self._loaded[0])
            Xs.append(self._loaded[1])
        for x, g in self._pairs:
            for Z, X in self._row_chunks(x, g):
                Zs.append(Z.float())
                Xs.append(X.float())
        raw = None
        if Zs:
            raw = (Zs[0], Xs[0]) if len(Zs) == 1 else (torch.cat(Zs), torch.cat(Xs))
        return raw, self._sketch

    def take(self) -> tuple[tuple | None, tuple | None]:
        """`parts()`, then reset; `last_steps` / `last_time_s` keep the window's counts."""
        out = self.parts()
        self.steps += int(self._captured)
        self._captured = False
        steps, spent = self.steps, self.time_s
        self.reset()
        self.last_steps, self.last_time_s = steps, spent
        return out

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(dZ rows (R, N), X rows (R, M)) captured since the last call, in float32; resets."""
        if not self.has_rows():
            raise RuntimeError(_nothing_captured(self.fqn))
        raw, sketch = self.take()
        parts = [p for p in (raw, sketch) if p is not None]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([parts[0][0], parts[1][0]]), torch.cat([parts[0][1], parts[1][1]])

    def state_dict(self) -> dict:
        raw, sketch = self.parts()
        return {"raw": raw, "sketch": sketch, "steps": self.steps + int(self._captured),
                "time_s": self.time_s}

    def load_state_dict(self, state: dict) -> None:
        self.reset()
        self._loaded = state["raw"]
        self._sketch = state["sketch"]
        self.steps, self.time_s = int(state["steps"]), float(state["time_s"])


def _nothing_captured(fqn: str) -> str:
    return (f"growth on {fqn}: no layer input/output gradient was captured for this update; run "
            "forward and loss.backward() (with gradients enabled) before sparsifier.step()")


class DenseGradSignal:
    """Σ of the dense weight gradients seen while armed (micro-batches and window steps).

    Reads the gradient through the storage's `DenseGradSource` hook, before the mask is applied.
    momentum > 0: `sum` holds the step in progress only; at the end of each step it is folded
    into the moving average `ema` <- momentum * ema + sum, which `take()` hands over (a copy)
    without resetting.
    """

    def __init__(self, param: DenseGradSource, accumulate: bool, momentum: float = 0.0):
        self.fqn, self.accumulate, self.momentum = param.fqn, accumulate, momentum
        self.armed = False
        self.sum: torch.Tensor | None = None  # (*weight shape)
        self.ema: torch.Tensor | None = None  # (*weight shape), momentum > 0 only
        self.steps, self._captured, self.time_s = 0, False, 0.0
        self._param = param
        param.observe_grad(self._on_grad)

    def _fold(self) -> None:
        """momentum > 0: the finished step's gradient (all its micro-batches) into the average."""
        if self.momentum and self.sum is not None:
            self.ema = self.sum if self.ema is None else self.ema.mul_(self.momentum).add_(self.sum)
            self.sum = None

    def remove(self) -> None:
        self._param.observe_grad(None)

    def arm(self, on: bool) -> None:
        if self._captured:
            self.steps += 1
            self._captured = False
            self._fold()
        if not on and not self.accumulate:
            self.reset()
        self.armed = on

    def reset(self) -> None:
        self.sum, self.steps, self._captured, self.time_s = None, 0, False, 0.0

    def _on_grad(self, grad: torch.Tensor) -> None:
        if not self.armed:
            return
        t0 = time.perf_counter()
        if self.sum is None:
            self.sum = grad.detach().float().clone()
        else:
            self.sum.add_(grad.detach())
        self._captured = True
        self.time_s += time.perf_counter() - t0

    def take(self) -> torch.Tensor | None:
        s = self.sum
        self.steps += int(self._captured)
        self.last_steps, self.last_time_s = self.steps, self.time_s
        if self.momentum:
            self._captured = False
            self._fold()
            s = None if self.ema is None else self.ema.clone()  # reduced in place across ranks
        self.reset()
        return s

    def state_dict(self) -> dict:
        return {"sum": self.sum, "steps": self.steps + int(self._captured), "time_s": self.time_s,
                "ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        self.reset()
        self.sum = state["sum"]
        self.ema = state.get("ema")
        self.steps, self.time_s = int(state["steps"]), float(state["time_s"])


class GrowSignals:
    """What growth reads, for every updated layer, as one component owned by the Sparsifier.

    spec: the grow criterion's `needs_signal`. params: the updated SparseParams. collective: the
    ranks to reduce over (a no-op for one process).

    Per rank the sketch draws its buckets and signs from its own generator (seed, layer, rank):
    the rows of different ranks are different rows, and independent hashes keep the summed
    sketch an unbiased estimate of the global batch's gradient.
    """

    def __init__(self, spec: SignalSpec, params, collective: Collective | None = None):
        self.spec = spec
        self.dist = collective or Collective(enabled=False)
        self.fqns = [p.fqn for p in params]
        self.layers: dict[str, LayerSignal | DenseGradSignal] = {}
        for k, p in enumerate(params):
            if spec.kind == "dense_grad":
                if not isinstance(p, DenseGradSource):
                    raise ValueError(
                        f"the grow criterion needs the dense gradient, which {type(p).__name__} "
                        f"({p.fqn}) never forms; use masked storage or grow='search'")
                self.layers[p.fqn] = DenseGradSignal(p, spec.accumulate, spec.momentum)
            else:
                seed = spec.seed * 1_000_003 + k + self.dist.rank * 1_000_000_007
                self.layers[p.fqn] = LayerSignal(p.module, p.shape, p.fqn, spec.sketch_dim,
                                                 spec.accumulate,
                                                 torch.Generator().manual_seed(seed))
        self.last_comm = {"bytes": 0, "time_s": 0.0}

    def remove(self) -> None:
        for s in self.layers.values():
            s.remove()
        self.layers = {}

    def arm(self, on: bool) -> None:
        """Capture during the coming forward/backward iff on (every step of the window under
        accumulation, else the update step only)."""
        for s in self.layers.values():
            s.arm(on)

    def collect(self) -> dict[str, Signal]:
        """Every layer's signal, reduced across ranks; resets. A collective: call on every rank."""
        t0 = time.perf_counter()
        if self.spec.kind == "dense_grad":
            grads = {f: s.take() for f, s in self.layers.items()}
            self._reduce_dense(grads)
            out = {f: Signal(dense_grad=g) for f, g in grads.items()}
        else:
            parts = {f: s.take() for f, s in self.layers.items()}
            parts = self._reduce_rows(parts)
            out = {}
            for f, (raw, sketch) in parts.items():
                got = [p for p in (raw, sketch) if p is not None]
                if not got:
                    raise RuntimeError(_nothing_captured(f))
                Z = got[0][0] if len(got) == 1 else torch.cat([got[0][0], got[1][0]])
                X = got[0][1] if len(got) == 1 else torch.cat([got[0][1], got[1][1]])
                out[f] = Signal(Z=Z, X=X)
        for f, sig in out.items():
            sig.steps, sig.time_s = self.layers[f].last_steps, self.layers[f].last_time_s
        self.last_comm = {"bytes": self.dist.take_bytes(), "time_s": time.perf_counter() - t0}
        return out

    # -- reduction across ranks ------------------------------------------------------------------

    def _present(self, flags: list[list[bool]]) -> torch.Tensor:
        """Which layers hold each part on any rank: (layers, parts) bool, one small all-reduce."""
        t = torch.tensor(flags, dtype=torch.int64, device=self.dist.device).reshape(len(flags), -1)
        if self.dist.active:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.dist.group)
        return t.bool().cpu()

    def _reduce_dense(self, grads: dict) -> None:
        if not self.dist.active:
            return
        present = self._present([[g is not None] for g in grads.values()])
        for (f, g), here in zip(list(grads.items()), present[:, 0].tolist()):
            if here and g is None:  # this rank saw no backward: it adds nothing
                p = self.layers[f]._param
                grads[f] = torch.zeros(p.shape, device=p.param.device)
        self.dist.all_reduce_sum_([g for g in grads.values() if g is not None])

    def _reduce_rows(self, parts: dict) -> dict:
        if not self.dist.active:
            return parts
        present = self._present([[raw is not None, sk is not None] for raw, sk in parts.values()])
        sketches = []
        out = {}
        for (f, (raw, sketch)), (has_raw, has_sketch) in zip(parts.items(), present.tolist()):
            layer = self.layers[f]
            if has_raw:  # raw rows of every rank, in rank order (a rank may hold none)
                if raw is None:
                    dev = _device_of(layer)
                    raw = (torch.zeros(0, layer.N, device=dev), torch.zeros(0, layer.M, device=dev))
                raw = (self.dist.all_gather_rows(raw[0]), self.dist.all_gather_rows(raw[1]))
            if has_sketch:
                if sketch is None:
                    s = self.spec.sketch_dim
                    dev = _device_of(layer)
                    sketch = (torch.zeros(s, layer.N, device=dev), torch.zeros(s, layer.M, device=dev))
                sketches += list(sketch)
            out[f] = (raw, sketch)
        self.dist.all_reduce_sum_(sketches)
        return out

    # -- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The partial window sums, reduced across ranks (a collective: call on every rank), and
        every rank's sketch generator. Loading gives the sums to rank 0 only, so the next
        reduction counts them once, whichever rank wrote the file."""
        layers = {f: s.state_dict() for f, s in self.layers.items()}
        # Copies: the reduction works in place and this rank keeps its own partial sums.
        if self.spec.kind == "dense_grad":
            for key in ("sum", "ema"):  # the step/window sum, and SNFS's moving average of it
                sums = {f: _clone(st.get(key)) for f, st in layers.items()}
                self._reduce_dense(sums)
                for f, st in layers.items():
                    st[key] = sums[f]
        else:
            reduced = self._reduce_rows({f: (_clone(st["raw"]), _clone(st["sketch"]))
                                         for f, st in layers.items()})
            for f, st in layers.items():
                st["raw"], st["sketch"] = reduced[f]
        gens = {f: s.generator.get_state() for f, s in self.layers.items()
                if isinstance(s, LayerSignal)}
        self.dist.take_bytes()
        return {"spec": self.spec.__dict__.copy(), "layers": layers,
                "generators": self.dist.all_gather_object(gens)}

    def load_state_dict(self, state: dict) -> None:
        if "layers" not in state:  # a checkpoint from before signals were checkpointed
            self.load_generators([state.get("generators", {})])
            return
        saved = state["spec"]
        if saved != self.spec.__dict__:
            raise ValueError(f"the checkpoint's growth signal {saved} differs from this "
                             f"Sparsifier's {self.spec.__dict__}")
        for f, s in self.layers.items():
            st = dict(state["layers"][f])
            if self.dist.rank != 0:  # the saved sums are global: rank 0 alone carries them on
                for key in _SUMMED:
                    if key in st:
                        st[key] = None
            for key in _SUMMED:
                v = st.get(key)
                if torch.is_tensor(v) or isinstance(v, tuple):
                    dev = _device_of(s)
                    st[key] = v.to(dev) if torch.is_tensor(v) else tuple(t.to(dev) for t in v)
            s.load_state_dict(st)
        self.load_generators(state["generators"])

    def load_generators(self, per_rank: list[dict]) -> None:
        if self.dist.rank >= len(per_rank):
            warnings.warn(f"sparsegrow: the checkpoint has sketch generators for {len(per_rank)} "
                          f"rank(s); rank {self.dist.rank} keeps its freshly seeded ones")
            return
        for f, st in per_rank[self.dist.rank].items():
            if f in self.layers and isinstance(self.layers[f], LayerSignal):
                self.layers[f].generator.set_state(st.cpu())  # map_location may have moved it


# the parts of a layer's saved signal that are sums over ranks (reduced when saved)
_SUMMED = ("sum", "ema", "raw", "sketch")


def _clone(v):
    if v is None:
        return None
    return v.clone() if torch.is_tensor(v) else tuple(t.clone() for t in v)


def _device_of(s) -> torch.device:
    if isinstance(s, DenseGradSignal):
        return s._param.param.device
    w = next(s.module.parameters(), None)
    return w.device if w is not None else torch.device("cpu")
