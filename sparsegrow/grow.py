"""Grow criteria: which inactive connections to add at an update.

SET and RigL differ only here. A grow criterion decides, it does not mutate: `select(ctx, n,
generator)` returns n sorted flat indices, none of them in `ctx.excluded` (the connections that
stay active, plus the just-dropped ones when regrowth is off).

Optional attributes the Sparsifier honours, so criteria compose without a base class:
    needs_dense_grad: bool        the storage must keep the dense weight gradient on update steps
    attach(params) / detach()     called once with every SparseParam (e.g. to install hooks)
    arm(on: bool)                 called before the forward/backward of an update step (on) and
                                  after the update (off), so signals are captured only then
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import Registry
from .selection import select_top
from .topology import SparseParam, sample_inactive

GROW = Registry("grow criterion")


@dataclass
class GrowContext:
    param: SparseParam
    excluded: torch.Tensor  # sorted flat indices that must not be grown, (n_excluded,)
    step: int


@GROW.register("random", "grow uniformly at random among inactive connections (SET)")
class RandomGrow:
    needs_dense_grad = False

    def select(self, ctx: GrowContext, n: int, generator: torch.Generator) -> torch.Tensor:
        return sample_inactive(ctx.param.numel, ctx.excluded, n, generator)


@GROW.register("gradient", "grow the inactive connections of largest dense-gradient |dL/dW| (RigL)")
class GradientGrow:
    """RigL's grow: the reference oracle that search-based growth is measured against."""

    needs_dense_grad = True

    def select(self, ctx: GrowContext, n: int, generator: torch.Generator) -> torch.Tensor:
        grad = getattr(ctx.param, "dense_grad", None)
        if grad is None:
            raise RuntimeError(
                f"gradient (RigL) grow on {ctx.param.fqn}: no dense gradient was captured on this "
                "update step; call loss.backward() before sparsifier.step(), and use masked storage "
                "(truly sparse layers never form the dense gradient: use grow='search')"
            )
        scores = grad.abs().reshape(-1).float()  # (numel,), a copy
        scores[ctx.excluded] = float("-inf")
        return select_top(scores, n, generator)
