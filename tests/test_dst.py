import copy
import math
import re

import pytest
import torch
from torch import nn

from sparsegrow.dst import DSTSparsifier, build_dst, param_groups
from sparsegrow.layers.dst import (
    THRESHOLD_KINDS,
    DSTConv2d,
    DSTLinear,
    long_tailed,
    unit_step,
)
from sparsegrow.updater import Sparsifier


def H(x: float) -> float:
    """The paper's long-tailed estimator, written out from its definition."""
    a = abs(x)
    if a <= 0.4:
        return 2 - 4 * a
    if a <= 1:
        return 0.4
    return 0.0


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                         nn.Linear(8, 3))


def convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, stride=2, groups=2, bias=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 3))


MODELS = {"linear": (mlp, (12,)), "conv": (convnet, (2, 8, 8))}


def batch(in_shape, n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *in_shape, generator=g), torch.randint(0, 3, (n,), generator=g)


def train(model, sparsifier, in_shape, steps, lr=0.05, momentum=0.0):
    opt = torch.optim.SGD(param_groups(model, 0.0), lr=lr, momentum=momentum)
    sparsifier.attach(opt)
    x, y = batch(in_shape)
    out = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y) + sparsifier.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(sparsifier.step())
    return opt, out


# ---- the estimator --------------------------------------------------------------------------


def test_step_gradient_matches_long_tailed_estimator_on_grid():
    edges = torch.tensor([0.0, 0.4, -0.4, 1.0, -1.0, 0.39, 0.41, 0.99, 1.01])
    x = torch.cat([torch.linspace(-1.5, 1.5, 601), edges]).requires_grad_()
    y = unit_step(x)
    assert torch.equal(y, (x >= 0).float())  # the paper's S: 1 if x >= 0
    y.sum().backward()
    expected = torch.tensor([H(v) for v in x.detach().tolist()])
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(long_tailed(x.detach()), expected, rtol=0, atol=1e-6)


def test_layer_gradients_match_the_chain_rule():
    # y = x (W*M)^T + b, L = sum(r * y)  =>  g = dL/d(W*M) = r^T x, and with Q = |W| - t:
    # dL/dt_i = -sum_j g_ij W_ij H(Q_ij);  dL/dW = g*M + g*|W|*H(Q)
    torch.manual_seed(0)
    layer = DSTLinear(6, 4)
    with torch.no_grad():
        layer.weight.uniform_(-1, 1)
        layer.threshold.copy_(torch.tensor([0.0, 0.3, 0.6, 1.2]))
    x, r = torch.randn(5, 6), torch.randn(5, 4)
    (r * layer(x)).sum().backward()
    W, t = layer.weight.detach(), layer.threshold.detach()
    Q = W.abs() - t[:, None]
    M = (Q >= 0).float()
    Hq = torch.tensor([[H(v) for v in row] for row in Q.tolist()])
    g = r.T @ x
    torch.testing.assert_close(layer.threshold.grad, -(g * W * Hq).sum(1))
    torch.testing.assert_close(layer.weight.grad, g * M + g * W.abs() * Hq)
    # a masked weight within reach of its threshold still gets gradient (documented choice)
    reach = (M == 0) & (Q.abs() <= 1) & (W != 0)
    assert reach.any() and (layer.weight.grad[reach] != 0).all()


# ---- layers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(THRESHOLD_KINDS))
@pytest.mark.parametrize("name", list(MODELS))
def test_alpha0_thresholds0_equals_dense(name, kind):
    make, in_shape = MODELS[name]
    dense = make()
    model = copy.deepcopy(dense)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    sp = DSTSparsifier(model, alpha=0.0, threshold=kind)
    swapped = [m for m in model.modules() if isinstance(m, (DSTLinear, DSTConv2d))]
    assert len(swapped) == len(weights)
    assert all(a.weight is b for a, b in zip(swapped, weights))  # same Parameter, no copy
    x, _ = batch(in_shape)
    assert torch.equal(model(x), dense(x))
    assert sp.loss().item() == 0.0
    assert sp.report()["global_density"] == 1.0  # init weights are nonzero


def test_thresholds_receive_gradient_and_move():
    model = mlp()
    sp = DSTSparsifier(model, alpha=1e-2)
    layers = list(sp.layers.values())
    nn.functional.cross_entropy(model(batch((12,))[0]), batch((12,))[1]).add(sp.loss()).backward()
    assert all(l.threshold.grad is not None and l.threshold.grad.abs().sum() > 0 for l in layers)
    model.zero_grad()
    train(model, sp, (12,), steps=60, lr=0.1)
    assert all(l.threshold.abs().sum() > 0 for l in layers)
    assert sp.report()["global_density"] < 1.0


@pytest.mark.parametrize("name", list(MODELS))
def test_density_floor_resets_a_collapsed_layer(name):
    make, in_shape = MODELS[name]
    model = make()
    sp = DSTSparsifier(model, alpha=1e-3, stats_every=1000)
    opt, _ = train(model, sp, in_shape, steps=2, momentum=0.9)  # builds momentum buffers
    fqn, layer = next(iter(sp.layers.items()))
    other = list(sp.layers.values())[1]
    with torch.no_grad():
        layer.threshold.fill_(100.0)  # every weight below its threshold: density 0 < 1%
        other.threshold.fill_(0.01)
    before_other = other.threshold.detach().clone()
    stats = sp.step()
    assert stats is not None and stats["resets"] == [fqn]
    assert torch.equal(layer.threshold, torch.zeros_like(layer.threshold))
    assert torch.equal(opt.state[layer.threshold]["momentum_buffer"],
                       torch.zeros_like(layer.threshold))
    assert torch.equal(other.threshold, before_other)  # a healthy layer is left alone
    assert stats["layers"][fqn]["density"] == 1.0
    assert sp.n_resets[fqn] == 1 and sum(sp.n_resets.values()) == 1
    assert sp.step() is None  # no reset, not on the cadence


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_round_trip(name):
    make, in_shape = MODELS[name]
    model = make()
    sp = DSTSparsifier(model, alpha=5e-2, stats_every=7)
    train(model, sp, in_shape, steps=40, lr=0.2)
    state, weights = sp.state_dict(), copy.deepcopy(model.state_dict())

    model2 = make(seed=3)
    sp2 = DSTSparsifier(model2, alpha=5e-2, stats_every=7)
    model2.load_state_dict(weights)
    with torch.no_grad():  # thresholds must come from the sparsifier state alone
        for layer in sp2.layers.values():
            layer.threshold.fill_(-1.0)
    sp2.load_state_dict(state)
    assert sp2.report()["global_density"] < 1.0
    assert sp2.report() == sp.report()
    for a, b in zip(sp.masks().values(), sp2.masks().values()):
        assert torch.equal(a, b)
    for name_ in sp.layers:
        assert torch.equal(sp.layers[name_].threshold, sp2.layers[name_].threshold)
    for _ in range(2):  # 40 + 2 = 42 = 6 * 7: a stats step
        s1, s2 = sp.step(), sp2.step()
    s1.pop("time_s"), s2.pop("time_s")
    assert s1 == s2  # same cadence, churn window and densities after resuming


def test_report_and_masks_have_the_sparsifier_contract():
    model = mlp()
    sp = build_dst(model, alpha=1e-2)
    train(model, sp, (12,), steps=30, lr=0.1)
    ref = Sparsifier(mlp(), 0.5, method="static")
    assert set(sp.report()) == set(ref.report())
    assert set(sp.report()["layers"]) == set(ref.report()["layers"])
    rep = sp.report()
    assert rep["n_updates"] == 30 and rep["itop"] == 1.0  # DST starts dense
    for fqn, idx in sp.masks().items():
        layer = sp.layers[fqn]
        assert torch.equal(idx, torch.sort(idx).values)
        assert torch.equal(idx, torch.nonzero(layer.mask().view(-1)).squeeze(1))
        assert rep["layers"][fqn] == pytest.approx(idx.numel() / layer.weight.numel())


def test_stats_cadence():
    model = mlp()
    sp = DSTSparsifier(model, alpha=1e-2, stats_every=5)
    _, stats = train(model, sp, (12,), steps=10)
    assert [s is not None for s in stats] == [False] * 4 + [True] + [False] * 4 + [True]
    assert {"step", "dropped", "grown", "resets", "global_density", "layers"} <= set(stats[4])


def test_include_list_and_filter():
    model = mlp()
    sp = DSTSparsifier(model, include=["2.weight"])
    assert list(sp.layers) == ["2.weight"]
    assert isinstance(model[2], DSTLinear) and type(model[0]) is nn.Linear
    model = mlp()
    sp = DSTSparsifier(model, include=lambda m, n: n == "weight" and m.out_features == 3)
    assert list(sp.layers) == ["4.weight"]


def test_param_groups_keep_decay_off_thresholds():
    model = mlp()
    DSTSparsifier(model)
    groups = param_groups(model, 1e-4)
    assert DSTSparsifier.param_groups(model, 1e-4) == groups  # what the harness calls
    thresholds = {id(m.threshold) for m in model.modules() if isinstance(m, DSTLinear)}
    assert {id(p) for p in groups[1]["params"]} == thresholds and groups[1]["weight_decay"] == 0
    assert not thresholds & {id(p) for p in groups[0]["params"]}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    sp = DSTSparsifier(mlp())
    decayed = torch.optim.SGD([p for l in sp.layers.values() for p in l.parameters()],
                              lr=0.1, weight_decay=1e-4)
    with pytest.warns(UserWarning, match="weight decay applies to the DST thresholds"):
        sp.attach(decayed)


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [-1e-3, "0.1", None, True, float("nan"), float("inf")])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match=r"alpha must be a finite number >= 0.*got " +
                       re.escape(repr(alpha))):
        DSTSparsifier(mlp(), alpha=alpha)


@pytest.mark.parametrize("kind", ["matrix", "row", "", None])
def test_bad_threshold_kind(kind):
    with pytest.raises(ValueError, match=r"unknown threshold kind.*allowed: 'vector'.*'scalar'"):
        DSTSparsifier(mlp(), threshold=kind)
    with pytest.raises(ValueError, match="unknown threshold kind"):
        DSTLinear(3, 2, threshold=kind)


def test_bad_threshold_shape_in_state():
    model = mlp()
    sp = DSTSparsifier(model)
    state = sp.state_dict()
    state["thresholds"]["0.weight"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"0.weight: threshold of shape \(5,\), expected \(16,\)"):
        sp.load_state_dict(state)
    with pytest.raises(ValueError, match="threshold kind 'vector'"):
        DSTSparsifier(mlp(), threshold="scalar").load_state_dict(sp.state_dict())


def test_bad_targets_and_optimizer_order():
    with pytest.raises(ValueError, match=r"only the weight of a plain nn.Linear.*'bias'"):
        DSTSparsifier(mlp(), include=["0.bias"])
    with pytest.raises(ValueError, match="unknown parameter"):
        DSTSparsifier(mlp(), include=["nope.weight"])
    mha = nn.Sequential(nn.MultiheadAttention(4, 1))
    # the default filter picks attention projections too: the first one is refused, by name
    with pytest.raises(ValueError, match="0.in_proj_weight. is .in_proj_weight. of MultiheadAttention"):
        DSTSparsifier(mha)
    with pytest.raises(ValueError, match="wrap it in a container"):
        DSTSparsifier(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="floor"):
        DSTSparsifier(mlp(), floor=1.5)
    model = mlp()
    early = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the swap
    with pytest.raises(ValueError, match="build it after"):
        DSTSparsifier(model, optimizer=early)


def test_scalar_and_weight_threshold_shapes():
    conv = nn.Conv2d(3, 5, 3)
    for kind, shape in [("vector", (5,)), ("scalar", (1,)), ("weight", (5, 3, 3, 3))]:
        layer = DSTConv2d.from_dense(conv, kind)
        assert tuple(layer.threshold.shape) == shape
        loss = layer(torch.randn(2, 3, 6, 6)).sum()
        loss.backward()
        assert layer.threshold.grad.shape == layer.threshold.shape
        assert math.isfinite(float(layer.threshold.grad.sum()))
