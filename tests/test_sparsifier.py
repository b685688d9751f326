"""Invariants of the topology engine, over every registered method x distribution x layer type."""
import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import sparsegrow as sg
from sparsegrow.selection import select_top
from sparsegrow.topology import sample_inactive

try:  # the search method registers itself on import (optional module of the package)
    import sparsegrow.search_grow  # noqa: F401
except ImportError:
    pass

# every method the Sparsifier builds; those with a constructor of their own (DST: Method.make)
# have their contract tests beside it (tests/test_dst.py)
METHODS = [m for m in sg.METHODS.names() if sg.METHODS.get(m).make is None]
DISTRIBUTIONS = sg.DISTRIBUTIONS.names()


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):  # x: (B, 1, 8, 8)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(),
                         nn.Linear(32, 10))


MODELS = {"linear": mlp, "conv": ConvNet}


def make(method, distribution="erk", kind="linear", density=0.3, seed=0, every=3, end=40,
         fraction=0.3, **kw):
    torch.manual_seed(seed)
    model = MODELS[kind]()
    sched = sg.UpdateSchedule(every=every, end=end, fraction=fraction, decay="cosine")
    sp = sg.Sparsifier(model, density, method=method, schedule=sched, distribution=distribution,
                       seed=seed, **kw)
    return model, sp


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def train(model, sp, opt, steps, start=0, check=None):
    stats = []
    for t in range(start, start + steps):
        x, y = batch(t)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        s = sp.step()
        if s is not None:
            stats.append(s)
        if check:
            check(t)
    return stats


def total_nnz(sp):
    return sum(p.nnz() for p in sp.params)


@pytest.mark.parametrize("method,distribution,kind",
                         list(itertools.product(METHODS, DISTRIBUTIONS, MODELS)))
def test_density_exact_and_moves_are_valid(method, distribution, kind):
    model, sp = make(method, distribution, kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    sp.attach(opt)
    shapes = [tuple(p.shape) for p in sp.params]
    spec = sg.METHODS.get(method)
    final = sg.layer_counts(shapes, sp.density, distribution)
    if spec.fan_in == "constant":  # n_out * round(count / n_out) per layer: whole rows
        final = [s[0] * max(1, round(c / s[0])) for s, c in zip(shapes, final)]
    assert sp.target_counts(10 ** 6) == final  # every method ends at its counts
    if spec.fan_in == "free":
        assert sum(final) == round(sp.density * sum(math.prod(s) for s in shapes))
    assert [p.nnz() for p in sp.params] == sp.target_counts(0)
    if spec.prune:  # GMP starts dense
        assert sp.target_counts(0) == [math.prod(s) for s in shapes]

    # Wrap every storage's update to check each move against the topology before it.
    moves = []
    for p in sp.params:
        orig = p.update

        def checked(drop, grow, init, optimizer=None, p=p, orig=orig):
            before = p.active()
            assert torch.isin(drop, before).all(), "dropped a connection that was not active"
            assert not torch.isin(grow, before).any(), "grew a connection that was already active"
            assert drop.unique().numel() == drop.numel() and grow.unique().numel() == grow.numel()
            if spec.prune:
                assert grow.numel() == 0, "a pruning method grew connections"
            else:
                assert drop.numel() == grow.numel()
            moves.append(drop.numel())
            orig(drop, grow, init, optimizer)
        p.update = checked

    def check(t):
        assert [p.nnz() for p in sp.params] == sp.target_counts(t + 1)
        for p in sp.params:
            if spec.fan_in == "constant":  # every output unit keeps the same number of inputs
                per_row = p.mask.view(p.shape[0], -1).sum(1)
                assert (per_row == per_row[0]).all()
            a = p.active()
            assert a.unique().numel() == a.numel()
            assert (a[1:] > a[:-1]).all()
            w = p.param.detach().reshape(-1)
            inactive = torch.ones_like(w, dtype=torch.bool)
            inactive[a] = False
            assert (w[inactive] == 0).all()

    stats = train(model, sp, opt, 30, check=check)
    if sp.dynamic:
        assert len(stats) == len([s for s in sp.schedule.update_steps() if s <= 30])
        assert sum(moves) > 0, "a dynamic method never changed the topology"
        assert sp.report()["itop"] > sp.density
    else:
        assert stats == [] and moves == []
        assert sp.report()["itop"] == pytest.approx(sp.report()["global_density"])


ZERO_KEEPING_OPTIMIZERS = {  # every entry of optim_state.RESETS, with weight decay where it has one
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-2, nesterov=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, amsgrad=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.9, centered=True,
                                              weight_decay=0.1),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, initial_accumulator_value=0.1,
                                              weight_decay=0.1),
    "rprop": lambda ps: torch.optim.Rprop(ps, lr=0.01),
}


def fresh_state(opt, param, key):
    """The reset table's value of state `key` for `param`'s group."""
    group = next(g for g in opt.param_groups if any(q is param for q in g["params"]))
    return sg.optim_state.RESETS[type(opt)].initial[key](group)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("opt_name", list(ZERO_KEEPING_OPTIMIZERS))
def test_inactive_weights_stay_exactly_zero(method, opt_name):
    model, sp = make(method, kind="conv", every=2)
    opt = ZERO_KEEPING_OPTIMIZERS[opt_name](model.parameters())
    sp.attach(opt)

    def check(t):
        for p in sp.params:
            assert (p.param.detach()[~p.mask] == 0).all()
            for key, s in opt.state[p.param].items():
                if torch.is_tensor(s) and s.shape == p.param.shape:
                    # state of inactive connections is a fresh parameter's (zero moments), so
                    # nothing can leak back
                    assert (s[~p.mask] == fresh_state(opt, p.param, key)).all(), key

    train(model, sp, opt, 20, check=check)


def test_attach_resets_state_left_by_dense_training():
    # Momentum of dense training before sparsifying would move inactive weights: attach resets it.
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for t in range(3):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    sp = sg.Sparsifier(model, 0.3, method="set", schedule=sg.UpdateSchedule(every=4, end=40))
    sp.attach(opt)

    def check(t):
        for p in sp.params:
            assert (p.param.detach()[~p.mask] == 0).all()

    train(model, sp, opt, 10, start=3, check=check)


def test_step_without_update_does_not_rezero_weights_unless_it_must():
    # The gradient mask and the reset table keep inactive weights at zero (test above); step()
    # re-zeroes only after updates, or every step where nothing vouches for the optimizer.
    class Plain(torch.optim.SGD):  # registered without zero_stays_zero: re-zeroed every step
        pass

    sg.register_optimizer(Plain, {"momentum_buffer": 0.0})
    for make_opt, every_step in ((lambda ps: torch.optim.Adam(ps, lr=1e-2), False),
                                 (lambda ps: Plain(ps, lr=0.05, momentum=0.9), True),
                                 (None, True)):
        model, sp = make("set", every=4)
        opt = make_opt(model.parameters()) if make_opt else torch.optim.SGD(model.parameters(), 0.05)
        sp.attach(opt if make_opt else None)
        calls = []
        for p in sp.params:
            p.enforce = (lambda orig: lambda: (calls.append(1), orig()))(p.enforce)
        stats = train(model, sp, opt, 8)
        n_enforce = len(calls) // len(sp.params)
        assert n_enforce == (8 if every_step else len(stats)) and len(stats) == 2


def test_loading_masks_resets_state_of_connections_they_turn_off():
    model, sp = make("set", every=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp.attach(opt)
    train(model, sp, opt, 3)
    other = make("set", every=4, seed=1)[1].state_dict()  # a different pattern
    other["step"] = sp.step_count
    sp.load_state_dict(other)

    def check(t):
        for p in sp.params:
            assert (p.param.detach()[~p.mask] == 0).all()
            assert (opt.state[p.param]["momentum_buffer"][~p.mask] == 0).all()

    check(None)
    train(model, sp, opt, 3, start=3, check=check)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_masks_and_other_seed_differs(method):
    runs = []
    for seed in (0, 0, 1):
        model, sp = make(method, seed=seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp.attach(opt)
        train(model, sp, opt, 20)
        runs.append(sp.masks())
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k])
    if sp.density < 1:
        assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_continues_identically(method):
    def fresh():
        model, sp = make(method)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sp.attach(opt)
        return model, sp, opt

    m1, s1, o1 = fresh()
    train(m1, s1, o1, 10)
    # deepcopy: state_dict() holds references that further training would change in place
    state = copy.deepcopy({"m": m1.state_dict(), "s": s1.state_dict(), "o": o1.state_dict()})
    train(m1, s1, o1, 20, start=10)

    torch.manual_seed(123)  # a different init: everything must come from the state
    m2, s2, o2 = fresh()
    m2.load_state_dict(state["m"])
    s2.load_state_dict(state["s"])
    o2.load_state_dict(state["o"])
    train(m2, s2, o2, 20, start=10)
    for k, v in s1.masks().items():
        assert torch.equal(v, s2.masks()[k])
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert s1.report()["itop"] == s2.report()["itop"]


def test_optimizer_state_reset_for_grown_and_dropped():
    model, sp = make("set", every=5, fraction=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp.attach(opt)
    train(model, sp, opt, 4)
    before = {p.fqn: p.mask.clone() for p in sp.params}
    train(model, sp, opt, 1, start=4)  # step 5 is an update step
    for p in sp.params:
        grown = p.mask & ~before[p.fqn]
        assert grown.any()
        buf = opt.state[p.param]["momentum_buffer"]
        assert (buf[grown] == 0).all() and (p.param.detach()[grown] == 0).all()


def test_rigl_grows_largest_gradients():
    torch.manual_seed(0)
    lin = nn.Linear(20, 10, bias=False)
    model = nn.Sequential(lin)
    sp = sg.Sparsifier(model, 0.2, method="rigl", distribution="uniform",
                       schedule=sg.UpdateSchedule(every=1, end=10, fraction=0.25, decay="constant"))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: weights stay, only topology moves
    sp.attach(opt)
    mask0 = sp.params[0].mask.clone()
    x = torch.randn(8, 20)
    (model(x) ** 2).sum().backward()
    w = lin.weight.detach()
    z = x @ w.T  # (8, 10)
    g = (2 * z).T @ x  # dense dL/dW, (10, 20)
    opt.step()
    sp.step()
    n = round(0.25 * int(mask0.sum()))
    # Dropped: the n smallest |w| among active; grown: the n largest |g| among the rest.
    w_act = w.abs().masked_fill(~mask0, float("inf"))
    dropped = torch.zeros_like(mask0).view(-1)
    dropped[torch.topk(-w_act.view(-1), n).indices] = True
    after_drop = mask0 & ~dropped.view_as(mask0)
    scores = g.abs().masked_fill(after_drop, -1)
    grown = torch.zeros_like(mask0).view(-1)
    grown[torch.topk(scores.view(-1), n).indices] = True
    expected = after_drop | grown.view_as(mask0)
    assert torch.equal(sp.params[0].mask, expected)


def test_allow_regrow_false_excludes_just_dropped():
    model, sp = make("rigl", every=2, fraction=0.5, allow_regrow=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp.attach(opt)
    stats = train(model, sp, opt, 12)
    assert stats and all(s["regrown"] == 0 for s in stats)


def _state_at(opt, p, idx):
    """Each Adam state tensor of p's storage at flat indices idx (a dense or a per-nnz tensor)."""
    st = opt.state[p.param]
    active = p.active()
    out = {}
    for k in ("exp_avg", "exp_avg_sq"):
        t = st[k].reshape(-1)
        out[k] = t[idx] if t.numel() == p.numel else t[torch.searchsorted(active, idx)]
    return out


@pytest.mark.parametrize("method,storage", [("rigl", "masked"), ("set", "masked"), ("set", "sparse")])
def test_regrown_connections_keep_their_weight_and_optimizer_state(method, storage):
    # A large update fraction drops most connections; some of them are grown again in the same
    # update ("regrown", allow_regrow=True). Those must keep their weight and their Adam moments
    # bit for bit, as if never dropped; every connection active before and after does.
    torch.manual_seed(0)
    model = mlp()
    sp = sg.Sparsifier(model, 0.5, method=method, storage=storage, allow_regrow=True, seed=3,
                       schedule=sg.UpdateSchedule(every=3, end=40, fraction=0.9, decay="constant"))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sp.attach(opt)
    for step in range(3):
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step < 2:
            assert sp.step() is None
    # after the optimizer step of the update step, before the update
    before = {p.fqn: (p.active(), p.values(p.active()).clone(),
                      {k: v.clone() for k, v in _state_at(opt, p, p.active()).items()})
              for p in sp.params}
    stats = sp.step()
    assert stats["regrown"] > 0
    for p in sp.params:
        a0, w0, s0 = before[p.fqn]
        a1 = p.active()
        stay = a0[torch.isin(a0, a1)]  # kept or regrown
        pos = torch.searchsorted(a0, stay)
        assert torch.count_nonzero(w0[pos]) == stay.numel()  # nothing to confuse with zero
        assert torch.equal(p.values(stay), w0[pos]), p.fqn
        s1 = _state_at(opt, p, stay)
        for k in s0:
            assert torch.count_nonzero(s0[k][pos]) > 0.9 * stay.numel()  # dead units: zero
            assert torch.equal(s1[k], s0[k][pos]), (p.fqn, k)


def test_schedule_fires_exactly_where_it_should():
    s = sg.UpdateSchedule(every=10, end=55, start=5, fraction=0.4, decay="cosine")
    assert s.update_steps() == [15, 25, 35, 45]
    assert [t for t in range(0, 80) if s.is_update_step(t)] == [15, 25, 35, 45]
    assert s.fraction_at(5) == pytest.approx(0.4)
    assert s.fraction_at(30) == pytest.approx(0.2)
    assert s.fraction_at(55) == pytest.approx(0.0)
    lin = sg.UpdateSchedule(every=10, end=105, decay="linear", fraction=0.5)
    assert lin.fraction_at(52.5) == pytest.approx(0.25)
    assert sg.UpdateSchedule(every=3, end=10, decay="constant", fraction=0.1).fraction_at(9) == 0.1

    model, sp = make("set", every=4, end=19)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sp.attach(opt)
    assert [s["step"] for s in train(model, sp, opt, 30)] == [4, 8, 12, 16]


@pytest.mark.parametrize("kwargs,match", [
    ({"density": 0.0}, "density must be in"),
    ({"density": 1.5}, "density must be in"),
    ({"method": "magic"}, "unknown method 'magic'; allowed: dense, static, set, rigl"),
    ({"distribution": "gaussian"}, "unknown distribution 'gaussian'"),
    ({"grow": "psychic"}, "unknown grow criterion 'psychic'"),
    ({"include": ["nope.weight"]}, "unknown parameter"),
    ({"grow_init": "ones"}, "unknown grow_init"),
    ({"density": 1e-4}, "too small"),
    ({"fixed": ["5.weight", "9.weight"]}, r"fixed \['9.weight'\] are not among the sparse parameters; "
                                          r"allowed: 1.weight, 3.weight, 5.weight"),
])
def test_bad_input_gives_clear_error(kwargs, match):
    model = mlp()
    args = {"density": 0.3, "method": "set", "schedule": sg.UpdateSchedule(every=2, end=10)} | kwargs
    with pytest.raises(ValueError, match=match):
        sg.Sparsifier(model, **args)


def test_dynamic_method_without_schedule_and_schedule_never_firing():
    with pytest.raises(ValueError, match="pass schedule"):
        sg.Sparsifier(mlp(), 0.3, method="rigl")
    with pytest.raises(ValueError, match="never fires"):
        sg.UpdateSchedule(every=100, end=50)
    with pytest.raises(ValueError, match="update fraction must be in"):
        sg.UpdateSchedule(every=1, end=50, fraction=0)


def test_include_by_name_and_filter_function_keep_other_weights_dense():
    model = mlp()
    sp = sg.Sparsifier(model, 0.3, method="static", include=["1.weight"])
    assert [p.fqn for p in sp.params] == ["1.weight"]
    sp = sg.Sparsifier(mlp(), 0.3, method="static",
                       include=lambda m, name: isinstance(m, nn.Linear) and m.out_features > 10)
    assert [p.fqn for p in sp.params] == ["1.weight", "3.weight"]


def test_sparse_init_scales_by_active_fan_in():
    torch.manual_seed(0)
    a = mlp()
    torch.manual_seed(0)
    b = mlp()
    sg.Sparsifier(a, 0.1, method="static", seed=0)
    sg.Sparsifier(b, 0.1, method="static", seed=0, sparse_init=True)
    wa, wb = a[1].weight.detach(), b[1].weight.detach()
    ratio = (wb[wa != 0] / wa[wa != 0])
    assert ratio.min() > 1.5  # density 0.1: about sqrt(10) larger


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.0, 2.0, 3.0]), min_size=1, max_size=40), st.integers(0, 40),
       st.integers(0, 1000))
def test_select_top_is_exact_and_seeded(values, k, seed):
    scores = torch.tensor(values)
    k = min(k, len(values))
    a = select_top(scores, k, torch.Generator().manual_seed(seed))
    b = select_top(scores, k, torch.Generator().manual_seed(seed))
    assert torch.equal(a, b)
    assert a.unique().numel() == k
    if k:
        chosen = scores[a]
        rest = scores[~torch.isin(torch.arange(len(values)), a)]
        assert rest.numel() == 0 or chosen.min() >= rest.max()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 2000), st.floats(0, 0.95), st.floats(0, 1), st.integers(0, 99))
def test_sample_inactive_distinct_and_excluded(numel, excl_frac, k_frac, seed):
    g = torch.Generator().manual_seed(seed)
    excluded = torch.randperm(numel, generator=g)[: int(excl_frac * numel)].sort().values
    k = int(k_frac * (numel - excluded.numel()))
    out = sample_inactive(numel, excluded, k, g)
    assert out.numel() == k and out.unique().numel() == k
    assert not torch.isin(out, excluded).any()
    assert (out >= 0).all() and (out < numel).all()


def test_sample_inactive_large_layer_uses_no_dense_tensor_and_is_uniform():
    numel = 1 << 34  # a 131072 x 131072 layer: no dense mask could exist
    g = torch.Generator().manual_seed(0)
    excluded = torch.unique(torch.randint(0, numel, (100_000,), generator=g))
    out = sample_inactive(numel, excluded, 200_000, g)
    assert out.numel() == 200_000 and out.unique().numel() == 200_000
    assert not torch.isin(out, excluded).any()
    # Uniform over the range: each eighth of [0, numel) gets about 1/8 of the draws.
    counts = torch.bincount(out // (numel // 8), minlength=8).float()
    assert (counts / counts.sum() - 1 / 8).abs().max() < 0.01


def test_sparsifying_again_replaces_the_gradient_mask():
    model = mlp()
    first = sg.Sparsifier(model, 0.3, method="static", seed=0)
    old = {p.fqn: p.mask.clone() for p in first.params}
    sp = sg.Sparsifier(model, 0.3, method="static", seed=1)  # a new pattern for the same weights
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    for p in sp.params:
        grad = p.param.grad
        assert (grad[~p.mask] == 0).all()
        only_new = p.mask & ~old[p.fqn]
        # not also masked by the first, stale pattern
        assert (grad[only_new] != 0).any()  # a stale hook would zero all of them


@pytest.mark.parametrize("method", [m for m in METHODS if sg.METHODS.get(m).grow is not None])
def test_fixed_weights_keep_their_first_pattern(method):
    # the thesis's setting: the classifier stays sparse but only the conv layers are updated
    model, sp = make(method, kind="conv", fixed=["fc.weight"], every=2, end=30)
    first = {p.fqn: p.active().clone() for p in sp.params}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp.attach(opt)
    stats = train(model, sp, opt, 30)
    assert stats and all("fc.weight" not in s["layers"] for s in stats)
    assert torch.equal(sp.params[2].active(), first["fc.weight"])
    assert not torch.equal(sp.params[0].active(), first["conv1.weight"])  # the others move
    assert total_nnz(sp) == sum(v.numel() for v in first.values())


@pytest.mark.parametrize("model, kwargs, density", [("mlp", "{hidden: [1024, 512]}", 0.01),
                                                    ("cnn", "{}", 0.3)])
def test_truly_sparse_run_inits_like_masked_with_sparse_init(model, kwargs, density):
    """The run's build (experiments.loop) gives each sparse layer's active weights the same
    spread under both storages when sparsity.sparse_init is on: the truly sparse build scales
    once, after its conv init (it once scaled Linear layers twice: ×sqrt(784 / 8) here)."""
    from types import SimpleNamespace
    from sparsegrow.experiments.config import load_config
    from sparsegrow.experiments.loop import build_model_and_sparsifier
    data = SimpleNamespace(input_shape=(1, 28, 28), num_classes=10)
    spread = {}
    for storage in ("masked", "sparse"):
        cfg = load_config(None, [f"model.name={model}", f"model.kwargs={kwargs}",
                                 "sparsity.method=static", f"sparsity.density={density}",
                                 "sparsity.sparse_init=true", f"sparsity.storage={storage}"])
        net, sp = build_model_and_sparsifier(cfg, data, 10, torch.device("cpu"))
        weights = dict(net.named_parameters())
        spread[storage] = {}
        for p in sp.params:
            w = weights[p.fqn] if storage == "masked" else weights[p.fqn.rpartition(".")[0] + ".values"]
            active = w.detach().reshape(-1)[p.active()] if storage == "masked" else w.detach()
            spread[storage][p.fqn] = active.pow(2).mean().sqrt().item()
    assert spread["masked"].keys() == spread["sparse"].keys() and len(spread["masked"]) >= 3
    for fqn, rms in spread["masked"].items():
        assert spread["sparse"][fqn] == pytest.approx(rms, rel=0.15), fqn
