import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsegrow.distributions import (
    DISTRIBUTIONS,
    erdos_renyi,
    erk,
    layer_counts,
    layer_densities,
    uniform,
)

# Linear (out, in) layers; for 2-d shapes ER and ERK agree: s = (out + in) / (out * in).
LINEAR3 = [(4, 8), (8, 8), (2, 8)]  # numel 32, 64, 16; N = 112
# A conv (out=4, in=2, 3x3) and a Linear (8, 4): here ER and ERK differ.
CONV_LINEAR = [(4, 2, 3, 3), (8, 4)]  # numel 72, 32; N = 104


def _approx(values):
    return pytest.approx(values, rel=1e-12, abs=1e-12)


# ---- hand-worked densities -------------------------------------------------------------------


def test_erk_linear_by_hand():
    # s_l * n_l = sum(shape) = 12, 16, 10 (sum 38); budget 0.5 * 112 = 56
    # eps = 56 / 38 = 28/19, so d = eps * s = (12/32, 16/64, 10/16) * 28/19
    assert erk(LINEAR3, 0.5) == _approx([21 / 38, 7 / 19, 35 / 38])
    assert erdos_renyi(LINEAR3, 0.5) == _approx([21 / 38, 7 / 19, 35 / 38])
    # d * n = 336/19, 448/19, 280/19 = 17.68, 23.58, 14.74 -> floors 17 + 23 + 14 = 54;
    # the 2 missing go to the largest fractions: layer 2 (.74), then layer 0 (.68)
    assert layer_counts(LINEAR3, 0.5, "erk") == [18, 23, 15]
    assert layer_counts(LINEAR3, 0.5, "erdos_renyi") == [18, 23, 15]
    assert layer_densities(LINEAR3, 0.5) == _approx([18 / 32, 23 / 64, 15 / 16])


def test_uniform_by_hand():
    assert uniform(LINEAR3, 0.5) == [0.5, 0.5, 0.5]
    assert layer_counts(LINEAR3, 0.5, "uniform") == [16, 32, 8]


def test_er_ignores_kernel_dims_erk_does_not():
    # budget 0.25 * 104 = 26
    # ER: s = (4+2)/(4*2) = 3/4 and (8+4)/32 = 3/8; s * n = 54 and 12 (sum 66); eps = 26/66 = 13/33
    #     d = 3/4 * 13/33 = 13/44 and 3/8 * 13/33 = 13/88
    assert erdos_renyi(CONV_LINEAR, 0.25) == _approx([13 / 44, 13 / 88])
    # counts 54*13/33 = 21.27 and 12*13/33 = 4.73 -> 21 + 4, the 1 missing to layer 1
    assert layer_counts(CONV_LINEAR, 0.25, "erdos_renyi") == [21, 5]
    # ERK: s = 12/72 and 12/32; s * n = 12 and 12 (sum 24); eps = 26/24 = 13/12
    #      d = 1/6 * 13/12 = 13/72 and 3/8 * 13/12 = 13/32
    assert erk(CONV_LINEAR, 0.25) == _approx([13 / 72, 13 / 32])
    assert layer_counts(CONV_LINEAR, 0.25, "erk") == [13, 13]


# ---- the "exceeds density 1: make it dense and solve again" loop -----------------------------


def test_capped_layer_excess_goes_to_the_others():
    shapes = [(100, 100), (100, 100), (2, 100)]  # numel 10000, 10000, 200; N = 20200
    # budget 0.5 * 20200 = 10100; s * n = 200, 200, 102; eps = 10100/502 = 20.12
    # layer 2: s = 102/200 = 0.51 -> eps * s = 10.3 > 1: dense (200 weights)
    # again: eps = (10100 - 200) / 400 = 24.75 -> d = 0.02 * 24.75 = 0.495 for layers 0, 1
    assert erk(shapes, 0.5) == _approx([0.495, 0.495, 1.0])
    assert layer_counts(shapes, 0.5) == [4950, 4950, 200]
    # The anti-example (sparse_learning issue #20): cap layer 2 at 1 without solving again,
    # and the network keeps 2 * 10000 * 0.02 * 10100/502 + 200 = 8248 weights, not 10100.
    naive = 2 * 10000 * 0.02 * 10100 / 502 + 200
    assert round(naive) == 8248


def test_capping_takes_several_rounds():
    shapes = [(100, 100), (2, 100), (20, 100)]  # numel 10000, 200, 2000; N = 12200
    # budget 0.5 * 12200 = 6100; s = 0.02, 0.51, 0.06; s * n = 200, 102, 120 (sum 422)
    # round 1: eps = 6100/422 = 14.45; layer 1: 7.37 > 1 -> dense; layer 2: 0.87, still fine
    # round 2: eps = (6100 - 200) / 320 = 18.44; layer 2: 0.06 * 18.44 = 1.11 > 1 -> dense
    # round 3: eps = (6100 - 200 - 2000) / 200 = 19.5; layer 0: 0.02 * 19.5 = 0.39
    assert 0.06 * 6100 / 422 < 1 < 0.06 * 5900 / 320  # layer 2 is capped only in round 2
    assert erk(shapes, 0.5) == _approx([0.39, 1.0, 1.0])
    assert layer_counts(shapes, 0.5) == [3900, 200, 2000]


def test_dense_mask_forces_layers_dense_and_counts_them():
    # layer 2 forced dense (16 weights): budget 56 - 16 = 40 over s * n = 12 + 16 = 28
    # eps = 40/28 = 10/7 -> d = 3/8 * 10/7 = 15/28 and 1/4 * 10/7 = 5/14
    assert erk(LINEAR3, 0.5, [False, False, True]) == _approx([15 / 28, 5 / 14, 1.0])
    # counts 120/7 = 17.14 and 160/7 = 22.86 -> 17 + 22 + 16 = 55; the 1 missing to layer 1
    assert layer_counts(LINEAR3, 0.5, "erk", [False, False, True]) == [17, 23, 16]
    # uniform: the remaining layers share what is left uniformly, 40/96
    assert uniform(LINEAR3, 0.5, [False, False, True]) == _approx([5 / 12, 5 / 12, 1.0])


@pytest.mark.parametrize("name", DISTRIBUTIONS.names())
def test_density_one_is_fully_dense(name):
    shapes = [(4, 2, 3, 3), (8, 4), (3, 7)]
    assert DISTRIBUTIONS.get(name)(shapes, 1.0) == [1.0, 1.0, 1.0]
    assert layer_counts(shapes, 1.0, name) == [72, 32, 21]
    assert layer_counts(shapes, 1.0, name, [True, True, True]) == [72, 32, 21]


@pytest.mark.parametrize("name", DISTRIBUTIONS.names())
def test_every_distribution_contract(name):
    shapes = [(16, 3, 3, 3), (32, 16, 3, 3), (10, 512), (64, 64)]
    raw = DISTRIBUTIONS.get(name)(shapes, 0.1)
    assert len(raw) == len(shapes) and all(isinstance(d, float) and 0 < d <= 1 for d in raw)
    total = sum(math.prod(s) for s in shapes)
    assert sum(d * math.prod(s) for d, s in zip(raw, shapes)) == pytest.approx(0.1 * total)
    assert sum(layer_counts(shapes, 0.1, name)) == round(0.1 * total)
    assert DISTRIBUTIONS.describe()[name]


# ---- bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0, 0.0, -0.5, 1.5, 1.0000001, float("nan"), float("inf")])
def test_bad_density(density):
    for fn in (layer_counts, layer_densities, erk):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got " + repr(density)):
            fn(LINEAR3, density)


def test_density_message_example():
    with pytest.raises(ValueError) as err:
        layer_counts(LINEAR3, 1.5)
    assert str(err.value) == "density must be in (0, 1], got 1.5"


def test_unknown_distribution():
    with pytest.raises(ValueError, match="'erk2'.*allowed: uniform, erdos_renyi, erk"):
        layer_counts(LINEAR3, 0.5, "erk2")


def test_empty_shapes():
    with pytest.raises(ValueError, match="shapes is empty"):
        layer_counts([], 0.5)


@pytest.mark.parametrize("shape", [(3, 0), (0, 4, 3, 3), (5, -2), (), (2.5, 3)])
def test_bad_shape(shape):
    with pytest.raises(ValueError, match=re.escape(f"layer 1 has shape {shape!r}")):
        layer_counts([(4, 8), shape], 0.5)


def test_layer_too_small():
    shapes = [(100, 100), (50, 100), (10, 3)]
    # uniform 0.01: target round(150.3) = 150 = 100 + 50 + floor(0.3); layer 2 gets nothing
    with pytest.raises(ValueError) as err:
        layer_counts(shapes, 0.01, "uniform")
    assert str(err.value) == (
        "layer 2 with shape (10, 3) is too small for density 0.01: it would keep 0 of 30 "
        "weights; raise the density or leave this layer dense"
    )
    # leaving it dense is the way out
    assert layer_counts(shapes, 0.01, "uniform", [False, False, True]) == [80, 40, 30]


def test_forced_dense_layers_exceed_the_budget():
    with pytest.raises(ValueError, match="density 0.001 keeps .* forced dense already hold 32"):
        layer_counts([(4, 8), (100, 100)], 0.001, "erk", [True, False])
    with pytest.raises(ValueError, match="density 0.5 .* forced dense"):
        layer_counts(LINEAR3, 0.5, "erk", [True, True, True])


def test_dense_mask_wrong_length():
    with pytest.raises(ValueError, match="dense_mask has 2 entries but there are 3 layers"):
        layer_counts(LINEAR3, 0.5, "erk", [True, False])


def test_erdos_renyi_needs_two_dims():
    with pytest.raises(ValueError, match=r"at least 2 dims, got \(10,\) at layer 1"):
        layer_counts([(4, 8), (10,)], 0.5, "erdos_renyi")
    assert sum(layer_counts([(4, 8), (10,)], 0.5, "erk")) == 21  # ERK copes: s = 1 for (10,)


# ---- properties over random networks ------------------------------------------------------------

linear_shape = st.tuples(st.integers(1, 64), st.integers(1, 64))
conv_shape = st.builds(
    lambda o, i, k: (o, i, k, k),
    st.integers(1, 32),
    st.integers(1, 32),
    st.sampled_from([1, 3, 5, 7]),
)
shape_lists = st.lists(st.one_of(linear_shape, conv_shape), min_size=1, max_size=6)
# Densities from 1e-9 up: subnormal densities (5e-324) underflow eps * s_l to 0, which no
# network asks for; tiny ones still reach the "layer too small" path often.
densities = st.one_of(st.floats(1e-9, 1.0), st.just(1.0))


def _score(name, shape):
    if name == "uniform":
        return 1.0
    if name == "erdos_renyi":
        return (shape[0] + shape[1]) / (shape[0] * shape[1])
    return sum(shape) / math.prod(shape)


@st.composite
def problems(draw):
    shapes = draw(shape_lists)
    n = len(shapes)
    mask = draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=n, max_size=n)))
    return shapes, draw(densities), draw(st.sampled_from(DISTRIBUTIONS.names())), mask


@settings(max_examples=100, deadline=None)
@given(problems())
def test_counts_are_exact_and_in_range(problem):
    shapes, density, name, mask = problem
    numels = [math.prod(s) for s in shapes]
    forced = mask or [False] * len(shapes)
    try:
        counts = layer_counts(shapes, density, name, mask)
    except ValueError as err:
        # Only two honest reasons: forced-dense layers hold more than the budget, or some layer's
        # exact share d_l * n_l is below one weight.
        if "forced dense" in str(err):
            assert sum(n for n, f in zip(numels, forced) if f) >= density * sum(numels) - 0.5
        else:
            raw = DISTRIBUTIONS.get(name)(shapes, density, mask)
            assert "too small" in str(err)
            assert min(d * n for d, n in zip(raw, numels)) < 1
        return
    assert sum(counts) == round(density * sum(numels))
    assert all(1 <= c <= n for c, n in zip(counts, numels))
    assert all(c == n for c, n, f in zip(counts, numels, forced) if f)
    raw = DISTRIBUTIONS.get(name)(shapes, density, mask)
    # largest remainder: each count is the floor or the ceiling of its exact share
    assert all(abs(c - d * n) < 1 + 1e-9 for c, d, n in zip(counts, raw, numels))
    assert layer_densities(shapes, density, name, mask) == [c / n for c, n in zip(counts, numels)]


@settings(max_examples=100, deadline=None)
@given(problems())
def test_raw_densities_meet_the_budget_with_capping(problem):
    shapes, density, name, mask = problem
    numels = [math.prod(s) for s in shapes]
    forced = mask or [False] * len(shapes)
    try:
        raw = DISTRIBUTIONS.get(name)(shapes, density, mask)
    except ValueError as err:
        assert "forced dense" in str(err)
        return
    assert all(0 < d <= 1 for d in raw)
    assert all(d == 1.0 for d, f in zip(raw, forced) if f)
    assert sum(d * n for d, n in zip(raw, numels)) == pytest.approx(density * sum(numels), rel=1e-9)
    # d_l = min(1, eps * s_l) for every layer not forced dense, with one eps
    free = [l for l in range(len(shapes)) if not forced[l] and raw[l] < 1.0]
    if free:
        eps = raw[free[0]] / _score(name, shapes[free[0]])
        for l in range(len(shapes)):
            if not forced[l]:
                assert raw[l] == pytest.approx(min(1.0, eps * _score(name, shapes[l])), rel=1e-9)


@settings(max_examples=100, deadline=None)
@given(shape_lists, densities)
def test_uniform_gives_each_layer_the_density(shapes, density):
    try:
        counts = layer_counts(shapes, density, "uniform")
    except ValueError as err:
        assert "too small" in str(err)
        return
    for c, s in zip(counts, shapes):
        assert abs(c - density * math.prod(s)) < 1 + 1e-9
