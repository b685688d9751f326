"""Grow criteria: which inactive connections to add at an update.

SET and RigL differ only here. A grow criterion decides, it does not mutate: `select(ctx, n,
generator)` returns n sorted flat indices, none of them in `ctx.excluded` (the connections that
stay active, plus the just-dropped ones when regrowth is off).

The contract between the Sparsifier, the storages and a criterion is `GrowCriterion`:
    needs_signal: SignalSpec | None   what it reads (None: nothing, e.g. random growth). The
                                      Sparsifier's `GrowSignals` captures it, sums micro-batches,
                                      window steps and ranks, and hands it over as `ctx.signal`
    select(ctx, n, generator)         the choice; instrumentation goes into `ctx.stats`
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from .registry import Registry
from .selection import select_top
from .signals import Signal, SignalSpec
from .topology import SparseParam, sample_inactive


@dataclass
class GrowContext:
    param: SparseParam
    excluded: torch.Tensor  # sorted flat indices that must not be grown, (n_excluded,)
    step: int
    signal: Signal | None = None  # what `needs_signal` asked for, reduced over ranks
    stats: dict = field(default_factory=dict)  # the criterion's per-layer instrumentation


class GrowCriterion(ABC):
    needs_signal: SignalSpec | None = None

    @abstractmethod
    def select(self, ctx: GrowContext, n: int, generator: torch.Generator) -> torch.Tensor:
        """n sorted flat indices (n,), none in ctx.excluded."""


GROW: Registry[type[GrowCriterion]] = Registry("grow criterion")


@GROW.register("random", "grow uniformly at random among inactive connections (SET)")
class RandomGrow(GrowCriterion):
    def select(self, ctx: GrowContext, n: int, generator: torch.Generator) -> torch.Tensor:
        return sample_inactive(ctx.param.numel, ctx.excluded, n, generator)


@GROW.register("gradient", "grow the inactive connections of largest dense-gradient |dL/dW| (RigL)")
class GradientGrow(GrowCriterion):
    """RigL's grow: the reference oracle that search-based growth is measured against.

    accumulate: score by the gradient summed over the window since the last update instead of
    the update step's (all micro-batches of a step always add up).
    """

    needs_signal = SignalSpec("dense_grad")

    def __init__(self, accumulate: bool = False):
        if not isinstance(accumulate, bool):
            raise ValueError(f"accumulate must be True or False, got {accumulate!r}")
        self.needs_signal = SignalSpec("dense_grad", accumulate=accumulate)

    def select(self, ctx: GrowContext, n: int, generator: torch.Generator) -> torch.Tensor:
        grad = ctx.signal.dense_grad if ctx.signal is not None else None
        if grad is None:
            raise RuntimeError(
                f"gradient (RigL) grow on {ctx.param.fqn}: no dense gradient was captured on this "
                "update step; call loss.backward() before sparsifier.step(), and use masked storage "
                "(truly sparse layers never form the dense gradient: use grow='search')"
            )
        scores = grad.abs().reshape(-1).float()  # (numel,), a copy
        scores[ctx.excluded] = float("-inf")
        return select_top(scores, n, generator)
