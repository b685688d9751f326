"""int32 CSR indices (issue 13): a layer whose dimensions and nnz fit in int32 stores crow, col,
ccol, row_t and perm as int32; one forced to int64 computes bit-identical results; flat indices
(row * n_cols + col) stay int64 at 1,000,000-wide shapes; int64 checkpoints still load."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsegrow
from sparsegrow.layers import kernels
from sparsegrow.layers import sparse_linear as sl
from sparsegrow.layers.sparse_conv import SparseConv2d
from sparsegrow.topology import sample_inactive
from test_sparse_linear import backend, backends  # noqa: F401 -- `backend` is a pytest fixture

try:
    import sparsegrow.search_grow  # noqa: F401  (registers grow "search" where it exists)
    HAS_SEARCH = True
except ImportError:
    HAS_SEARCH = False

EMPTY = torch.empty(0, dtype=torch.long)
INDEX_BUFFERS = ("crow", "col", "ccol", "row_t", "perm")
W = 1_000_000


def random_active(n_rows, n_cols, nnz, seed=0):
    return sample_inactive(n_rows * n_cols, EMPTY, nnz, torch.Generator().manual_seed(seed))


def index_dtypes(layer) -> set:
    return {getattr(layer, n).dtype for n in INDEX_BUFFERS}


def pair(make):
    """(int32 layer, int64 layer) built by make(index_dtype) with the same weights."""
    a, b = make(None), make(torch.int64)
    assert index_dtypes(a) == {torch.int32} and index_dtypes(b) == {torch.int64}
    assert a.index_dtype() == torch.int32 and b.index_dtype() == torch.int64
    assert torch.equal(a.values, b.values) and torch.equal(a.active(), b.active())
    return a, b


def grads(layer, x, g):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(g)
    return y.detach(), x.grad, layer.values.grad


def test_index_dtype_rule():
    big = 2 ** 31
    assert sl.index_dtype(W, W, 10) == torch.int32
    assert sl.index_dtype(W, W, big - 1) == torch.int32
    assert sl.index_dtype(W, W, big) == torch.int64  # nnz (crow[-1], perm) needs int64
    assert sl.index_dtype(big, 5, 10) == torch.int64  # row indices
    assert sl.index_dtype(5, big, 10) == torch.int64  # column indices
    assert sl.index_dtype(big - 1, big - 1, 10) == torch.int32
    with pytest.raises(ValueError, match="index_dtype"):
        sl.SparseLinear(4, 3, torch.tensor([1, 5]), index_dtype=torch.int16)


@pytest.mark.parametrize("backend", backends(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_int32_matches_int64_bitwise(backend, dtype):
    active = random_active(37, 53, 300)

    def make(it):
        return sl.SparseLinear(53, 37, active, generator=torch.Generator().manual_seed(1),
                               dtype=dtype, index_dtype=it)

    a, b = pair(make)
    x, g = torch.randn(9, 53, dtype=dtype), torch.randn(9, 37, dtype=dtype)
    for ta, tb in zip(grads(a, x, g), grads(b, x, g)):
        assert torch.equal(ta, tb)


@pytest.mark.parametrize("backend", backends(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_int32_matches_int64_bitwise(backend, dtype):
    active = random_active(6, 4 * 3 * 3, 80)

    def make(it):
        return SparseConv2d(4, 6, 3, active, padding=1, stride=(1, 2), dtype=dtype,
                            generator=torch.Generator().manual_seed(1), index_dtype=it)

    a, b = pair(make)
    x, g = torch.randn(3, 4, 7, 8, dtype=dtype), torch.randn(3, 6, 7, 4, dtype=dtype)
    for ta, tb in zip(grads(a, x, g), grads(b, x, g)):
        assert torch.equal(ta, tb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_c_kernel_and_torch_fallback_agree_on_int32(dtype):
    if kernels._c_lib() is None:
        pytest.skip("no C compiler: only the torch fallback exists")
    layer = sl.SparseLinear(53, 37, random_active(37, 53, 300), dtype=dtype)
    ptr, idx, val = layer.crow, layer.col, layer.values.detach()
    assert ptr.dtype == idx.dtype == torch.int32
    xt, a = torch.randn(53, 9, dtype=dtype), torch.randn(37, 9, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    old = kernels.get_backend()
    try:
        out = {}
        for name in ("c", "torch", "reference"):
            kernels.set_backend(name)
            out[name] = (kernels.spmm(ptr, idx, val, xt, 37), kernels.sddmm(ptr, idx, a, xt),
                         kernels.spmm(layer.ccol, layer.row_t, val[layer.perm], a, 53))
    finally:
        kernels.set_backend(old)
    for name in ("torch", "reference"):
        for got, ref in zip(out["c"], out[name]):
            torch.testing.assert_close(got, ref, **tol)
    # and the C kernel on the same pattern in int64 is the same computation, bit for bit
    kernels.set_backend("c")
    try:
        assert torch.equal(out["c"][0], kernels.spmm(ptr.long(), idx.long(), val, xt, 37))
        assert torch.equal(out["c"][1], kernels.sddmm(ptr.long(), idx.long(), a, xt))
    finally:
        kernels.set_backend(old)


# ---------------------------------------------------------------------------------------------
# training: the Sparsifier drives int32 and int64 layers to the same masks and weights


def _train(method: str, index_dtype, monkeypatch, search_backend: str = "exact"
           ) -> tuple[dict, dict]:
    monkeypatch.setattr(sl, "_FORCE_INDEX_DTYPE", index_dtype)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 5 * 5, 40), nn.ReLU(), nn.Linear(40, 3)).double()
    kwargs = {"grow_kwargs": {"backend": search_backend}} if method == "search" else {}
    sp = sparsegrow.Sparsifier(model, density=0.3, method=method, storage="sparse", seed=0,
                               schedule=sparsegrow.UpdateSchedule(every=2, end=40,
                                                                  fraction=0.3), **kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sp.attach(opt)
    gen = torch.Generator().manual_seed(1)
    n_updates = 0
    for _ in range(10):
        x = torch.randn(8, 2, 5, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        n_updates += sp.step() is not None
    assert n_updates == 5
    layers = sl.sparse_layers(model)
    assert len(layers) == 3
    want = index_dtype or torch.int32
    assert all(index_dtypes(m) == {want} for m in layers.values())
    state = {k: v.clone() for k, v in model.state_dict().items()
             if not any(k.endswith("." + n) for n in INDEX_BUFFERS)}
    return {k: v.clone() for k, v in sp.masks().items()}, state


SEARCH_BACKENDS = ["exact", "auto", "lowrank", "sample-norm", "sample-wedge", "sample-diamond"]


@pytest.mark.parametrize("method", ["set"] + ([f"search:{b}" for b in SEARCH_BACKENDS]
                                              if HAS_SEARCH else []))
def test_training_run_is_identical_with_int32_and_int64(method, monkeypatch):
    method, _, backend = method.partition(":")  # search grown by each backend (issue 13)
    m32, s32 = _train(method, None, monkeypatch, backend or "exact")
    m64, s64 = _train(method, torch.int64, monkeypatch, backend or "exact")
    assert m32.keys() == m64.keys()
    for k in m32:
        assert m32[k].dtype == torch.int64 and torch.equal(m32[k], m64[k]), k
    assert s32.keys() == s64.keys()
    for k in s32:
        assert torch.equal(s32[k], s64[k]), k


# ---------------------------------------------------------------------------------------------
# 1,000,000 x 1,000,000: int32 buffers, int64 flat indices


def test_million_wide_flat_indices_do_not_overflow():
    last = (W - 1) * W + (W - 1)  # row 999999, col 999999: > 2^39
    active = torch.tensor([3, 5 * W + 7, 123_456 * W + 999_998, last])
    layer = sl.SparseLinear(W, W, active, bias=False, dtype=torch.float64)
    assert index_dtypes(layer) == {torch.int32}
    a = layer.active()
    assert a.dtype == torch.int64 and torch.equal(a, active)
    assert int(a[-1]) == 999_999 * 1_000_000 + 999_999
    assert int(layer.col[-1]) == W - 1 and int(layer.rows()[-1]) == W - 1
    # the transposed view: column-major order of the same connections
    t = layer.col[layer.perm].long() * W + layer.row_t.long()
    assert torch.equal(torch.sort(t).values, t)
    # a product through the layer: one-hot input at column 999999 reads connection `last`
    x = torch.zeros(1, W, dtype=torch.float64)
    x[0, W - 1] = 1.0
    x[0, 7] = 2.0
    y = layer(x)
    v = layer.values.detach()
    assert float(y[0, W - 1]) == float(v[3]) and float(y[0, 5]) == 2.0 * float(v[1])
    # an update far out in the flat index space keeps every flat index exact
    p = sl.SparseLinearParam("w", layer)
    grow = torch.tensor([(W - 2) * W + 999_999])
    p.update(active[1:2], grow, torch.ones(1))
    want = torch.sort(torch.cat([active[[0, 2, 3]], grow])).values
    assert torch.equal(p.active(), want) and index_dtypes(layer) == {torch.int32}
    # random growth samples int64 flat indices over the whole 10^12 space
    g = sample_inactive(W * W, p.active(), 5, torch.Generator().manual_seed(0))
    assert g.dtype == torch.int64 and int(g.max()) < W * W
    # the dense shape is never materialised; on the meta device the layer's dense twin exists
    with torch.device("meta"):
        lin = nn.Linear(W, W, bias=False)
    sp = sl.SparseLinear.from_dense(lin, active)
    assert torch.equal(sp.active(), active) and sp.index_dtype() == torch.int32


def test_index_dtype_is_rechosen_when_nnz_crosses_the_limit(monkeypatch):
    """nnz past int32 (2^31) is impractical to test: lower the limit to 12 for a 4 x 5 layer."""
    monkeypatch.setattr(sl, "_INT32_MAX", 12)
    layer = sl.SparseLinear(5, 4, torch.arange(0, 20, 2), dtype=torch.float64)  # nnz 10
    assert index_dtypes(layer) == {torch.int32}
    p = sl.SparseLinearParam("w", layer)
    x = torch.randn(3, 5, dtype=torch.float64)
    w_dense = layer.to_dense_linear()
    p.update(EMPTY, torch.tensor([1, 3, 5, 7, 9]), torch.zeros(5))  # nnz 15 > 12
    assert index_dtypes(layer) == {torch.int64} and layer.nnz() == 15
    torch.testing.assert_close(layer(x), w_dense(x))  # grown at 0: the same weight
    p.update(torch.tensor([1, 3, 5, 7, 9]), EMPTY, torch.zeros(0))  # back to 10
    assert index_dtypes(layer) == {torch.int32}
    torch.testing.assert_close(layer(x), w_dense(x))  # grown at 0: the same weight
    with pytest.raises(ValueError, match="cannot hold"):
        sl.SparseLinear(5, 4, torch.arange(15), index_dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# checkpoints and export


def test_int64_checkpoint_loads_into_int32_layer_and_back():
    active = random_active(12, 20, 50)
    old = sl.SparseLinear(20, 12, active, index_dtype=torch.int64,
                          generator=torch.Generator().manual_seed(3))
    sd = copy.deepcopy(old.state_dict())  # what older runs saved: int64 crow and col
    assert sd["crow"].dtype == sd["col"].dtype == torch.int64
    assert "row_t" not in sd and "perm" not in sd and "ccol" not in sd
    new = sl.SparseLinear(20, 12, random_active(12, 20, 30, seed=1))  # another nnz, int32
    new.load_state_dict(sd)
    assert index_dtypes(new) == {torch.int32}
    assert torch.equal(new.active(), active) and torch.equal(new.values, old.values)
    x = torch.randn(4, 20)
    assert torch.equal(new(x), old(x))
    sd32 = new.state_dict()
    assert sd32["crow"].dtype == sd32["col"].dtype == torch.int32
    back = sl.SparseLinear(20, 12, active, index_dtype=torch.int64)
    back.load_state_dict(sd32)
    assert index_dtypes(back) == {torch.int64} and torch.equal(back(x), old(x))


def test_int64_checkpoint_is_validated_before_the_cast():
    """An int64 column index of 2^32 + 1 would wrap to 1 in int32: it must be refused."""
    layer = sl.SparseLinear(20, 12, random_active(12, 20, 50), index_dtype=torch.int64)
    sd = copy.deepcopy(layer.state_dict())
    sd["col"][0] = (1 << 32) + 1
    with pytest.raises(ValueError, match="checkpoint CSR is invalid.*out of range"):
        sl.SparseLinear(20, 12, random_active(12, 20, 50)).load_state_dict(sd)


def test_export_round_trip_with_int32_layers(tmp_path):
    model = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 5))
    sparsegrow.sparsify(model, 0.2, method="static", storage="sparse")
    assert all(m.index_dtype() == torch.int32 for m in sl.sparse_layers(model).values())
    sparsegrow.export_sparse(model, tmp_path / "m.safetensors")
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 5))
    loaded = sparsegrow.load_sparse(tmp_path / "m.safetensors", skeleton)
    for name, m in sl.sparse_layers(loaded).items():
        ref = model.get_submodule(name)
        assert m.index_dtype() == torch.int32
        assert torch.equal(m.active(), ref.active()) and torch.equal(m.values, ref.values)
    x = torch.randn(3, 30)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_csc_grads_one_pass_equals_the_two_kernels(dtype, monkeypatch):
    """SparseLinear's backward computes dW and dX in one pass over the weight's columns
    (sg_cscgrad) when the layer has >= 64 columns per thread: the same numbers, bit for bit, as
    the SDDMM and the transposed SpMM, with int32 and int64 indices."""
    if kernels._c_lib() is None:
        pytest.skip("no C compiler: only the torch fallback exists")
    torch.set_num_threads(2)
    layer = sl.SparseLinear(300, 170, random_active(170, 300, 4000), dtype=dtype)
    val = layer.values.detach()
    xt, dyt = torch.randn(300, 11, dtype=dtype), torch.randn(170, 11, dtype=dtype)
    called = []
    c_fn = kernels._c_fn
    monkeypatch.setattr(kernels, "_c_fn", lambda op, *a: called.append(op) or c_fn(op, *a))
    old = kernels.get_backend()
    kernels.set_backend("c")
    try:
        apart = (kernels.spmm(layer.ccol, layer.row_t, val[layer.perm], dyt, 300),
                 kernels.sddmm(layer.crow, layer.col, dyt, xt))
        for cast in (lambda t: t, lambda t: t.long()):
            called.clear()
            dxt, dv = kernels.csc_grads(*(cast(t) for t in (layer.crow, layer.col, layer.ccol,
                                                            layer.row_t, layer.perm)), val, dyt, xt)
            assert called == ["cscgrad"]
            assert torch.equal(dxt, apart[0]) and torch.equal(dv, apart[1])
    finally:
        kernels.set_backend(old)
