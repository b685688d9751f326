"""How a global density is shared among layers: layer shapes + density -> per-layer density.

Pure functions of the weight shapes (Linear (out, in), Conv2d (out, in, kh, kw)); nothing here
touches a tensor. Each distribution gives layer l a score s_l and a density d_l = eps * s_l,
with eps solved so that the network keeps `density` of all its weights:

    uniform:     s_l = 1
    erdos_renyi: s_l = (n_out + n_in) / (n_out * n_in)          (SET, Mocanu et al. 2018)
    erk:         s_l = sum(shape) / prod(shape)                   (RigL, Evci et al. 2020)

ER uses the channel dims only (n_out = shape[0], n_in = shape[1]), so a conv layer gets the
density of the Linear layer between its channels; ERK also counts the kernel dims, which gives
big kernels a lower density. The solver is google-research/rigl's `get_sparsities` loop
(layers that would exceed density 1 are made dense and eps is solved again); see `_solve`.

`layer_counts` turns the raw densities into exact integer numbers of active weights per layer,
summing to round(density * total) exactly, which is what a topology needs to build masks.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence

from sparsegrow.registry import Registry

Shape = tuple[int, ...]
# (shapes, density, dense_mask) -> raw per-layer densities, each in (0, 1]
Distribution = Callable[[Sequence[Shape], float, Optional[Sequence[bool]]], list[float]]

DISTRIBUTIONS: Registry[Distribution] = Registry("distribution")


def _numel(shape: Shape) -> int:
    return math.prod(shape)


def _check(
    shapes: Sequence[Shape], density: float, dense_mask: Sequence[bool] | None
) -> list[bool]:
    """Validate the inputs shared by every distribution; returns dense_mask as a list."""
    real = isinstance(density, numbers.Real) and not isinstance(density, bool)
    if not (real and 0.0 < density <= 1.0):  # the comparison also rejects nan
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if len(shapes) == 0:
        raise ValueError("shapes is empty: give the weight shape of at least one layer")
    for l, shape in enumerate(shapes):
        dims = tuple(shape)
        if len(dims) == 0 or any(int(d) != d or d <= 0 for d in dims):
            raise ValueError(
                f"layer {l} has shape {dims!r}; every dim must be a positive integer "
                "and a shape needs at least one dim"
            )
    if dense_mask is None:
        return [False] * len(shapes)
    if len(dense_mask) != len(shapes):
        raise ValueError(
            f"dense_mask has {len(dense_mask)} entries but there are {len(shapes)} layers; "
            "give one bool per layer"
        )
    return [bool(x) for x in dense_mask]


def _solve(
    shapes: Sequence[Shape], density: float, dense: list[bool], scores: list[float]
) -> list[float]:
    """Densities d_l = eps * s_l for sparse layers, 1 for dense layers, meeting the global density.

    With D the set of dense layers and N = sum_l n_l (n_l = numel of layer l), the kept weights
    must equal the budget:

        sum_{l in D} n_l + eps * sum_{l not in D} s_l * n_l = density * N
        =>  eps = (density * N - sum_{l in D} n_l) / sum_{l not in D} s_l * n_l

    A layer with eps * s_l > 1 cannot hold its share: it is made dense (joins D) and eps is
    solved again over the rest. Capping a layer frees (eps * s_l - 1) * n_l weights for the
    others, so eps only grows from round to round: a layer once above 1 stays above 1, the loop
    ends within len(shapes) rounds, and capping all offenders per round gives the same result as
    rigl capping the largest score per round. Dropping the excess instead of solving again (the
    bug in TimDettmers/sparse_learning issue #20) leaves the network below the density asked for.
    """
    numels = [_numel(s) for s in shapes]
    if density == 1.0:
        return [1.0] * len(shapes)
    dense = list(dense)
    total = sum(numels)
    while True:
        free = [l for l in range(len(shapes)) if not dense[l]]
        budget = density * total - sum(n for n, d in zip(numels, dense) if d)
        if not free or budget <= 0:
            # Capped layers always leave a positive budget (see above), so only layers the
            # caller forced dense can get here.
            forced = sum(n for n, d in zip(numels, dense) if d)
            raise ValueError(
                f"density {density!r} keeps {density * total:.6g} of {total} weights, but the "
                f"layers forced dense already hold {forced}; raise the density or make fewer "
                "layers dense"
            )
        eps = budget / sum(scores[l] * numels[l] for l in free)
        over = [l for l in free if eps * scores[l] > 1.0]
        if not over:
            return [1.0 if dense[l] else eps * scores[l] for l in range(len(shapes))]
        for l in over:
            dense[l] = True


@DISTRIBUTIONS.register("uniform", "every layer gets the global density")
def uniform(
    shapes: Sequence[Shape], density: float, dense_mask: Sequence[bool] | None = None
) -> list[float]:
    dense = _check(shapes, density, dense_mask)
    # With forced-dense layers the others share what is left, still uniformly.
    return _solve(shapes, density, dense, [1.0] * len(shapes))


@DISTRIBUTIONS.register(
    "erdos_renyi", "density ∝ (n_out + n_in) / (n_out * n_in), channel dims only (SET)"
)
def erdos_renyi(
    shapes: Sequence[Shape], density: float, dense_mask: Sequence[bool] | None = None
) -> list[float]:
    dense = _check(shapes, density, dense_mask)
    for l, shape in enumerate(shapes):
        if len(shape) < 2:
            raise ValueError(
                f"erdos_renyi needs weight shapes (out, in, ...) with at least 2 dims, "
                f"got {tuple(shape)!r} at layer {l}; use 'erk' or leave this layer out"
            )
    scores = [(s[0] + s[1]) / (s[0] * s[1]) for s in shapes]
    return _solve(shapes, density, dense, scores)


@DISTRIBUTIONS.register(
    "erk", "density ∝ sum(shape) / prod(shape), kernel dims included (RigL's ERK)"
)
def erk(
    shapes: Sequence[Shape], density: float, dense_mask: Sequence[bool] | None = None
) -> list[float]:
    dense = _check(shapes, density, dense_mask)
    scores = [sum(s) / _numel(s) for s in shapes]
    return _solve(shapes, density, dense, scores)


def layer_counts(
    shapes: Sequence[Shape],
    density: float,
    distribution: str = "erk",
    dense_mask: Sequence[bool] | None = None,
) -> list[int]:
    """Exact number of active weights per layer; sums to round(density * total) exactly.

    Largest-remainder rounding of raw_density_l * numel_l: every layer gets the floor, then
    the weights still missing go one each to the layers with the largest fractional parts
    (ties to the earlier layer), never beyond a layer's numel. Raises ValueError if a layer
    would keep no weight at all.
    """
    fn = DISTRIBUTIONS.get(distribution)
    dense = _check(shapes, density, dense_mask)
    raw = fn(shapes, density, dense_mask)
    numels = [_numel(s) for s in shapes]
    target = round(density * sum(numels))

    exact = [n if d else min(r, 1.0) * n for r, n, d in zip(raw, numels, dense)]
    counts = [min(math.floor(x), n) for x, n in zip(exact, numels)]
    frac = [x - c for x, c in zip(exact, counts)]
    missing = target - sum(counts)
    # missing is in [0, len(shapes)) up to float error in the raw densities; the loops below
    # also absorb that error (cycling, or taking back from the smallest fractional parts).
    order = sorted(range(len(shapes)), key=lambda l: (-frac[l], l))
    while missing > 0:
        room = [l for l in order if counts[l] < numels[l]]
        assert room, "target exceeds the total number of weights"  # target <= total always
        for l in room[:missing]:
            counts[l] += 1
        missing -= len(room[:missing])
    for l in reversed(order):
        if missing >= 0:
            break
        if counts[l] > 1 and not dense[l]:
            counts[l] -= 1
            missing += 1

    for l, (c, n) in enumerate(zip(counts, numels)):
        if c < 1:
            raise ValueError(
                f"layer {l} with shape {tuple(shapes[l])!r} is too small for density {density!r}: "
                f"it would keep 0 of {n} weights; raise the density or leave this layer dense"
            )
    return counts


def layer_densities(
    shapes: Sequence[Shape],
    density: float,
    distribution: str = "erk",
    dense_mask: Sequence[bool] | None = None,
) -> list[float]:
    """Per-layer densities realised by `layer_counts` (count / numel)."""
    counts = layer_counts(shapes, density, distribution, dense_mask)
    return [c / _numel(s) for c, s in zip(counts, shapes)]
