"""Dynamic Sparse Training (Liu et al. 2020, arXiv:2005.06870) behind the Sparsifier's interface.

    sparsifier = DSTSparsifier(model, alpha=5e-4)        # swaps Linear/Conv2d for DST layers
    optimizer = torch.optim.Adam(param_groups(model, weight_decay=0.0), lr=1e-3)  # AFTER
    sparsifier.attach(optimizer)
    for x, y in data:
        loss = F.cross_entropy(model(x), y) + sparsifier.loss()   # + alpha * sum exp(-t)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        stats = sparsifier.step()           # a dict every `stats_every` steps or on a reset

Unlike SET/RigL nothing is scheduled: each chosen layer learns thresholds t by backpropagation
(`sparsegrow.layers.dst`), the mask M = S(|W| - t) may change at every optimizer step, and the
density is an outcome, pushed down by the sparse regularisation term

    L_S = alpha * sum_layers sum_i exp(-t_i)

which `loss()` returns for the caller to add to the task loss. `step()` applies the paper's rule
that keeps a layer from collapsing: when fewer than `floor` (1%) of its weights are active, its
thresholds are reset to 0 (and their optimizer state zeroed, so momentum does not push them
straight back up; the paper is silent on optimizer state). It also keeps the ITOP record (every
connection ever active); DST starts dense, so its ITOP rate is ~1 from step 0.

The thresholds are nn.Parameters inside the swapped modules, so build the optimizer after the
DSTSparsifier, and keep weight decay off them (decay pulls t toward 0, i.e. toward density 1,
fighting L_S): `param_groups(model, weight_decay)` puts them in a group with weight_decay 0.
"""
from __future__ import annotations

import math
import numbers
import time
import warnings
from typing import Callable, Iterable

import torch
from torch import nn

from . import optim_state
from .layers.dst import DST_LAYERS, THRESHOLD_KINDS, DSTConv2d, DSTLinear
from .metrics import density_report
from .updater import METHODS, Method, select_params

_DST_TYPES = (DSTLinear, DSTConv2d)


def _check_alpha(alpha) -> float:
    if (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
            or not math.isfinite(alpha) or alpha < 0):
        raise ValueError(
            f"alpha must be a finite number >= 0 (the weight of alpha * sum exp(-t)), got {alpha!r}"
        )
    return float(alpha)


class DSTSparsifier:
    """Swap the chosen Linear/Conv2d modules for DST layers; regularise, floor and report them.

    alpha: weight of the sparse regularisation term (5e-4 is the authors' MNIST default).
    threshold: "vector" (per output unit, default), "scalar" or "weight"; see THRESHOLD_KINDS.
    include: as `sparsegrow.updater.select_params`: None (every Linear and Conv2d weight), a list
        of fully qualified weight names, or a filter function (module, param_name) -> bool.
    floor: the density below which a layer's thresholds are reset to 0 (the paper's 1%).
    stats_every: `step()` returns its stats every this many steps (and on any reset).
    seed: accepted for the Sparsifier's interface; DST makes no random choice.
    optimizer: accepted for the interface; it can only be the right one if it was built after
        this constructor, so prefer `attach(optimizer)`.
    """

    method = "dst"
    dynamic = True
    schedule = None

    def __init__(
        self,
        model: nn.Module,
        *,
        alpha: float = 5e-4,
        threshold: str = "vector",
        include: Iterable[str] | Callable[[nn.Module, str], bool] | None = None,
        floor: float = 0.01,
        stats_every: int = 100,
        seed: int = 0,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        self.alpha = _check_alpha(alpha)
        if threshold not in THRESHOLD_KINDS:
            allowed = "; ".join(f"{k!r}: {d}" for k, d in THRESHOLD_KINDS.items())
            raise ValueError(f"unknown threshold kind {threshold!r}; allowed: {allowed}")
        if (isinstance(floor, bool) or not isinstance(floor, numbers.Real)
                or not 0.0 <= floor < 1.0):
            raise ValueError(f"floor must be a density in [0, 1), got {floor!r}")
        if isinstance(stats_every, bool) or not isinstance(stats_every, int) or stats_every < 1:
            raise ValueError(f"stats_every must be an integer >= 1, got {stats_every!r}")
        self.threshold_kind = threshold
        self.floor = float(floor)
        self.stats_every = stats_every
        self.seed = seed

        self.layers: dict[str, DSTLinear | DSTConv2d] = {}  # weight fqn -> layer, model order
        for fqn, module, p_name in select_params(model, include):
            self.layers[fqn] = self._swap(model, fqn, module, p_name)
        self.numel = {fqn: layer.weight.numel() for fqn, layer in self.layers.items()}
        masks = {fqn: layer.mask() for fqn, layer in self.layers.items()}
        self.ever_active = {fqn: m.clone() for fqn, m in masks.items()}  # bool, weight shape
        self._last = masks  # the masks after the previous step, for churn counts
        self._window = {"dropped": 0, "grown": 0, "resets": []}  # since the last returned stats
        self.n_resets = {fqn: 0 for fqn in self.layers}
        self.step_count = 0
        self.update_time_s = 0.0
        self.n_updates = 0
        self.optimizer = None
        if optimizer is not None:
            self.attach(optimizer)

    def _swap(self, model: nn.Module, fqn: str, module: nn.Module, p_name: str):
        if isinstance(module, _DST_TYPES):
            if p_name != "weight" or module.threshold_kind != self.threshold_kind:
                raise ValueError(f"{fqn}: already a DST layer with threshold kind "
                                 f"{module.threshold_kind!r}, not {self.threshold_kind!r}")
            return module
        if p_name != "weight" or type(module) not in DST_LAYERS:
            # Exact types only: subclasses (e.g. attention's out_proj) may read .weight directly,
            # bypassing the mask.
            raise ValueError(
                f"DST can mask only the weight of a plain nn.Linear or nn.Conv2d; {fqn!r} is "
                f"{p_name!r} of {type(module).__name__}"
            )
        holder = fqn.rpartition(".")[0]  # "features.0.weight" -> "features.0"
        if not holder:
            raise ValueError(f"{fqn!r}: the model itself is the layer; wrap it in a container")
        parent_name, _, child = holder.rpartition(".")  # "features", "0"
        parent = model.get_submodule(parent_name)
        layer = DST_LAYERS[type(module)].from_dense(module, self.threshold_kind)
        setattr(parent, child, layer)
        return layer

    # -- lifecycle ---------------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> "DSTSparsifier":
        """The optimizer that trains the thresholds (its threshold state is reset on resets)."""
        optim_state.reset_entry(optimizer)  # a ValueError unless its reset table entry is known
        in_opt = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        missing = [fqn for fqn, layer in self.layers.items() if id(layer.threshold) not in in_opt]
        if missing:
            raise ValueError(
                f"the optimizer does not train the DST thresholds of {missing}: build it after "
                f"DSTSparsifier(...) swapped the layers (e.g. param_groups(model, weight_decay))"
            )
        decayed = [fqn for fqn, layer in self.layers.items()
                   if in_opt[id(layer.threshold)].get("weight_decay", 0.0)]
        if decayed:
            warnings.warn(f"weight decay applies to the DST thresholds of {decayed}, pulling "
                          f"them toward 0 (density 1); use sparsegrow.dst.param_groups",
                          stacklevel=2)
        self.optimizer = optimizer
        return self

    @staticmethod
    def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
        """`param_groups` below: thresholds in a group without weight decay."""
        return param_groups(model, weight_decay)

    def loss(self) -> torch.Tensor:
        """L_S = alpha * sum over layers and thresholds of exp(-t); add it to the task loss."""
        terms = [layer.threshold.neg().exp().sum() for layer in self.layers.values()]
        return self.alpha * torch.stack(terms).sum()

    @torch.no_grad()
    def step(self) -> dict | None:
        """Call once after each optimizer.step(): density floor, ITOP and churn bookkeeping.

        Returns stats every `stats_every` steps and on any step with a reset, else None.
        """
        self.step_count += 1
        t0 = time.perf_counter()
        resets = []
        for fqn, layer in self.layers.items():
            mask = layer.mask()
            if int(mask.sum()) < self.floor * mask.numel():
                layer.reset_thresholds()
                if self.optimizer is not None:
                    optim_state.reset_positions(self.optimizer, layer.threshold,
                                                torch.arange(layer.threshold.numel()))
                self.n_resets[fqn] += 1
                resets.append(fqn)
                mask = layer.mask()
            last = self._last[fqn]
            changed = last ^ mask
            dropped = int((changed & last).sum())  # active -> inactive
            self._window["dropped"] += dropped
            self._window["grown"] += int(changed.sum()) - dropped
            self.ever_active[fqn] |= mask
            self._last[fqn] = mask
        self._window["resets"] += resets
        dt = time.perf_counter() - t0
        self.update_time_s += dt
        self.n_updates += 1  # every step is a topology update in DST
        if not resets and self.step_count % self.stats_every:
            return None
        stats = {
            "step": self.step_count,
            "time_s": dt,
            "dropped": self._window["dropped"],  # active -> inactive since the last stats
            "grown": self._window["grown"],  # inactive -> active since the last stats
            "regrown": 0,  # no drop-and-grow in one update here; kept for the common format
            "resets": self._window["resets"],  # layers whose thresholds were reset, in order
            "global_density": self.density,
            "layers": {fqn: {"nnz": int(self._last[fqn].sum()),
                             "density": float(self._last[fqn].float().mean()),
                             "threshold_mean": float(layer.threshold.mean())}
                       for fqn, layer in self.layers.items()},
        }
        self._window = {"dropped": 0, "grown": 0, "resets": []}
        return stats

    # -- reporting and state -----------------------------------------------------------------

    @property
    def density(self) -> float:
        """The current global density (an outcome in DST, not a target)."""
        return self.report()["global_density"]

    def report(self) -> dict:
        """Same keys as Sparsifier.report(); densities are of the current masks."""
        nnz = {fqn: int(layer.mask().sum()) for fqn, layer in self.layers.items()}
        rep = density_report(nnz, self.numel)
        total = sum(self.numel.values())
        # metrics.itop_rate on the bool masks: share of connections ever active.
        rep["itop"] = sum(int(e.sum()) for e in self.ever_active.values()) / total
        rep["update_time_s"] = self.update_time_s
        rep["n_updates"] = self.n_updates
        return rep

    def masks(self) -> dict[str, torch.Tensor]:
        """Sorted active flat indices per parameter, as Sparsifier.masks()."""
        return {fqn: torch.nonzero(layer.mask().view(-1)).squeeze(1)
                for fqn, layer in self.layers.items()}

    def state_dict(self) -> dict:
        """Everything but the weights; thresholds are here as well as in model.state_dict()."""
        return {
            "method": self.method,
            "threshold_kind": self.threshold_kind,
            "step": self.step_count,
            "thresholds": {fqn: layer.threshold.detach().clone()
                           for fqn, layer in self.layers.items()},
            "ever_active": {k: v.clone() for k, v in self.ever_active.items()},
            "last": {k: v.clone() for k, v in self._last.items()},
            "window": {**self._window, "resets": list(self._window["resets"])},
            "n_resets": dict(self.n_resets),
            "update_time_s": self.update_time_s,
            "n_updates": self.n_updates,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        names = list(self.layers)
        if sorted(state["thresholds"]) != sorted(names):
            raise ValueError(f"state is for parameters {sorted(state['thresholds'])}, "
                             f"not {sorted(names)}")
        if state["threshold_kind"] != self.threshold_kind:
            raise ValueError(f"state has threshold kind {state['threshold_kind']!r}, "
                             f"this sparsifier {self.threshold_kind!r}")
        for fqn, layer in self.layers.items():
            t = state["thresholds"][fqn]
            for what, src, dst in (("threshold", t, layer.threshold),
                                   ("ever_active", state["ever_active"][fqn], layer.weight),
                                   ("last", state["last"][fqn], layer.weight)):
                if src.shape != dst.shape:
                    raise ValueError(f"{fqn}: {what} of shape {tuple(src.shape)}, expected "
                                     f"{tuple(dst.shape)}")
            layer.threshold.copy_(t)  # in place: the optimizer keeps the same Parameter
            self.ever_active[fqn] = state["ever_active"][fqn].to(layer.weight.device).clone()
            self._last[fqn] = state["last"][fqn].to(layer.weight.device).clone()
        self._window = {**state["window"], "resets": list(state["window"]["resets"])}
        self.n_resets = dict(state["n_resets"])
        self.step_count = int(state["step"])
        self.update_time_s = float(state["update_time_s"])
        self.n_updates = int(state["n_updates"])


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer param groups: every trainable parameter with `weight_decay`, DST thresholds
    without (a group with weight_decay 0). Pass to any torch optimizer."""
    thresholds = [m.threshold for m in model.modules() if isinstance(m, _DST_TYPES)]
    ids = {id(t) for t in thresholds}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": rest, "weight_decay": weight_decay}]
    if thresholds:
        groups.append({"params": [t for t in thresholds if t.requires_grad], "weight_decay": 0.0})
    return groups


def build_dst(model: nn.Module, **kwargs) -> DSTSparsifier:
    """Construct DST by name from a config: `method: dst` -> build_dst(model, **method_kwargs)."""
    return DSTSparsifier(model, **kwargs)


METHODS.add("dst", Method(None, None, make=build_dst, options="dst", learned_density=True,
                          name_by="alpha"),
            "DST: learned per-unit thresholds, density an outcome of alpha * sum exp(-t) "
            "(Liu 2020)")
