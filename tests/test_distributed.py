"""Data-parallel training: one topology on every rank, growth signals summed over micro-batches,
window steps and ranks, checkpointed whole.

Two gloo processes on the CPU run every scenario once (a module-scoped fixture: one spawn); the
same scenario in this process on the concatenated global batch is the reference. Models are in
float64 so that "the same connections" is not at the mercy of float32 summation order.
"""
from __future__ import annotations

import copy
import io
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import sparsegrow as sg
from sparsegrow.distributed import TopologyMismatch, topology_hash

GLOBAL_BATCH = 16
IN, OUT = 20, 5

# name -> (method, storage, grow_kwargs). Every registered dynamic method, both storages where
# they apply; "search-lsh" is the approximate backend (no optional package needed).
SCENARIOS = {
    "set-masked": ("set", "masked", None),
    "set-sparse": ("set", "sparse", None),
    "rigl-masked": ("rigl", "masked", None),
    "snfs-masked": ("snfs", "masked", None),
    "search-masked": ("search", "masked", {"backend": "exact"}),
    "search-sparse": ("search", "sparse", {"backend": "exact"}),
    "search-lsh-masked": ("search", "masked", {"backend": "lsh", "k_similar": 0.5, "bits": 2.0}),
    "search-lsh-sparse": ("search", "sparse", {"backend": "lsh", "k_similar": 0.5, "bits": 2.0}),
    "search-sketch-masked": ("search", "masked", {"backend": "exact", "sketch_dim": 4}),
    "dst-masked": ("dst", "masked", None),
}
EXACT = [k for k in SCENARIOS if "sketch" not in k]  # equal to one process on the global batch
RESUME = {  # accumulate over the window, resumed mid-window on 2 ranks
    "rigl-acc-resume": ("rigl", "masked", {"accumulate": True}),
    "snfs-resume": ("snfs", "masked", None),  # its moving average spans updates
    "search-acc-resume": ("search", "sparse", {"backend": "exact", "accumulate": True}),
    "search-sketch-acc-resume": ("search", "masked",
                                 {"backend": "exact", "sketch_dim": 6, "accumulate": True}),
}


def mlp():
    return nn.Sequential(nn.Linear(IN, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, OUT)).double()


def build(method, storage, grow_kwargs, seed=0):
    torch.manual_seed(0)
    model = mlp()
    if method == "dst":
        sp = sg.build_dst(model, alpha=1e-2)
    else:
        sp = sg.Sparsifier(model, 0.3, method=method, storage=storage, grow_kwargs=grow_kwargs,
                           schedule=sg.UpdateSchedule(every=3, end=100, fraction=0.3), seed=seed)
    return model, sp


def global_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(GLOBAL_BATCH, IN, generator=g, dtype=torch.float64),
            torch.randint(0, OUT, (GLOBAL_BATCH,), generator=g))


def run(name, spec, world=1, rank=0, steps=12, micro=1, resume_at=None, perturb=None):
    """Train `steps` steps; returns the masks after every update, {fqn: (nnz,)} per update.

    world > 1: inside an initialised process group, with DistributedDataParallel, this rank's
    share of the global batch. micro: micro-batches per step (gradient accumulation).
    resume_at: rebuild everything from a checkpoint taken after that step (rank 0's, as the CLI).
    perturb: "generator" shifts rank 1's generator; "seed" builds rank 1 with another seed.
    """
    method, storage, grow_kwargs = spec
    seed = 1 if perturb == "seed" and rank == 1 else 0

    def make():
        model, sp = build(method, storage, grow_kwargs, seed)
        net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sp.attach(opt)
        return model, net, sp, opt

    model, net, sp, opt = make()
    if perturb == "generator" and rank == 1:
        sp.generator.manual_seed(12345)
    history = []
    for step in range(steps):
        x, y = global_batch(step)
        share = GLOBAL_BATCH // world
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        opt.zero_grad()
        for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
            loss = F.cross_entropy(net(xm), ym) / micro
            if hasattr(sp, "loss"):
                loss = loss + sp.loss()
            loss.backward()
        opt.step()
        if sp.step() is not None or method == "dst":
            history.append({k: v.clone() for k, v in sp.masks().items()})
        if resume_at is not None and step + 1 == resume_at:
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()}
            buf = io.BytesIO()
            torch.save(state, buf)
            blob = [buf.getvalue()]
            if world > 1:
                dist.broadcast_object_list(blob, src=0)  # every rank resumes from rank 0's file
            state = torch.load(io.BytesIO(blob[0]), weights_only=False)
            model, net, sp, opt = make()
            model.load_state_dict(state["model"])
            sp.load_state_dict(state["sp"])
            opt.load_state_dict(state["opt"])
    return history


def _worker(rank, world, init, out_dir):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    try:
        for name, spec in SCENARIOS.items():
            results[name] = run(name, spec, world, rank)
        for name, spec in RESUME.items():
            results[name] = run(name, spec, world, rank, resume_at=5)
            results[name + "-plain"] = run(name, spec, world, rank)
        for perturb in ("generator", "seed"):
            try:
                run("set-masked", SCENARIOS["set-masked"], world, rank, perturb=perturb)
                results["perturb-" + perturb] = "no error"
            except TopologyMismatch as e:
                results["perturb-" + perturb] = str(e)
                # the other rank raised too (both see the all-reduced hashes): regroup
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks():
    """Every scenario on 2 gloo processes: {rank: {scenario: masks after each update}}."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, f"tcp://127.0.0.1:{_free_port()}", d), nprocs=2, join=True)
        return {r: torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in (0, 1)}


def assert_same_masks(a, b):
    assert len(a) == len(b) and len(a) > 0
    for ma, mb in zip(a, b):
        assert ma.keys() == mb.keys()
        for k in ma:
            assert torch.equal(ma[k], mb[k]), k


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ranks_hold_identical_masks_after_every_update(two_ranks, name):
    r0, r1 = two_ranks[0][name], two_ranks[1][name]
    assert len(r0) >= 4  # 4 updates (or, for dst, a mask per step)
    assert_same_masks(r0, r1)
    assert any(not torch.equal(r0[0][k], r0[-1][k]) for k in r0[0]), "the topology never moved"


@pytest.mark.parametrize("name", EXACT)
def test_two_ranks_pick_what_one_process_picks_on_the_global_batch(two_ranks, name):
    assert_same_masks(two_ranks[0][name], run(name, SCENARIOS[name]))


def test_sketched_signal_differs_from_one_process_but_ranks_agree(two_ranks):
    """Each rank hashes its rows with its own generator (independent, so the summed sketch stays an
    unbiased estimate of the global gradient, see test_search.test_sketch_is_unbiased); the draw is
    not the one a single process makes, so masks agree across ranks, not with one process."""
    two = two_ranks[0]["search-sketch-masked"]
    one = run("search-sketch-masked", SCENARIOS["search-sketch-masked"])
    assert_same_masks(two, two_ranks[1]["search-sketch-masked"])
    assert any(not torch.equal(a[k], b[k]) for a, b in zip(two, one) for k in a)


@pytest.mark.parametrize("name", list(RESUME))
def test_resume_mid_window_on_two_ranks_equals_uninterrupted(two_ranks, name):
    for r in (0, 1):
        assert_same_masks(two_ranks[r][name], two_ranks[r][name + "-plain"])


@pytest.mark.parametrize("perturb", ["generator", "seed"])
def test_divergence_is_caught_naming_the_layer(two_ranks, perturb):
    for r in (0, 1):
        msg = two_ranks[r]["perturb-" + perturb]
        assert "ranks hold different topologies" in msg and ".weight" in msg, msg
    when = "after the update at step 3" if perturb == "generator" else "at construction"
    assert when in two_ranks[0]["perturb-" + perturb]


# ---------------------------------------------------------------------------------------------
# one process: gradient accumulation and resume mid-window


@pytest.mark.parametrize("name, spec", [
    ("rigl", ("rigl", "masked", None)),
    ("search", ("search", "masked", {"backend": "exact"})),
    ("search-sparse", ("search", "sparse", {"backend": "exact"})),
    ("rigl-acc", ("rigl", "masked", {"accumulate": True})),
])
def test_gradient_accumulation_equals_one_big_batch(name, spec):
    """k micro-batches of a step add up: the same connections as one batch k times as large
    (before the signal component, RigL read the last micro-batch only)."""
    assert_same_masks(run(name, spec, micro=4), run(name, spec, micro=1))


@pytest.mark.parametrize("name, spec", list(RESUME.items()) + [
    ("search-raw-acc", ("search", "masked", {"backend": "exact", "accumulate": True}))])
def test_resume_mid_window_equals_uninterrupted(name, spec):
    plain = run(name, spec)
    resumed = run(name, spec, resume_at=5)  # steps 4, 5 of the 4..6 window: a partial sum
    assert_same_masks(resumed, plain)


def test_topology_hash_tells_sets_apart():
    a = torch.tensor([1, 5, 9, 100])
    assert topology_hash(a) == topology_hash(a.clone())
    for b in ([1, 5, 9, 101], [1, 5, 9], [0, 5, 9, 100], [1, 5, 10, 100]):
        assert topology_hash(torch.tensor(b)) != topology_hash(a)


def test_fsdp_and_replacing_storage_under_ddp_are_refused():
    from torch.nn.parallel import DistributedDataParallel

    class FakeDDP(DistributedDataParallel):  # an instance without a process group
        def __init__(self, module):
            nn.Module.__init__(self)
            self.module = module

    with pytest.raises(ValueError, match="build the Sparsifier on the plain model"):
        sg.Sparsifier(FakeDDP(mlp()), 0.3, method="set", storage="sparse",
                      schedule=sg.UpdateSchedule(every=3, end=10))
    from torch.distributed.fsdp import FullyShardedDataParallel

    class FakeFSDP(FullyShardedDataParallel):
        def __init__(self, module):
            nn.Module.__init__(self)
            self.inner = module

    with pytest.raises(ValueError, match="FSDP.*DistributedDataParallel"):
        sg.Sparsifier(FakeFSDP(mlp()), 0.3, method="set",
                      schedule=sg.UpdateSchedule(every=3, end=10))
