"""The bounded ITOP record (`metrics.EverActive`): exact up to a cap, then a HyperLogLog sketch.

Issue 13: the record of connections ever active must not grow without bound (it reached 38x the
active count after 100 LeNet epochs of SET, and has no limit at 10⁶ × 10⁶ widths).
"""
import pytest
import torch
from torch import nn

import sparsegrow as sg
from sparsegrow import updater
from sparsegrow.metrics import EverActive, hash64, itop_rate


def splitmix64(x: int) -> int:  # the reference, in Python's unbounded ints
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_hash_is_splitmix64_with_wrapping_int64():
    xs = [0, 1, 2, 12345, 2**31 - 1, 2**40 + 7, 10**12 - 1]
    got = hash64(torch.tensor(xs)).tolist()
    want = [splitmix64(x) for x in xs]
    assert [g & ((1 << 64) - 1) for g in got] == want


def stream(count, distinct, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = torch.unique(torch.randint(0, 10**12, (distinct,), generator=g))  # ~no collisions
    return pool[torch.randint(0, pool.numel(), (count,), generator=g)], pool


def test_exact_below_the_cap():
    rec = EverActive(torch.tensor([5, 1, 3]), cap=100)
    rec.add(torch.tensor([3, 9, 9, 2]))
    assert rec.count() == 5 and rec.exact.tolist() == [1, 2, 3, 5, 9] and rec.registers is None


@pytest.mark.parametrize("distinct", [3_000, 60_000, 400_000])
def test_sketch_counts_distinct_connections_within_3_percent(distinct):
    idx, pool = stream(3 * distinct, distinct)
    rec = EverActive(idx[:100], cap=1000)
    for part in idx[100:].split(50_000):  # updates of churn, many repeats
        rec.add(part)
    true = torch.unique(idx).numel()
    assert rec.exact is None and rec.nbytes() == 16384  # bounded whatever the churn
    assert rec.count() == pytest.approx(true, rel=0.03)


def test_sketch_is_deterministic_and_order_free():
    idx, _ = stream(100_000, 50_000, seed=1)
    a, b = EverActive(idx[:10], cap=5), EverActive(idx[-10:], cap=5)
    for part in idx.split(7_000):
        a.add(part)
    for part in reversed(idx.split(3_000)):
        b.add(part)
    assert torch.equal(a.registers, b.registers)  # the same on every rank and order


def test_state_round_trips_and_old_checkpoints_load():
    idx, _ = stream(50_000, 20_000, seed=2)
    for cap in (10**6, 100):  # exact, sketch
        rec = EverActive(idx, cap)
        back = EverActive.from_state(rec.state_dict(), cap)
        assert back.count() == rec.count()
        back.add(torch.tensor([1, 2, 3]))
        rec.add(torch.tensor([1, 2, 3]))
        assert back.count() == rec.count()
    old = torch.unique(idx)  # before session 5 the checkpoint held the sorted indices
    assert EverActive.from_state(old, 10**6).count() == old.numel()
    assert EverActive.from_state(old, 100).count() == pytest.approx(old.numel(), rel=0.03)
    assert itop_rate({"w": EverActive(old, 10**6)}, {"w": 10 * old.numel()}) == pytest.approx(0.1)


def test_sparsifier_record_stays_bounded_and_close_to_exact(monkeypatch):
    # a cap of 200 indices per layer: SET's churn spills every record into its sketch; the ITOP
    # rate stays within 3% of the exact count kept beside it, and checkpoints round-trip
    monkeypatch.setattr(updater, "ITOP_EXACT_MIN", 200)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))
    sp = sg.Sparsifier(model, 0.05, method="set", seed=0,
                       schedule=sg.UpdateSchedule(every=1, end=1000, fraction=0.3, decay="constant"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp.attach(opt)
    seen = {p.fqn: set(p.active().tolist()) for p in sp.params}
    for _ in range(40):
        loss = model(torch.randn(16, 300)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
        for p in sp.params:
            seen[p.fqn] |= set(p.active().tolist())
    exact = sum(len(v) for v in seen.values()) / sum(p.numel for p in sp.params)
    assert all(r.exact is None and r.nbytes() == 16384 for r in sp.ever_active.values())
    assert sp.report()["itop"] == pytest.approx(exact, rel=0.03)
    state = sp.state_dict()
    sp2 = sg.Sparsifier(copy_of(model), 0.05, method="set", seed=0,
                        schedule=sg.UpdateSchedule(every=1, end=1000))
    sp2.load_state_dict(state)
    assert sp2.report()["itop"] == sp.report()["itop"]


def copy_of(model):
    import copy
    return copy.deepcopy(model)
