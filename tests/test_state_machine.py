"""A state machine (hypothesis) over every method x storage x optimizer of the reset table: random
sequences of training steps (some of them topology updates), `.to(dtype)` round trips and
checkpoint round trips (model, optimizer and Sparsifier through bytes, into freshly built objects,
as a resumed run does) keep the invariants:

- exact density: every layer keeps its count of active connections;
- no duplicates: active indices strictly increasing, inside the weight;
- inactive weights exactly zero (masked storage; truly sparse storage stores none);
- bit-exact masks, weights and sparsifier step after every round trip;
- the same seed and the same steps give the same masks (a resumed run continues identically).
"""
from __future__ import annotations

import io
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from torch import nn

import sparsegrow as sg
from sparsegrow.optim_state import RESETS

OPTIMIZERS = {
    torch.optim.SGD: dict(lr=0.05, momentum=0.9, weight_decay=1e-3),
    torch.optim.Adam: dict(lr=1e-2),
    torch.optim.AdamW: dict(lr=1e-2, weight_decay=1e-2),
    torch.optim.RMSprop: dict(lr=1e-3, momentum=0.5, centered=True),
    torch.optim.Adagrad: dict(lr=1e-2, initial_accumulator_value=0.1),
    torch.optim.Rprop: dict(lr=1e-3),
}
# every method the Sparsifier builds (DST builds its own sparsifier: tests/test_dst.py)
METHODS = [m for m in sg.METHODS.names() if sg.METHODS.get(m).make is None]
STORAGES = ["masked", "sparse"]


def test_every_optimizer_of_the_table_is_driven():
    # torch's own optimizers of the table (other tests register classes of their own)
    assert set(OPTIMIZERS) == {c for c in RESETS if c.__module__.startswith("torch.optim")}


def build(method, storage, opt_cls, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    sp = sg.Sparsifier(model, 0.3, method=method, storage=storage, seed=seed,
                       schedule=sg.UpdateSchedule(every=2, end=10_000, fraction=0.3,
                                                  decay="constant"))
    opt = opt_cls(model.parameters(), **OPTIMIZERS[opt_cls])
    sp.attach(opt)
    return model, sp, opt


def snapshot(model, sp):
    return ({k: v.clone() for k, v in sp.masks().items()},
            {k: v.detach().clone() for k, v in model.state_dict().items()}, sp.step_count)


class SparsifierMachine(RuleBasedStateMachine):
    combo: tuple = ("set", "masked", torch.optim.SGD)

    @initialize(seed=st.integers(0, 3))
    def setup(self, seed):
        self.seed = seed
        self.model, self.sp, self.opt = build(*self.combo, seed)
        self.data = torch.Generator().manual_seed(seed)
        self.trace = []  # (kind, args): replayed on a fresh build to check determinism

    def _step(self, batch_seed):
        g = torch.Generator().manual_seed(batch_seed)
        x, y = torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g)
        dtype = next(self.model.parameters()).dtype
        self.opt.zero_grad()
        F.cross_entropy(self.model(x.to(dtype)), y).backward()
        self.opt.step()
        return self.sp.step()

    @rule(batch_seed=st.integers(0, 2 ** 16))
    def train_step(self, batch_seed):
        self._step(batch_seed)
        self.trace.append(batch_seed)

    @rule()
    def to_float64_and_back(self):
        before = snapshot(self.model, self.sp)
        self.model.to(torch.float64)
        assert all(p.dtype == torch.float64 for p in self.model.parameters())
        assert {k: v for k, v in self.sp.masks().items()}.keys() == before[0].keys()
        for k, v in self.sp.masks().items():
            assert torch.equal(v, before[0][k])
        self.model.to(torch.float32)
        after = snapshot(self.model, self.sp)
        for k in before[1]:
            assert torch.equal(before[1][k], after[1][k]), k

    @rule()
    def checkpoint_round_trip(self):
        """What a resumed run does: everything through bytes into freshly built objects."""
        before = snapshot(self.model, self.sp)
        buf = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                    "sp": self.sp.state_dict()}, buf)
        state = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
        self.model, self.sp, self.opt = build(*self.combo, self.seed + 100)  # other masks first
        self.model.load_state_dict(state["model"])
        self.sp.load_state_dict(state["sp"])
        self.opt.load_state_dict(state["opt"])
        after = snapshot(self.model, self.sp)
        assert before[2] == after[2]
        for k in before[0]:
            assert torch.equal(before[0][k], after[0][k]), k
        for k in before[1]:
            assert torch.equal(before[1][k], after[1][k]), k

    @invariant()
    def density_exact_no_duplicates_inactive_zero(self):
        if not hasattr(self, "sp"):
            return
        # the scheduled count (constant, except GMP's cubic pruning schedule)
        for p, count in zip(self.sp.params, self.sp.target_counts()):
            active = p.active()
            assert active.numel() == count, p.fqn
            if active.numel() > 1:
                assert bool((active[1:] > active[:-1]).all()), f"{p.fqn}: duplicates or unsorted"
            assert int(active[0]) >= 0 and int(active[-1]) < p.numel
            if isinstance(p, sg.MaskedParam):
                inactive = torch.ones(p.numel, dtype=torch.bool)
                inactive[active] = False
                assert bool((p.param.detach().view(-1)[inactive] == 0).all()), p.fqn

    def teardown(self):
        """The same seed and the same training steps on fresh objects give the same masks: the
        round trips on the way changed nothing (a resumed run continues identically)."""
        if not hasattr(self, "sp"):
            return
        final = {k: v.clone() for k, v in self.sp.masks().items()}
        self.model, self.sp, self.opt = build(*self.combo, self.seed)
        for b in self.trace:
            self._step(b)
        for k, v in self.sp.masks().items():
            assert torch.equal(v, final[k]), k


def combos() -> list:
    out = []
    for method, storage, opt in itertools.product(METHODS, STORAGES, OPTIMIZERS):
        grow = sg.METHODS.get(method).grow
        signal = sg.GROW.get(grow).needs_signal if grow else None
        if storage == "sparse" and signal is not None and signal.kind == "dense_grad":
            continue  # refused at construction: truly sparse layers form no dense gradient
        out.append(pytest.param(method, storage, opt, id=f"{method}-{storage}-{opt.__name__}"))
    return out


@pytest.mark.parametrize("method, storage, opt", combos())
def test_state_machine(method, storage, opt):
    machine = type("Machine", (SparsifierMachine,), {"combo": (method, storage, opt)})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=2, stateful_step_count=8, deadline=None,
        suppress_health_check=list(HealthCheck)))
