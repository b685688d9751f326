"""The baselines of issue 15: gradual magnitude pruning, SNFS momentum growth, constant fan-in.

The registry-wide invariants (exact counts, no duplicate moves, inactive weights zero, same seed
same masks, state round-trip) run over them in test_sparsifier.py; here each one's own rule.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsegrow as sg
from sparsegrow.selection import select_top_rows
from sparsegrow.signals import SignalSpec


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(),
                         nn.Linear(32, 10))


def batch(t):
    g = torch.Generator().manual_seed(t)
    return torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)


def run(model, sp, opt, steps, start=0, each=None):
    stats = []
    for t in range(start, start + steps):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        s = sp.step()
        if s is not None:
            stats.append(s)
        if each:
            each(t + 1, s)
    return stats


# -- gradual magnitude pruning -----------------------------------------------------------------


def test_gmp_follows_the_cubic_schedule_by_magnitude_and_never_grows():
    torch.manual_seed(0)
    model = mlp()
    sched = sg.UpdateSchedule(every=5, end=33, start=2)  # pruning steps 7, 12, ..., 32
    sp = sg.Sparsifier(model, 0.1, method="gmp", schedule=sched)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp.attach(opt)
    shapes = [tuple(p.shape) for p in sp.params]
    numel = [math.prod(s) for s in shapes]
    final = sg.layer_counts(shapes, 0.1, "erk")
    assert [p.nnz() for p in sp.params] == numel  # dense start
    t0, last = 2, 32

    def each(t, stats):
        if sched.is_update_step(t):
            progress = (t - t0) / (last - t0)
            want = [round(c + (n - c) * (1 - progress) ** 3) for n, c in zip(numel, final)]
            assert [p.nnz() for p in sp.params] == want, t
            assert stats["grown"] == 0 and stats["regrown"] == 0
        if t < 7:
            assert [p.nnz() for p in sp.params] == numel

    # magnitude: at a pruning step the survivors are the largest |w| of what was active
    before = {}
    orig = sp._update

    def spy(step):
        before.update({p.fqn: p.param.detach().clone() for p in sp.params})
        return orig(step)

    sp._update = spy
    run(model, sp, opt, 40, each=each)
    assert [p.nnz() for p in sp.params] == final  # exact at the end
    assert sp.report()["global_density"] == pytest.approx(sum(final) / sum(numel))
    for p in sp.params:
        w = before[p.fqn].abs().reshape(-1)
        kept = w[p.active()]
        gone = w[~p.mask.reshape(-1)]
        assert kept.min() >= gone[gone > 0].max() if (gone > 0).any() else True


def test_gmp_refuses_growth_and_constant_fan_in():
    sched = sg.UpdateSchedule(every=5, end=30)
    with pytest.raises(ValueError, match="prunes without growing"):
        sg.Sparsifier(mlp(), 0.1, method="gmp", grow="random", schedule=sched)
    with pytest.raises(ValueError, match="fan_in='constant' applies to drop-and-grow"):
        sg.Sparsifier(mlp(), 0.1, method="gmp", fan_in="constant", schedule=sched)


# -- SNFS: momentum of the dense gradient ------------------------------------------------------


def test_snfs_grows_by_the_moving_average_of_the_dense_gradient():
    torch.manual_seed(0)
    model = mlp()
    beta, every = 0.9, 4
    sp = sg.Sparsifier(model, 0.2, method="snfs", schedule=sg.UpdateSchedule(every=every, end=30))
    assert sp.grow.needs_signal == SignalSpec("dense_grad", accumulate=True, momentum=beta)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp.attach(opt)
    ema = {p.fqn: torch.zeros(p.shape) for p in sp.params}
    dense = {}

    def grab(fqn):  # the unmasked gradient, as the storage hands it to the signal
        return lambda g: dense.__setitem__(fqn, g.detach().clone())

    for p in sp.params:  # a second observer in front of the signal's: chain both
        signal_observer = p._grad_observer
        p.observe_grad(lambda g, f=grab(p.fqn), s=signal_observer: (f(g), s(g)))
    checked = 0
    for t in range(1, 13):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for f in ema:
            ema[f] = beta * ema[f] + dense[f]
        masks_before = {p.fqn: p.mask.clone() for p in sp.params}
        stats = sp.step()
        if stats is None:
            continue
        for p in sp.params:  # grown = the largest |m| among connections inactive after the drop
            grown = p.mask & ~masks_before[p.fqn]
            if not grown.any():
                continue
            eligible = ~p.mask | grown  # inactive now, or just grown
            score = ema[p.fqn].abs()
            assert score[grown].min() >= score[eligible & ~grown].max() - 1e-6
            checked += 1
    assert checked >= 3
    # the average is kept across updates (momentum), not restarted after each one
    assert sp.signals.layers[sp.params[0].fqn].ema is not None


def test_momentum_signal_needs_dense_grad_and_accumulation():
    with pytest.raises(ValueError, match="needs kind='dense_grad' and accumulate=True"):
        SignalSpec("dense_grad", momentum=0.9)
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        SignalSpec("dense_grad", accumulate=True, momentum=1.0)
    with pytest.raises(ValueError, match="momentum beta"):
        sg.GROW.get("momentum")(beta=0.0)


# -- constant fan-in -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["set", "rigl", "snfs", "srigl", "search"])
@pytest.mark.parametrize("allow_regrow", [True, False])
def test_constant_fan_in_holds_at_init_and_after_every_update(method, allow_regrow):
    torch.manual_seed(0)
    model = mlp()
    sp = sg.Sparsifier(model, 0.25, method=method, fan_in="constant", allow_regrow=allow_regrow,
                       schedule=sg.UpdateSchedule(every=3, end=30, fraction=0.5))
    assert sp.fan_in == "constant"
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp.attach(opt)
    first = {p.fqn: p.mask.clone() for p in sp.params}

    def per_row():
        return [p.mask.view(p.shape[0], -1).sum(1) for p in sp.params]

    k0 = [r[0].item() for r in per_row()]
    for r, k in zip(per_row(), k0):
        assert (r == k).all()

    def each(t, stats):
        for r, k in zip(per_row(), k0):
            assert (r == k).all(), t
        if stats is not None:
            for p in sp.params:  # moves come in whole rows: n_row per output unit
                info = stats["layers"][p.fqn]
                assert info["dropped"] % p.shape[0] == 0 and info["grown"] == info["dropped"]

    stats = run(model, sp, opt, 29, each=each)
    assert stats and sum(s["dropped"] for s in stats) > 0
    assert any(not torch.equal(p.mask, first[p.fqn]) for p in sp.params)


def test_constant_fan_in_is_seeded_and_refused_where_unsupported():
    masks = []
    for _ in range(2):
        torch.manual_seed(0)
        model = mlp()
        sp = sg.Sparsifier(model, 0.25, method="srigl", schedule=sg.UpdateSchedule(every=3, end=30),
                           seed=3)
        sp.attach(torch.optim.SGD(model.parameters(), lr=0.05))
        run(model, sp, sp.optimizer, 10)
        masks.append(sp.masks())
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    with pytest.raises(ValueError, match="chooses per output unit"):
        sg.Sparsifier(mlp(), 0.25, method="search", fan_in="constant",
                      grow_kwargs={"backend": "lsh"}, schedule=sg.UpdateSchedule(every=3, end=30))
    with pytest.raises(ValueError, match="unknown fan_in"):
        sg.Sparsifier(mlp(), 0.25, method="rigl", fan_in="fixed",
                      schedule=sg.UpdateSchedule(every=3, end=30))


def test_constant_fan_in_search_grows_what_constant_fan_in_rigl_grows():
    """Exact search per output unit = RigL's per-row top-k of the dense gradient, without it."""
    masks = {}
    for method in ("search", "rigl"):
        torch.manual_seed(0)
        model = mlp()
        sp = sg.Sparsifier(model, 0.25, method=method, fan_in="constant", seed=1,
                           schedule=sg.UpdateSchedule(every=3, end=30, fraction=0.5))
        sp.attach(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
        stats = run(model, sp, sp.optimizer, 12)
        assert stats and sum(s["grown"] for s in stats) > 0
        masks[method] = sp.masks()
    for k in masks["rigl"]:
        assert torch.equal(masks["search"][k], masks["rigl"][k]), k


def test_select_top_rows_is_exact_per_row_and_breaks_ties_at_random():
    scores = torch.tensor([[3.0, 1.0, 2.0, float("-inf")], [0.0, 5.0, 5.0, 5.0]])
    got = select_top_rows(scores, 2, torch.Generator().manual_seed(0))
    assert got[0].tolist() == [0, 2]
    picks = {tuple(select_top_rows(scores, 2, torch.Generator().manual_seed(s))[1].tolist())
             for s in range(30)}
    assert picks == {(1, 2), (1, 3), (2, 3)}  # the three ways to break the tie
    with pytest.raises(ValueError, match="fewer eligible"):
        select_top_rows(scores, 4, torch.Generator())


# -- one registry ------------------------------------------------------------------------------


def test_every_method_is_listed_and_named_by_the_unknown_method_error(capsys):
    from sparsegrow.experiments.cli import main

    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    with pytest.raises(ValueError) as err:
        sg.Sparsifier(mlp(), 0.1, method="nope")
    for name in sg.METHODS.names():
        assert f"  {name} " in listed
        assert name in str(err.value)
    assert {"dst", "gmp", "snfs", "srigl"} <= set(sg.METHODS.names())


@pytest.mark.parametrize("method", sg.METHODS.names())
def test_every_method_builds_from_a_config_and_names_its_runs(method):
    from sparsegrow.experiments.build import build_sparsifier
    from sparsegrow.experiments.config import load_config

    cfg = load_config(None, [f"sparsity.method={method}", "sparsity.density=0.1",
                             "model.name=mlp", "train.epochs=2", "sparsity.update_every=10"])
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    sp = build_sparsifier(cfg, model, steps_per_epoch=50)
    assert sp.report()["global_density"] > 0
    spec = sg.METHODS.get(method)
    name = cfg.run_name()
    if spec.learned_density:  # named after what sets the density, not a density it won't have
        assert f"-{method}-alpha{cfg.dst.alpha:g}-" in name and "-d0.1-" not in name
    else:
        assert f"-{method}-d{'1' if spec.dense else '0.1'}-" in name


def test_unknown_method_in_a_config_lists_every_method():
    from sparsegrow.experiments.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, ["sparsity.method=nope"])
    assert all(name in str(err.value) for name in sg.METHODS.names())


def test_ci95_is_the_t_interval_of_the_mean():
    from sparsegrow.experiments.report import ci95

    assert ci95([1.0, 2.0, 3.0]) == "[-0.48, 4.48]"  # 2 ± 4.303 * 1 / sqrt(3)
    assert ci95([0.5]) == "-"
