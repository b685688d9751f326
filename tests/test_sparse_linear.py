"""Truly sparse Linear: kernels against the oracle, gradients, agreement with MaskedParam,
topology invariants under every criterion, optimizer-state re-indexing, no dense allocation."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sparsegrow
from sparsegrow.drop import DROP

try:
    import sparsegrow.search_grow  # noqa: F401  (registers grow "search" where it exists)
except ImportError:
    pass
from sparsegrow.grow import GROW, GrowContext
from sparsegrow.layers import kernels
from sparsegrow.layers import sparse_linear as sl
from sparsegrow.topology import MaskedParam, sample_inactive

EMPTY = torch.empty(0, dtype=torch.long)


def random_active(n_out, n_in, nnz, seed=0):
    return sample_inactive(n_out * n_in, EMPTY, nnz, torch.Generator().manual_seed(seed))


def random_csr(n_rows, n_cols, nnz, seed=0, dtype=torch.float64):
    layer = sl.SparseLinear(n_cols, n_rows, random_active(n_rows, n_cols, nnz, seed),
                            generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return layer


def backends():
    names = ["torch", "reference"]
    if kernels._c_lib() is not None:
        names.append("c")
    return names


@pytest.fixture
def backend(request):
    old = kernels.get_backend()
    kernels.set_backend(request.param)
    yield request.param
    kernels.set_backend(old)


def assert_valid_csr(layer: sl.SparseLinear, nnz: int | None = None):
    n, m = layer.out_features, layer.in_features
    crow, col = layer.crow, layer.col
    assert crow.numel() == n + 1 and int(crow[0]) == 0 and int(crow[-1]) == layer.nnz()
    assert bool((crow[1:] >= crow[:-1]).all())
    assert col.numel() == layer.nnz() and layer.values.shape == (layer.nnz(),)
    if col.numel():
        assert int(col.min()) >= 0 and int(col.max()) < m
    active = layer.active()
    assert bool((active[1:] > active[:-1]).all()), "active set not sorted / has duplicates"
    # the transposed view lists the same connections in column-major order
    t_active = layer.col[layer.perm].long() * n + layer.row_t  # flat indices: int64
    assert bool((t_active[1:] > t_active[:-1]).all())
    assert torch.equal(kernels.rows_of(layer.ccol), layer.col[layer.perm])
    if nnz is not None:
        assert layer.nnz() == nnz


# ---------------------------------------------------------------------------------------------
# kernels and gradients


@pytest.mark.parametrize("backend", backends(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_match_reference(backend, dtype):
    layer = random_csr(37, 53, 300, dtype=dtype)  # ~85% of rows non-empty: empty rows included
    xt = torch.randn(53, 9, dtype=dtype)
    a = torch.randn(37, 9, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    args = (layer.crow, layer.col, layer.values.detach())
    torch.testing.assert_close(kernels.spmm(*args, xt, 37), kernels.spmm_reference(*args, xt, 37), **tol)
    torch.testing.assert_close(kernels.sddmm(layer.crow, layer.col, a, xt),
                               kernels.sddmm_reference(layer.crow, layer.col, a, xt), **tol)
    dense = layer.to_dense_linear().weight.detach()
    torch.testing.assert_close(kernels.spmm(*args, xt, 37), dense @ xt, **tol)


@pytest.mark.parametrize("backend", backends(), indirect=True)
def test_gradcheck(backend):
    layer = random_csr(6, 8, 20, dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    fn = lambda x, v, b: sl._SparseLinearFn.apply(  # noqa: E731
        x, v, layer.crow, layer.col, layer.ccol, layer.row_t, layer.perm) + b
    assert torch.autograd.gradcheck(fn, (x, layer.values, layer.bias))
    x3 = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)  # leading dims
    assert torch.autograd.gradcheck(layer, (x3,))


def test_forward_backward_match_dense():
    torch.manual_seed(0)
    lin = nn.Linear(40, 24).double()
    active = random_active(24, 40, 200)
    sp = sl.SparseLinear.from_dense(lin, active)
    masked = copy.deepcopy(lin)
    MaskedParam("weight", masked, "weight", active)
    x = torch.randn(11, 40, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ys, ym = sp(x), masked(x2)
    torch.testing.assert_close(ys, ym)
    g = torch.randn_like(ys)
    ys.backward(g)
    ym.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(sp.values.grad, masked.weight.grad.view(-1)[active])
    torch.testing.assert_close(sp.bias.grad, masked.bias.grad)


# ---------------------------------------------------------------------------------------------
# agreement with the masked reference, including optimizer steps and topology updates

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-1),
}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 20), nn.ReLU(),
                         nn.Linear(20, 5)).double()


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("method", ["static", "set"])
def test_sparsifier_agrees_with_masked(opt, method):
    """Same seed -> same initial topology, same drops and grows, same weights and moments."""
    runs = {}
    for storage in ("masked", "sparse"):
        model = mlp()
        sched = sparsegrow.UpdateSchedule(every=3, end=20, fraction=0.3) if method != "static" else None
        sp = sparsegrow.sparsify(model, 0.2, method=method, schedule=sched, storage=storage,
                                 grow_init="random", seed=1)
        optimizer = OPTIMIZERS[opt](model.parameters())
        sp.attach(optimizer)
        gen = torch.Generator().manual_seed(3)
        outs = []
        for _ in range(12):
            x = torch.randn(16, 30, generator=gen, dtype=torch.float64)
            y = torch.randn(16, 5, generator=gen, dtype=torch.float64)
            loss = (model(x) - y).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sp.step()
            outs.append(loss.item())
        runs[storage] = (model, sp, optimizer, outs)
    (mm, smask, omask, lm), (ms, ssp, osp, ls) = runs["masked"], runs["sparse"]
    assert lm == pytest.approx(ls, rel=1e-9)
    for pm, ps in zip(smask.params, ssp.params):
        assert torch.equal(pm.active(), ps.active())
        torch.testing.assert_close(pm.param.detach().view(-1)[pm.active()], ps.module.values.detach())
        for key, vm in omask.state[pm.param].items():
            if torch.is_tensor(vm) and vm.dim() > 0:
                torch.testing.assert_close(vm.view(-1)[pm.active()], osp.state[ps.param][key])


# ---------------------------------------------------------------------------------------------
# topology invariants under every criterion


def grow_criteria():
    out = []
    for name in GROW.names():
        cls = GROW.get(name)
        spec = cls.needs_signal  # the class's default signal
        if spec is not None and spec.kind == "dense_grad":
            continue  # refused on sparse storage; see test_rigl_refused
        out.append(name)
    return out


@pytest.mark.parametrize("grow", grow_criteria())
@pytest.mark.parametrize("allow_regrow", [True, False])
def test_every_criterion_keeps_density_and_valid_csr(grow, allow_regrow):
    model = mlp().float()
    try:
        sp = sparsegrow.sparsify(model, 0.15, method="set", grow=grow, storage="sparse",
                                 allow_regrow=allow_regrow,
                                 schedule=sparsegrow.UpdateSchedule(every=2, end=30, fraction=0.5,
                                                                    decay="constant"))
    except (ImportError, TypeError) as e:  # criteria with optional dependencies or required args
        pytest.skip(f"grow {grow!r} cannot be built with defaults here: {e}")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sp.attach(optimizer)
    nnz0 = {p.fqn: p.nnz() for p in sp.params}
    n_updates = 0
    for _ in range(10):
        loss = model(torch.randn(8, 30)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        stats = sp.step()
        n_updates += stats is not None
        for p in sp.params:
            assert_valid_csr(p.module, nnz0[p.fqn])
            for v in optimizer.state[p.param].values():
                if torch.is_tensor(v) and v.dim() > 0:
                    assert v.shape == p.param.shape
    assert n_updates == 5
    assert sp.report()["global_density"] == pytest.approx(0.15, abs=1e-3)


def test_search_grow_if_available():
    pytest.importorskip("sparsegrow.search_grow")
    if "search" not in GROW.names():
        pytest.skip("search grow is not registered yet")
    model = mlp().float()
    sp = sparsegrow.sparsify(model, 0.15, method="set", grow="search", storage="sparse",
                             schedule=sparsegrow.UpdateSchedule(every=2, end=30))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp.attach(optimizer)
    nnz0 = {p.fqn: p.nnz() for p in sp.params}
    for _ in range(6):
        loss = model(torch.randn(8, 30)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sp.step()
        for p in sp.params:
            assert_valid_csr(p.module, nnz0[p.fqn])


# ---------------------------------------------------------------------------------------------
# optimizer state re-indexing and checkpoints


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_optimizer_state_reindex_exact(opt):
    layer = random_csr(10, 12, 40, dtype=torch.float32)
    p = sl.SparseLinearParam("w", layer)
    optimizer = OPTIMIZERS[opt](layer.parameters())
    for _ in range(3):
        layer(torch.randn(4, 12)).square().sum().backward()
        optimizer.step()
    before_active = p.active()
    before = {k: v.clone() for k, v in optimizer.state[layer.values].items() if torch.is_tensor(v)}
    before_vals = layer.values.detach().clone()
    gen = torch.Generator().manual_seed(0)
    drop = before_active[torch.sort(torch.randperm(40, generator=gen)[:7]).values]
    kept_mask = ~torch.isin(before_active, drop)
    grow = sample_inactive(120, before_active, 7, gen)
    init = torch.randn(7)
    param_obj = layer.values
    p.update(drop, grow, init, optimizer)
    assert layer.values is param_obj  # optimizer.state stays keyed by the same Parameter
    after_active = p.active()
    assert_valid_csr(layer, 40)
    assert torch.equal(after_active, torch.sort(torch.cat([before_active[kept_mask], grow])).values)
    pos_kept = torch.searchsorted(after_active, before_active[kept_mask])
    pos_grow = torch.searchsorted(after_active, grow)
    torch.testing.assert_close(layer.values.detach()[pos_kept], before_vals[kept_mask], rtol=0, atol=0)
    torch.testing.assert_close(layer.values.detach()[pos_grow], init, rtol=0, atol=0)
    state = optimizer.state[layer.values]
    for k, v in before.items():
        if v.dim() == 0:
            assert torch.equal(state[k], v)  # Adam's step count is per tensor, untouched
            continue
        assert torch.equal(state[k][pos_kept], v[kept_mask])
        assert bool((state[k][pos_grow] == 0).all())
    # and training goes on with the re-indexed state
    layer(torch.randn(4, 12)).square().sum().backward()
    optimizer.step()


def test_update_rejects_bad_sets():
    layer = random_csr(5, 6, 10, dtype=torch.float32)
    p = sl.SparseLinearParam("w", layer)
    active = p.active()
    inactive = sample_inactive(30, active, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="already active"):
        p.update(active[:1], active[1:2], torch.zeros(1))
    with pytest.raises(ValueError, match="not active"):
        p.update(inactive[:1], inactive[1:], torch.zeros(1))
    with pytest.raises(ValueError, match="sorted"):
        p.update(active[:2], inactive.flip(0), torch.zeros(2))
    assert torch.equal(p.active(), active)


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_checkpoint_round_trip(opt):
    def build(seed):
        model = mlp().float()
        sp = sparsegrow.sparsify(model, 0.2, method="set", storage="sparse", seed=seed,
                                 schedule=sparsegrow.UpdateSchedule(every=2, end=30))
        optimizer = OPTIMIZERS[opt](model.parameters())
        sp.attach(optimizer)
        return model, sp, optimizer

    def train(model, sp, optimizer, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            loss = model(torch.randn(8, 30, generator=gen)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sp.step()

    model, sp, optimizer = build(0)
    train(model, sp, optimizer, 5, 1)
    ckpt = copy.deepcopy({"model": model.state_dict(), "sp": sp.state_dict(),
                          "opt": optimizer.state_dict()})
    model2, sp2, optimizer2 = build(7)  # a different topology to load into
    model2.load_state_dict(ckpt["model"])
    sp2.load_state_dict(ckpt["sp"])
    optimizer2.load_state_dict(ckpt["opt"])
    x = torch.randn(4, 30)
    assert torch.equal(model(x), model2(x))
    train(model, sp, optimizer, 4, 2)
    train(model2, sp2, optimizer2, 4, 2)
    assert torch.equal(model(x), model2(x))
    for a, b in zip(sp.params, sp2.params):
        assert torch.equal(a.active(), b.active())


def test_export_to_masked_and_back():
    model = mlp()
    sp = sparsegrow.sparsify(model, 0.2, method="static", storage="sparse")
    x = torch.randn(9, 30, dtype=torch.float64)
    y_sparse = model(x)
    active = {p.fqn: p.active() for p in sp.params}
    masked = sl.to_masked(model)
    assert not sl.sparse_layers(model)
    torch.testing.assert_close(model(x), y_sparse, rtol=1e-12, atol=1e-12)
    for fqn, mp in masked.items():
        assert torch.equal(mp.active(), active[fqn])
    back = sl.to_sparse(model, masked)
    assert torch.equal(model(x), y_sparse)  # bit-identical after the round trip
    assert {f: p.active() for f, p in back.items()}.keys() == active.keys()


# ---------------------------------------------------------------------------------------------
# no dense N x M tensor, ever


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor (in bytes) any op creates or returns, factories included."""

    def __init__(self):
        super().__init__()
        self.max_bytes, self.max_op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.max_bytes:
                self.max_bytes, self.max_op = t.numel() * t.element_size(), str(func)
        return out


def every_stage(layer, x: torch.Tensor, gen: torch.Generator) -> None:
    """Forward, backward, Adam step, magnitude drop + random grow of 1000, checkpoint round
    trip and evaluation of a truly sparse layer (SparseLinear or SparseConv2d)."""
    p = sl.SparseLinearParam("w", layer)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
    layer(x).square().sum().backward()
    optimizer.step()
    a = p.active()
    drop = a[DROP.get("magnitude")().select(p.values(a), 1000, gen)]
    kept = a[~torch.isin(a, drop)]
    grow = GROW.get("random")().select(GrowContext(p, kept, 1), 1000, gen)
    p.update(drop, grow, torch.zeros(1000), optimizer)
    layer.load_state_dict(copy.deepcopy(layer.state_dict()))
    with torch.no_grad():
        layer(x)


def test_no_dense_tensor_at_any_stage():
    """A 2^20 x 2^20 layer (4 TiB dense in float32) at ~2^-20 density: construction, forward,
    backward, Adam step, drop + random grow, checkpoint and evaluation stay O(nnz + B * width)."""
    n = m = 1 << 20
    nnz, batch = 1 << 19, 2
    # every tensor must be O(nnz + B * width): at most 8 bytes x 4 x 2^20; N*M is 2^40 elements
    bound = 8 * 4 * max(nnz, batch * max(n, m))
    gen = torch.Generator().manual_seed(0)
    with MaxNumel() as mode:
        active = sample_inactive(n * m, EMPTY, nnz, gen)
        layer = sl.SparseLinear(m, n, active, generator=gen)
        every_stage(layer, torch.randn(batch, m, generator=gen), gen)
    assert_valid_csr(layer, nnz)
    assert mode.max_bytes <= bound, f"{mode.max_op} made a tensor of {mode.max_bytes} bytes"


def test_max_numel_mode_catches_dense():
    """The guard above works: a masked layer of the same kind allocates its N x M weight."""
    with MaxNumel() as mode:
        lin = nn.Linear(300, 200)
        MaskedParam("weight", lin, "weight", random_active(200, 300, 100))
    assert mode.max_bytes >= 200 * 300


# ---------------------------------------------------------------------------------------------
# bad input gives a clear error


def test_min_per_row():
    # row 0 empty
    active = torch.tensor([5 * 4 + 1, 5 * 4 + 2, 9 * 4 + 3])
    sl.SparseLinear(4, 10, active)  # allowed by default
    with pytest.raises(ValueError, match="min_per_row"):
        sl.SparseLinear(4, 10, active, min_per_row=1)
    model = nn.Sequential(nn.Linear(4, 10))
    with pytest.raises(ValueError, match="min_per_row"):
        sl.sparse_storage(min_per_row=1)(model, "0.weight", model[0], "weight", active)
    # an update that would empty a row is refused and changes nothing
    full = torch.arange(0, 40, 4)  # one connection per row
    layer = sl.SparseLinear(4, 10, full, min_per_row=1)
    p = sl.SparseLinearParam("w", layer)
    with pytest.raises(ValueError, match="min_per_row"):
        p.update(full[:1], torch.tensor([5]), torch.zeros(1))
    assert torch.equal(p.active(), full)


def test_rigl_refused_with_clear_error():
    with pytest.raises(ValueError, match="dense gradient.*grow='search'"):
        sparsegrow.sparsify(mlp(), 0.2, method="rigl", storage="sparse",
                            schedule=sparsegrow.UpdateSchedule(every=2, end=10))


def test_dtype_device_and_kind_mismatch():
    layer = random_csr(5, 6, 10, dtype=torch.float32)
    with pytest.raises(ValueError, match="float32.*float64"):
        layer(torch.randn(2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="device|meta"):
        layer(torch.randn(2, 6, device="meta"))
    with pytest.raises(ValueError, match=r"\(\.\.\., 6\)"):
        layer(torch.randn(2, 7))
    conv = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))  # plain Conv2d works: test_sparse_conv
    with pytest.raises(ValueError, match="0.weight.*groups=2"):
        sparsegrow.sparsify(conv, 0.5, method="static", storage="sparse")
    with pytest.raises(ValueError, match="sorted"):
        sl.SparseLinear(6, 5, torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="outside"):
        sl.SparseLinear(6, 5, torch.tensor([1, 30]))


def test_scale_to_active_fan_in_matches_masked_rule():
    lin = nn.Linear(50, 8)
    active = random_active(8, 50, 60)
    sp = sl.SparseLinear.from_dense(lin, active)
    sp.scale_to_active_fan_in()
    mask = torch.zeros(8 * 50, dtype=torch.bool)
    mask[active] = True
    rows = mask.view(8, 50)
    expected = lin.weight.detach() * mask.view(8, 50) * (50 / rows.sum(1).clamp(min=1).float()).sqrt()[:, None]
    torch.testing.assert_close(sp.to_dense_linear().weight.detach(), expected)


def test_searchsorted_sorted_matches_torch():
    gen = torch.Generator().manual_seed(0)
    seq = torch.unique(torch.randint(0, 10_000, (3000,), generator=gen))
    q = torch.sort(torch.randint(-5, 10_005, (1000,), generator=gen)).values
    assert torch.equal(kernels.searchsorted_sorted(seq, q), torch.searchsorted(seq, q))
    assert kernels.searchsorted_sorted(seq, q[:0]).numel() == 0


# ---------------------------------------------------------------------------------------------
# torch.compile: one graph, no recompile across topology updates, same numbers as eager


def test_compiled_model_trains_through_updates_without_recompiling():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    runs = {}
    for mode in ("eager", "compiled"):
        model = mlp()
        sp = sparsegrow.Sparsifier(model, density=0.1, method="set", storage="sparse", seed=0,
                                   schedule=sparsegrow.UpdateSchedule(every=2, end=20))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sp.attach(optimizer)
        # fullgraph: the kernels are custom ops with fake implementations, nothing breaks the graph
        fwd = torch.compile(model, fullgraph=True) if mode == "compiled" else model
        gen = torch.Generator().manual_seed(1)
        losses, graphs, n_updates = [], [], 0
        for _ in range(12):
            x = torch.randn(16, 30, generator=gen, dtype=torch.float64)
            loss = fwd(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            n_updates += sp.step() is not None
            losses.append(loss.item())
            graphs.append(counters["stats"]["unique_graphs"])
        runs[mode] = (model, sp, losses, graphs, n_updates)
    (me, se, le, _, ue), (mc, sc, lc, gc, uc) = runs["eager"], runs["compiled"]
    assert ue == uc == 6
    assert gc == [1] * 12, f"graphs compiled after each step: {gc}"  # no recompile, ever
    assert lc == pytest.approx(le, rel=1e-12)
    for pe, pc in zip(se.params, sc.params):
        assert torch.equal(pe.active(), pc.active())
        torch.testing.assert_close(pe.param, pc.param, rtol=1e-12, atol=1e-12)


def test_update_keeps_storage_and_stale_backward_raises():
    """An update writes indices and values in place: their storage (what compiled and CUDA graphs
    hold) stays, and a backward through a forward taken before the update refuses to run instead
    of mixing the old topology with the new values."""
    layer = random_csr(10, 12, 40, dtype=torch.float32)
    p = sl.SparseLinearParam("w", layer)
    names = ("values", "crow", "col", "ccol", "row_t", "perm")
    ptrs = {n: getattr(layer, n).data_ptr() for n in names}
    y = layer(torch.randn(4, 12, requires_grad=True)).sum()
    a = p.active()
    p.update(a[:5], sample_inactive(120, a, 5, torch.Generator().manual_seed(0)), torch.zeros(5))
    assert {n: getattr(layer, n).data_ptr() for n in ptrs} == ptrs
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


# ---------------------------------------------------------------------------------------------
# bfloat16 / float16: weights, inputs and autocast

# Unit roundoff u: bfloat16 keeps 8 significant bits (u = 2^-8), float16 11 (u = 2^-11). The
# kernels accumulate in float32 and round once, so one layer is within u of float32 on the same
# inputs; through three layers (inputs rounded at each) we allow 2u, norm-wise.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).norm() / ref.norm())


@pytest.mark.parametrize("backend", backends(), indirect=True)
@pytest.mark.parametrize("dtype", list(UNIT_ROUNDOFF))
def test_kernels_take_low_precision(backend, dtype):
    layer = random_csr(37, 53, 300, dtype=torch.float32)
    val = layer.values.detach().to(dtype)
    xt, a = torch.randn(53, 9).to(dtype), torch.randn(37, 9).to(dtype)
    u = UNIT_ROUNDOFF[dtype]
    y = kernels.spmm(layer.crow, layer.col, val, xt, 37)
    ref = kernels.spmm_reference(layer.crow, layer.col, val.float(), xt.float(), 37)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, rtol=u, atol=1e-6)  # one rounding of float32
    s = kernels.sddmm(layer.crow, layer.col, a, xt)
    assert s.dtype == dtype
    ref = kernels.sddmm_reference(layer.crow, layer.col, a.float(), xt.float())
    torch.testing.assert_close(s.float(), ref, rtol=u, atol=1e-6)


@pytest.mark.parametrize("dtype", list(UNIT_ROUNDOFF))
def test_low_precision_weights_match_float32_masked_reference(dtype):
    """A bf16/fp16 SparseLinear on bf16/fp16 input: the float32 masked nn.Linear on the same
    (exactly representable) numbers, rounded once."""
    torch.manual_seed(0)
    lin = nn.Linear(40, 24).to(dtype).float()  # weights representable in `dtype`
    active = random_active(24, 40, 200)
    sp = sl.SparseLinear.from_dense(lin, active).to(dtype)
    masked = copy.deepcopy(lin)
    MaskedParam("weight", masked, "weight", active)
    x = torch.randn(11, 40).to(dtype).requires_grad_()
    x32 = x.detach().float().requires_grad_()
    g = torch.randn(11, 24).to(dtype)
    y, y32 = sp(x), masked(x32)
    assert y.dtype == dtype
    u = UNIT_ROUNDOFF[dtype]
    torch.testing.assert_close(y.float(), y32, rtol=u, atol=1e-5)
    y.backward(g)
    y32.backward(g.float())
    assert x.grad.dtype == sp.values.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float(), x32.grad, rtol=u, atol=1e-5)
    torch.testing.assert_close(sp.values.grad.float(), masked.weight.grad.view(-1)[active],
                               rtol=u, atol=1e-5)
    torch.testing.assert_close(sp.bias.grad.float(), masked.bias.grad, rtol=u, atol=1e-5)


@pytest.mark.parametrize("dtype", list(UNIT_ROUNDOFF))
def test_autocast_matches_float32_masked_reference(dtype):
    """float32 SparseLinear layers under torch.autocast(device, dtype) return `dtype` like
    nn.Linear does, and outputs and gradients stay within 2u of the float32 model. (Tanh, not
    ReLU: a pre-activation within rounding of 0 flips ReLU's mask, an O(1) change per flip.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 20), nn.Tanh(),
                          nn.Linear(20, 5))
    sparsegrow.sparsify(model, 0.3, method="static", storage="sparse")
    ref = copy.deepcopy(model)
    sl.to_masked(ref)
    x, g = torch.randn(64, 30), torch.randn(64, 5)
    y_ref = ref(x)
    y_ref.backward(g)
    with torch.autocast(x.device.type, dtype=dtype):
        y = model(x)
        assert model[0](x).dtype == ref[0](x).dtype == dtype  # what nn.Linear returns
    assert y.dtype == dtype
    y.float().backward(g)
    tol = 2 * UNIT_ROUNDOFF[dtype]
    assert rel_err(y, y_ref) <= tol
    for name, layer in sl.sparse_layers(model).items():
        dense = ref.get_submodule(name)
        assert layer.values.grad.dtype == torch.float32
        assert rel_err(layer.values.grad, dense.weight.grad.view(-1)[layer.active()]) <= tol, name
        assert rel_err(layer.bias.grad, dense.bias.grad) <= tol, name


def test_evaluation_batch_keeps_wide_activations_bounded():
    # 1000 examples through a 2^20-wide layer are a 4 GiB activation (the 10⁶ config's evaluation
    # peaked at 21 GB): the batch shrinks to fit 512 MiB, never below the training batch
    from sparsegrow.experiments.loop import eval_batch_size
    wide = sl.SparseLinear(30, 1 << 20, torch.tensor([0, 5, 99]))
    assert eval_batch_size(nn.Sequential(wide), 64) == 128
    assert eval_batch_size(nn.Sequential(wide), 256) == 256
    assert eval_batch_size(nn.Sequential(nn.Linear(784, 300), nn.Linear(300, 10)), 128) == 1000


def test_evaluation_builds_no_autograd_graph():
    # evaluating under autograd saved every layer's input for a backward that never comes (at 10⁶
    # units, 512 MiB per activation of each batch); the test-set pass runs without a graph
    from types import SimpleNamespace

    from sparsegrow.experiments.loop import evaluate
    seen = []
    layer = sl.SparseLinear(6, 3, torch.tensor([0, 4, 7, 11, 17]))
    layer.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    xs, ys = torch.randn(10, 6), torch.randint(0, 3, (10,))
    data = SimpleNamespace(test_batches=lambda b: [(xs[k:k + b], ys[k:k + b]) for k in range(0, 10, b)])
    loss, acc = evaluate(nn.Sequential(layer), data, 4, torch.device("cpu"))
    assert seen and not any(seen)
    with torch.no_grad():
        out = layer(xs)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(out, ys).item(), rel=1e-6)
    assert acc == (out.argmax(1) == ys).float().mean().item()


@pytest.mark.parametrize("backend", backends(), indirect=True)
@pytest.mark.parametrize("shape, nnz", [((7, 5), 0), ((7, 5), 35), ((50, 300), 900), ((300, 40), 5000)])
def test_csc_order_is_the_stable_column_sort(backend, shape, nnz):
    # the CSC view's perm: a counting sort on CPU with the C kernels, the stable sort elsewhere;
    # both must give the column-major order with rows ascending within a column
    n, m = shape
    gen = torch.Generator().manual_seed(nnz)
    active = torch.randperm(n * m, generator=gen)[:nnz].sort().values
    col = active % m
    ccol, perm = kernels.csc_order(col, m)
    assert torch.equal(ccol, torch.cat([torch.zeros(1, dtype=torch.long),
                                        torch.bincount(col, minlength=m).cumsum(0)]))
    assert torch.equal(perm, torch.sort(col, stable=True).indices)
    rows = active // m
    key = col[perm] * n + rows[perm]  # column-major, rows ascending: strictly increasing
    assert bool((key[1:] > key[:-1]).all())


@pytest.mark.parametrize("backend", backends(), indirect=True)
def test_csc_order_refuses_columns_out_of_range(backend):
    assert torch.equal(kernels.csc_order(torch.tensor([0, 2, 1, 2]), 3)[1], torch.tensor([0, 2, 1, 3]))
    for bad in ([0, 3, 1, 2], [0, -1, 1, 2]):
        with pytest.raises(ValueError, match="outside"):
            kernels.csc_order(torch.tensor(bad), 3)
