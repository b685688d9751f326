"""The optimizer contract: what attach checks, and the per-optimizer state-reset table applied by
topology updates on both storages (masked: reset in place; sparse: re-indexed)."""
import pytest
import torch
from torch import nn

import sparsegrow as sg
from sparsegrow import optim_state

# Every table entry, configured so that each of its per-weight state tensors exists, with the
# value that state must hold for a dropped or grown connection (written out here, not read from
# the table, so a wrong table entry fails).
LR_RPROP = 0.01
OPTIMIZERS = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
            {"momentum_buffer": 0.0}),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
             {"exp_avg": 0.0, "exp_avg_sq": 0.0, "max_exp_avg_sq": 0.0}),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True, weight_decay=0.1),
              {"exp_avg": 0.0, "exp_avg_sq": 0.0, "max_exp_avg_sq": 0.0}),
    "rmsprop": (lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9, centered=True),
                {"square_avg": 0.0, "momentum_buffer": 0.0, "grad_avg": 0.0}),
    "adagrad": (lambda ps: torch.optim.Adagrad(ps, lr=0.05, initial_accumulator_value=0.3),
                {"sum": 0.3}),
    "rprop": (lambda ps: torch.optim.Rprop(ps, lr=LR_RPROP), {"prev": 0.0, "step_size": LR_RPROP}),
}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 20), nn.ReLU(),
                         nn.Linear(20, 5))


def make(storage="masked", method="set", every=3, **kw):
    model = mlp()
    sched = sg.UpdateSchedule(every=every, end=40, fraction=0.3, decay="constant")
    sp = sg.sparsify(model, 0.2, method=method, schedule=sched if method != "static" else None,
                     storage=storage, seed=1, **kw)
    return model, sp


def train_step(model, opt, gen, step_optimizer=True):
    loss = (model(torch.randn(16, 30, generator=gen)) - 1).square().mean()
    opt.zero_grad()
    loss.backward()
    if step_optimizer:
        opt.step()


def test_table_lists_exactly_the_tested_optimizers():
    built = {type(make_opt([nn.Parameter(torch.zeros(2, 2))])): expected
             for make_opt, expected in OPTIMIZERS.values()}
    for cls, expected in built.items():
        assert set(optim_state.RESETS[cls].initial) == set(expected), cls.__name__
    assert {torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop,
            torch.optim.Adagrad, torch.optim.Rprop} <= set(optim_state.RESETS)


def _state_at(state_tensor, flat_pos, storage, active):
    """The state of connections at flat indices `flat_pos` (masked: dense; sparse: per nnz)."""
    if storage == "masked":
        return state_tensor.reshape(-1)[flat_pos]
    return state_tensor[torch.searchsorted(active, flat_pos)]


@pytest.mark.parametrize("storage", ["masked", "sparse"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_update_resets_dropped_and_grown_state_to_the_table_value(opt_name, storage):
    make_opt, expected = OPTIMIZERS[opt_name]
    model, sp = make(storage)
    opt = make_opt(model.parameters())
    sp.attach(opt)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        train_step(model, opt, gen)
        assert sp.step() is None
    train_step(model, opt, gen)  # step 3 is an update step
    before = {p.fqn: (p.active().clone(), {k: v.clone() for k, v in opt.state[p.param].items()})
              for p in sp.params}
    assert sp.step() is not None
    for p in sp.params:
        active0, state0 = before[p.fqn]
        active1, state1 = p.active(), opt.state[p.param]
        kept = active0[torch.isin(active0, active1)]
        dropped = active0[~torch.isin(active0, active1)]
        grown = active1[~torch.isin(active1, active0)]
        assert grown.numel() > 0 and dropped.numel() == grown.numel()
        assert set(k for k, v in state1.items() if v.dim() > 0) == set(expected)
        for key, value in expected.items():
            fresh = torch.tensor(value, dtype=state1[key].dtype)
            got_grown = _state_at(state1[key], grown, storage, active1)
            assert bool((got_grown == fresh).all()), (key, "grown")
            if storage == "masked":  # truly sparse storage keeps no state for dropped ones
                assert bool((_state_at(state1[key], dropped, storage, active1) == fresh).all()), \
                    (key, "dropped")
            assert torch.equal(_state_at(state1[key], kept, storage, active1),
                               _state_at(state0[key], kept, storage, active0)), (key, "kept")
        for key, v in state0.items():
            if v.dim() == 0:  # per-tensor scalars (`step`) are left alone
                assert torch.equal(state1[key], v), key


@pytest.mark.parametrize("storage", ["masked", "sparse"])
def test_grown_weight_under_rprop_moves_by_a_normal_step(storage):
    # Rprop's first step of a connection is lr * sign(g); with its step size reset to 0 instead of
    # lr the grown weight would stay put and then creep up from the 1e-6 floor.
    model, sp = make(storage)
    opt = torch.optim.Rprop(model.parameters(), lr=LR_RPROP)
    sp.attach(opt)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        train_step(model, opt, gen)
        before = {p.fqn: p.active().clone() for p in sp.params}
        stats = sp.step()
    assert stats is not None
    grown = {p.fqn: p.active()[~torch.isin(p.active(), before[p.fqn])] for p in sp.params}
    w0 = {p.fqn: p.values(grown[p.fqn]).clone() for p in sp.params}
    train_step(model, opt, gen, step_optimizer=False)
    grads = {}
    for p in sp.params:
        g = p.param.grad.reshape(-1)
        grads[p.fqn] = g[grown[p.fqn]] if storage == "masked" else \
            g[torch.searchsorted(p.active(), grown[p.fqn])]
    opt.step()
    moved = 0
    for p in sp.params:
        assert bool((w0[p.fqn] == 0).all())  # grow_init="zero"
        step = (p.values(grown[p.fqn]) - w0[p.fqn])[grads[p.fqn] != 0]
        torch.testing.assert_close(step.abs(), torch.full_like(step, LR_RPROP))
        moved += step.numel()
    assert moved > 0


# ---------------------------------------------------------------------------------------------
# attach: which optimizer, holding which parameters


def test_optimizer_built_before_sparse_storage_is_refused():
    model = mlp()
    early = torch.optim.SGD(model.parameters(), lr=0.1)  # holds the dense weights about to go
    sched = sg.UpdateSchedule(every=3, end=40)
    sp = sg.sparsify(model, 0.2, method="set", schedule=sched, storage="sparse")
    msg = (r"does not hold the sparse parameter\(s\) \['0.weight', '2.weight', '4.weight'\].*"
           r"build the optimizer after the Sparsifier")
    with pytest.raises(ValueError, match=msg):
        sp.attach(early)
    early = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match=msg):
        sg.sparsify(mlp(), 0.2, method="set", schedule=sched, storage="sparse", optimizer=early)
    sp.attach(torch.optim.SGD(model.parameters(), lr=0.1))  # built after: accepted


def test_optimizer_missing_a_masked_weight_is_refused():
    model, sp = make("masked")
    with pytest.raises(ValueError, match=r"\['2.weight', '4.weight'\]"):
        sp.attach(torch.optim.SGD(model[0].parameters(), lr=0.1))
    # masked storage keeps the weight Parameters: an optimizer built before is the right one
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = sg.sparsify(model, 0.2, method="set", schedule=sg.UpdateSchedule(every=3, end=40),
                     optimizer=opt)
    assert sp.optimizer is opt


def test_topology_update_without_attach_is_an_error():
    model, sp = make("masked")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        train_step(model, opt, gen)
        sp.step()
    train_step(model, opt, gen)
    with pytest.raises(RuntimeError, match=r"call sparsifier.attach\(optimizer\) first"):
        sp.step()
    assert sp.step_count == 2  # nothing happened: attach and call step() again
    sp.attach(opt)
    assert sp.step() is not None

    # a static pattern never resets optimizer state: no optimizer needed
    model, sp = make("masked", method="static")
    for _ in range(5):
        assert sp.step() is None


def test_attach_none_opts_out_of_optimizer_state():
    model, sp = make("masked")
    sp.attach(None)  # the caller updates the weights by hand
    gen = torch.Generator().manual_seed(0)
    stats = []
    for _ in range(6):
        loss = (model(torch.randn(16, 30, generator=gen)) - 1).square().mean()
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for w in model.parameters():
                w -= 0.05 * w.grad
        stats.append(sp.step())
    assert sum(s is not None for s in stats) == 2


def test_unknown_optimizer_is_refused_at_attach_and_can_be_registered():
    model, sp = make("masked")
    with pytest.raises(ValueError, match=r"NAdam.*supported: SGD, Adam, AdamW, RMSprop, Adagrad, "
                                         r"Rprop.*register_optimizer"):
        sp.attach(torch.optim.NAdam(model.parameters()))

    class MyNAdam(torch.optim.NAdam):  # a class of this test only: the global table stays clean
        pass

    class HalfKnown(torch.optim.NAdam):
        pass

    sg.register_optimizer(MyNAdam, {"exp_avg": 0.0, "exp_avg_sq": 0.0}, zero_stays_zero=True)
    sg.register_optimizer(HalfKnown, {"exp_avg": 0.0})
    for cls, ok in ((MyNAdam, True), (HalfKnown, False)):
        model, sp = make("masked")
        opt = cls(model.parameters(), lr=1e-2)
        sp.attach(opt)
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            train_step(model, opt, gen)
            sp.step()
        train_step(model, opt, gen)
        if ok:
            before = {p.fqn: p.mask.clone() for p in sp.params}
            sp.step()
            for p in sp.params:
                grown = p.mask & ~before[p.fqn]
                assert grown.any() and (opt.state[p.param]["exp_avg_sq"][grown] == 0).all()
        else:
            with pytest.raises(ValueError, match=r"per-weight state \['exp_avg_sq'\]"):
                sp.step()
    with pytest.raises(ValueError, match="must be a number or a function"):
        sg.register_optimizer(MyNAdam, {"exp_avg": "zero"})


def test_dst_refuses_an_unknown_optimizer():
    from sparsegrow.dst import DSTSparsifier, param_groups

    model = mlp()
    sp = DSTSparsifier(model)
    with pytest.raises(ValueError, match="supported: SGD"):
        sp.attach(torch.optim.NAdam(param_groups(model, 0.0)))
