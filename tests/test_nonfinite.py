"""NaN and inf weights or gradients: a layer whose drop or grow scores are not finite skips its
update (with a warning and a count in the stats), so no layer's density ever drifts."""
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import sparsegrow as sg
from sparsegrow.selection import NonFiniteScores, select_top

NONFINITE = [math.nan, math.inf, -math.inf]


class _CorruptGrad(torch.autograd.Function):
    """Identity forward; backward writes `value` into the incoming gradient at `where`."""

    @staticmethod
    def forward(ctx, x, where, value):
        ctx.where, ctx.value = where, value
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone(memory_format=torch.contiguous_format)
        g.view(-1)[ctx.where % g.numel()] = ctx.value
        return g, None, None


class Inject(nn.Module):
    """Placed right after a Linear: corrupts that layer's output gradient dZ when armed."""

    def __init__(self):
        super().__init__()
        self.armed = None  # (flat position seed, value)

    def forward(self, x):
        if self.armed is None:
            return x
        where, value = self.armed
        self.armed = None
        return _CorruptGrad.apply(x, where, value)


def model_with_injectors():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(30, 40), Inject(), nn.ReLU(), nn.Linear(40, 20), Inject(),
                         nn.ReLU(), nn.Linear(20, 5), Inject())


LAYERS = ["0.weight", "3.weight", "6.weight"]


def make(method, storage, every=2, seed=0):
    model = model_with_injectors()
    sp = sg.sparsify(model, 0.25, method=method, storage=storage, seed=seed,
                     schedule=sg.UpdateSchedule(every=every, end=100, fraction=0.3,
                                                decay="constant"))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    sp.attach(opt)
    return model, sp, opt


def backward(model, opt, gen):
    loss = (model(torch.randn(16, 30, generator=gen)) - 1).square().mean()
    opt.zero_grad()
    loss.backward()


def test_select_top_refuses_nan_and_posinf_but_skips_neginf():
    g = torch.Generator().manual_seed(0)
    for bad in (math.nan, math.inf):
        with pytest.raises(NonFiniteScores, match="1 of 4 scores are NaN or \\+inf"):
            select_top(torch.tensor([1.0, bad, 3.0, 2.0]), 2, g)
    assert select_top(torch.tensor([1.0, -math.inf, 3.0, 2.0]), 2, g).tolist() == [2, 3]


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("storage", ["masked", "sparse"])
def test_nonfinite_weight_skips_its_layer_only(storage, value):
    model, sp, opt = make("set", storage)
    gen = torch.Generator().manual_seed(0)
    backward(model, opt, gen)
    opt.step()
    sp.step()
    backward(model, opt, gen)  # step 2 updates
    opt.step()
    bad = sp.params[1]
    with torch.no_grad():
        bad.param.view(-1)[bad.active()[3] if storage == "masked" else 3] = value
    before = {p.fqn: p.active().clone() for p in sp.params}
    with pytest.warns(RuntimeWarning, match=r"3.weight: topology update at step 2 skipped: drop "
                                            r"scores"):
        stats = sp.step()
    assert stats["skipped_nonfinite"] == 1
    assert stats["layers"]["3.weight"] == {"dropped": 0, "grown": 0, "regrown": 0,
                                           "nnz": before["3.weight"].numel(),
                                           "skipped_nonfinite": True}
    assert torch.equal(bad.active(), before["3.weight"])
    for p in (sp.params[0], sp.params[2]):  # the other layers update as usual
        assert not stats["layers"][p.fqn]["skipped_nonfinite"]
        assert not torch.equal(p.active(), before[p.fqn])
        assert p.nnz() == before[p.fqn].numel()


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("method,storage", [("rigl", "masked"), ("search", "masked"),
                                            ("search", "sparse")])
def test_nonfinite_grow_scores_skip_their_layer(method, storage, value):
    # The optimizer step is skipped on that step (as a GradScaler does on inf gradients), so the
    # weights stay finite and only the grow scores, from the first layer's dZ, are not.
    model, sp, opt = make(method, storage)
    gen = torch.Generator().manual_seed(0)
    backward(model, opt, gen)
    opt.step()
    sp.step()
    model[1].armed = (5, value)  # dZ of layer 0.weight
    backward(model, opt, gen)
    before = {p.fqn: p.active().clone() for p in sp.params}
    with pytest.warns(RuntimeWarning, match=r"0.weight: topology update at step 2 skipped"):
        stats = sp.step()
    assert stats["skipped_nonfinite"] == 1 and stats["layers"]["0.weight"]["skipped_nonfinite"]
    assert torch.equal(sp.params[0].active(), before["0.weight"])
    for p in sp.params[1:]:  # backward never carried the NaN above layer 0
        assert not torch.equal(p.active(), before[p.fqn])


CASES = [("set", "masked"), ("set", "sparse"), ("rigl", "masked"), ("search", "masked"),
         ("search", "sparse")]
INJECTION = st.tuples(st.integers(0, 9),  # at which step
                      st.sampled_from(["weight", "grad", "dz"]),
                      st.integers(0, 2),  # which layer
                      st.sampled_from(NONFINITE),
                      st.integers(0, 10**6))  # where in it


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(CASES), injections=st.lists(INJECTION, max_size=4),
       seed=st.integers(0, 3))
def test_nonfinite_injections_never_change_density(case, injections, seed):
    method, storage = case
    model, sp, opt = make(method, storage, seed=seed)
    nnz0 = [p.nnz() for p in sp.params]
    injectors = [model[1], model[4], model[7]]
    gen = torch.Generator().manual_seed(seed)
    for t in range(10):
        now = [inj for inj in injections if inj[0] == t]
        for _, kind, layer, value, where in now:
            p = sp.params[layer]
            if kind == "weight":  # an active weight diverged
                with torch.no_grad():
                    k = where % p.nnz()
                    p.param.view(-1)[p.active()[k] if storage == "masked" else k] = value
            elif kind == "dz":
                injectors[layer].armed = (where, value)
        backward(model, opt, gen)
        for _, kind, layer, value, where in now:
            p = sp.params[layer]
            if kind == "grad":  # a gradient entry of an active connection
                k = where % p.nnz()
                p.param.grad.view(-1)[p.active()[k] if storage == "masked" else k] = value
        opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            stats = sp.step()
        if stats is not None:
            for v in stats["layers"].values():
                assert v["dropped"] == v["grown"]
        for p, n in zip(sp.params, nnz0):
            active = p.active()
            assert active.numel() == n == p.nnz()
            assert bool((active[1:] > active[:-1]).all())  # sorted, no duplicates
            if storage == "masked":
                w = p.param.detach().reshape(-1)
                inactive = torch.ones_like(w, dtype=torch.bool)
                inactive[active] = False
                assert bool((w[inactive] == 0).all())  # exactly zero, not NaN
            else:
                assert p.param.numel() == n
