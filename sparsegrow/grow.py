"""Grow criteria: which inactive connections to add at an update.

SET and RigL differ only here. A grow criterion decides, it does not mutate: `select(ctx, n,
generator)` returns n sorted flat indices, none of them in `ctx.excluded` (the connections that
stay active, plus the just-dropped ones when regrowth is off).

The contract between the Sparsifier, the storages and a criterion is `GrowCriterion`:
    needs_signal: SignalSpec | None   what it reads (None: nothing, e.g. random growth). The
                                      Sparsifier's `GrowSignals` captures it, sums micro-batches,
                                      window steps and ranks, and hands it over as `ctx.signal`
    select(ctx, n, generator)         the choice; instrumentation goes into `ctx.stats`
    per_row: bool = False             whether it can choose per output unit (constant fan-in)
    select_rows(ctx, k, generator)    k in every output row of the weight viewed as (n_out, -1),
                                      none in ctx.excluded; raises NotImplementedError unless
                                      per_row (the Sparsifier checks per_row at construction)

Score-based criteria share `ScoreGrow`: they give a score per connection (numel,) and the
top-n (or top-k per row) among the eligible ones is chosen, ties broken by the generator.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from .registry import Registry
from .selection import select_top, select_top_rows
from .signals import Signal, SignalSpec
from .topology import SparseParam, sample_inactive, sample_rows


@dataclass
class GrowContext:
    param: SparseParam
    excluded: torch.Tensor  # sorted flat indices that must not be grown, (n_excluded,)
    step: int
    signal: Signal | None = None  # what `needs_signal` asked for, reduced over ranks
    stats: dict = field(default_factory=dict)  # the criterion's per-layer instrumentation


class GrowCriterion(ABC):
    needs_signal: SignalSpec | None = None
    per_row: bool = False

    @abstractmethod
    def select(self, ctx: GrowContext, n: int, generator: torch.Generator) -> torch.Tensor:
        """n sorted flat indices (n,), none in ctx.excluded."""

    def select_rows(self, ctx: GrowContext, k: int, generator: torch.Generator) -> torch.Tensor:
        """n_out * k sorted flat indices, k in each output row, none in ctx.excluded."""
        raise NotImplementedError(f"grow criterion {type(self).__name__} cannot choose per output "
                                  "unit (constant fan-in)")


class ScoreGrow(GrowCriterion):
    """Grow the eligible connections of largest score; `scores(ctx)` -> (numel,) float, a copy."""

    per_row = True

    @abstractmethod
    def scores(self, ctx: GrowContext) -> torch.Tensor:
        """(numel,) float scores of every connection of ctx.param (a fresh tensor)."""

    def select(self, ctx: GrowContext, n: int, generator: torch.Generator) -> torch.Tensor:
        scores = self.scores(ctx)
        scores[ctx.excluded] = float("-inf")
        return select_top(scores, n, generator)

    def select_rows(self, ctx: GrowContext, k: int, generator: torch.Generator) -> torch.Tensor:
        scores = self.scores(ctx)
        scores[ctx.excluded] = float("-inf")
        rows = ctx.param.shape[0]
        cols = select_top_rows(scores.view(rows, -1), k, generator)  # (rows, k)
        fan = scores.numel() // rows
        return (cols + fan * torch.arange(rows, device=cols.device)[:, None]).reshape(-1)


def _abs_dense_signal(ctx: GrowContext, rule: str, since: str) -> torch.Tensor:
    """|the dense-gradient signal| of ctx's layer, (numel,) float32, a fresh tensor."""
    g = ctx.signal.dense_grad if ctx.signal is not None else None
    if g is None:
        raise RuntimeError(
            f"{rule} grow on {ctx.param.fqn}: no dense gradient was captured {since}; call "
            "loss.backward() before sparsifier.step(), and use masked storage (truly sparse "
            "layers never form the dense gradient: use grow='search')")
    return g.abs().reshape(-1).float()


GROW: Registry[type[GrowCriterion]] = Registry("grow criterion")


@GROW.register("random", "grow uniformly at random among inactive connections (SET)")
class RandomGrow(GrowCriterion):
    per_row = True

    def select(self, ctx: GrowContext, n: int, generator: torch.Generator) -> torch.Tensor:
        return sample_inactive(ctx.param.numel, ctx.excluded, n, generator)

    def select_rows(self, ctx: GrowContext, k: int, generator: torch.Generator) -> torch.Tensor:
        rows = ctx.param.shape[0]
        return sample_rows(rows, ctx.param.numel // rows, k, generator, ctx.excluded.device,
                           excluded=ctx.excluded)


@GROW.register("gradient", "grow the inactive connections of largest dense-gradient |dL/dW| (RigL)")
class GradientGrow(ScoreGrow):
    """RigL's grow: the reference oracle that search-based growth is measured against.

    accumulate: score by the gradient summed over the window since the last update instead of
    the update step's (all micro-batches of a step always add up).
    """

    needs_signal = SignalSpec("dense_grad")

    def __init__(self, accumulate: bool = False):
        if not isinstance(accumulate, bool):
            raise ValueError(f"accumulate must be True or False, got {accumulate!r}")
        self.needs_signal = SignalSpec("dense_grad", accumulate=accumulate)

    def scores(self, ctx: GrowContext) -> torch.Tensor:
        return _abs_dense_signal(ctx, "gradient (RigL)", "on this update step")


@GROW.register("momentum", "grow the inactive connections of largest |momentum of the dense "
               "gradient| (SNFS)")
class MomentumGrow(ScoreGrow):
    """SNFS's grow (Dettmers & Zettlemoyer 2019): score by |m|, m the exponential moving average
    of the dense gradient, m <- beta * m + g every step (SGD's momentum buffer with dampening 0).

    The optimizer's own momentum cannot be read: gradients of inactive weights are masked, so its
    buffer is zero there. The signal (`SignalSpec(momentum=beta)`) keeps the average of the
    unmasked gradient instead, every step of the schedule's window and across updates.
    """

    needs_signal = SignalSpec("dense_grad", accumulate=True, momentum=0.9)  # the default beta

    def __init__(self, beta: float = 0.9):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta < 1.0:
            raise ValueError(f"momentum beta must be in (0, 1), got {beta!r}")
        self.needs_signal = SignalSpec("dense_grad", accumulate=True, momentum=float(beta))

    def scores(self, ctx: GrowContext) -> torch.Tensor:
        return _abs_dense_signal(ctx, "momentum (SNFS)", "since training began")
