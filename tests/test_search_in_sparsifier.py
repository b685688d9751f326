"""The search criterion inside the Sparsifier: stats are merged, accumulation sees the whole window."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsegrow as sg


def _run(accumulate, every=4, steps=12, backend="exact", storage="masked", on_update=None):
    """Train a 30-40-5 MLP grown by search; the update records, after `on_update(sp, before)`
    (before: each layer's active set ahead of the update) has checked each one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 5))
    sp = sg.Sparsifier(model, 0.3, method="search", storage=storage, seed=0,
                       schedule=sg.UpdateSchedule(every=every, end=100, fraction=0.2),
                       grow_kwargs={"backend": backend, "sketch_dim": 16 if accumulate else 0,
                                    "accumulate": accumulate})
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp.attach(opt)
    stats = []
    for t in range(steps):
        x, y = torch.randn(8, 30), torch.randint(0, 5, (8,))
        before = [p.active() for p in sp.params]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        s = sp.step()
        if s:
            stats.append(s)
            if on_update is not None:
                on_update(sp, before)
    return stats


def test_search_stats_are_merged_per_layer():
    stats = _run(accumulate=False)
    assert [s["step"] for s in stats] == [4, 8, 12]
    layer = stats[0]["layers"]["0.weight"]
    assert {"grow_time_s", "recall", "quality"} <= set(layer)
    assert layer["recall"] == 1.0 and layer["signal_steps"] == 1  # exact search, update step only


def test_accumulate_arms_every_step_of_the_window():
    stats = _run(accumulate=True, every=4)
    assert [s["layers"]["0.weight"]["signal_steps"] for s in stats] == [4, 4, 4]


@pytest.mark.parametrize("storage", ["masked", "sparse"])
@pytest.mark.parametrize("backend", ["auto", "lowrank", "sample-norm", "sample-wedge",
                                     "sample-diamond"])
def test_pairs_backends_grow_from_the_accumulated_sketch(backend, storage):
    """Issue 13's backends take the accumulated, sketched signal (16 rows summing every step of
    the window) in either storage: exact density, grown pairs new and beating random growth."""
    def same_count_no_duplicates(sp, before):
        for p, a0 in zip(sp.params, before):
            a = p.active()
            assert a.numel() == a0.numel() and a.unique().numel() == a.numel()

    stats = _run(True, every=4, steps=8, backend=backend, storage=storage,
                 on_update=same_count_no_duplicates)
    assert [s["step"] for s in stats] == [4, 8]
    for s in stats:
        layer = s["layers"]["0.weight"]
        assert layer["signal_steps"] == 4 and layer["signal_rows"] == 16
        # quality 0.86-1.0 here, random growth 0.27-0.34
        assert layer["grown"] > 0 and layer["quality"] >= 0.8 > layer["quality_random"] + 0.3
