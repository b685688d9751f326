"""Truly sparse Conv2d: gradients and agreement with a masked nn.Conv2d over every geometry, no
dense weight-sized tensor, optimizer-state re-indexing, every grow criterion (search reading conv
rows), clear errors, conversion both ways, checkpoints and the training loop (export: a
(ConvNet, "sparse") case in test_export.py)."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import sparsegrow
from sparsegrow.layers import sparse_linear as sl
from sparsegrow.layers.sparse_conv import SparseConv2d
from sparsegrow.signals import LayerSignal
from sparsegrow.topology import MaskedParam, sample_inactive

from test_sparse_linear import EMPTY, OPTIMIZERS, MaxNumel, every_stage, grow_criteria


def random_active(numel, nnz, seed=0):
    return sample_inactive(numel, EMPTY, nnz, torch.Generator().manual_seed(seed))


def assert_valid(layer: SparseConv2d, nnz: int) -> None:
    n, m = layer.n_rows, layer.n_cols
    assert layer.crow.numel() == n + 1 and int(layer.crow[-1]) == nnz == layer.values.numel()
    active = layer.active()
    assert bool((active[1:] > active[:-1]).all()) and int(active[-1]) < n * m
    assert torch.equal(layer.col[layer.perm].long() * n + layer.row_t,
                       torch.sort(layer.col.long() * n + layer.rows()).values)


class ConvNet(nn.Module):
    """conv-BN-ReLU, strided conv, 1x1 conv, then a linear classifier; x (B, 2, 8, 8)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False)
        self.mix = nn.Conv2d(8, 8, 1)
        self.classifier = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.down(x))
        return self.classifier(F.relu(self.mix(x)).flatten(1))


# ---------------------------------------------------------------------------------------------
# gradients and agreement with a masked nn.Conv2d, every geometry offered

GEOMETRIES = [(s, p, d) for s, p, d in itertools.product(
    [1, 2, (2, 1)], [0, 1, (1, 2), "valid", "same"], [1, 2, (1, 2)])
    if not (p == "same" and s != 1)]


@pytest.mark.parametrize("stride,padding,dilation", GEOMETRIES)
def test_matches_masked_conv_and_gradcheck(stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, dilation=dilation).double()
    active = random_active(3 * 2 * 9, 20)
    MaskedParam("weight", conv, "weight", active)  # zeros off the active set
    layer = SparseConv2d.from_dense(conv, active)
    assert layer.shape == conv.weight.shape
    x = torch.randn(2, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    y_ref, y = conv(x), layer(x)
    assert y.shape == y_ref.shape and y.is_contiguous()
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(y_ref, (x, conv.weight, conv.bias), g)
    dx, dv, db = torch.autograd.grad(y, (x, layer.values, layer.bias), g)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dv, dw_ref.view(-1)[active])
    torch.testing.assert_close(db, db_ref)
    fn = lambda x, v, b: functional_call(layer, {"values": v, "bias": b}, (x,))  # noqa: E731
    small = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (small, layer.values.detach().clone().requires_grad_(),
                                         layer.bias.detach().clone().requires_grad_()))


# ---------------------------------------------------------------------------------------------
# no dense (out, in, kh, kw) tensor, ever


def test_no_dense_weight_tensor_at_any_stage():
    """A 2048 -> 2048 3x3 conv (37.7M weights, 151 MB dense in float32) at density ~0.003 on a
    4x4 input: construction, forward, backward, Adam, drop + grow, checkpoint and evaluation keep
    every tensor to the size of the unfolded patches (K x B·P) or the nnz."""
    c, k, batch, hw = 2048, 3, 2, 4
    numel = c * c * k * k
    nnz = 1 << 17
    bound = 8 * max(nnz, c * k * k * batch * hw * hw)  # float64 or int64 of the larger one
    assert bound * 20 < numel * 4
    gen = torch.Generator().manual_seed(0)
    with MaxNumel() as mode:
        active = sample_inactive(numel, EMPTY, nnz, gen)
        layer = SparseConv2d(c, c, k, active, padding=1, generator=gen)
        every_stage(layer, torch.randn(batch, c, hw, hw, generator=gen, requires_grad=True), gen)
    assert_valid(layer, nnz)
    assert mode.max_bytes <= bound, f"{mode.max_op} made a tensor of {mode.max_bytes} bytes"


def test_max_numel_mode_catches_a_dense_conv():
    with MaxNumel() as mode:
        conv = nn.Conv2d(64, 64, 3)
        conv(torch.randn(1, 64, 4, 4))
    assert mode.max_bytes >= 64 * 64 * 9 * 4


# ---------------------------------------------------------------------------------------------
# optimizer state and topology under every criterion


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_optimizer_state_reindex_exact(opt):
    layer = SparseConv2d(3, 4, 3, random_active(4 * 27, 40), padding=1,
                         generator=torch.Generator().manual_seed(0))
    p = sl.SparseLinearParam("w", layer)
    optimizer = OPTIMIZERS[opt](layer.parameters())
    for _ in range(3):
        layer(torch.randn(2, 3, 5, 5)).square().sum().backward()
        optimizer.step()
    before_active, before_vals = p.active(), layer.values.detach().clone()
    before = {k: v.clone() for k, v in optimizer.state[layer.values].items() if torch.is_tensor(v)}
    gen = torch.Generator().manual_seed(1)
    drop = before_active[torch.sort(torch.randperm(40, generator=gen)[:7]).values]
    kept = ~torch.isin(before_active, drop)
    grow = sample_inactive(4 * 27, before_active, 7, gen)
    init = torch.randn(7)
    param = layer.values
    p.update(drop, grow, init, optimizer)
    assert layer.values is param
    assert_valid(layer, 40)
    after = p.active()
    pos_kept, pos_grow = torch.searchsorted(after, before_active[kept]), torch.searchsorted(after, grow)
    assert torch.equal(layer.values.detach()[pos_kept], before_vals[kept])
    assert torch.equal(layer.values.detach()[pos_grow], init)
    for k, v in before.items():
        state = optimizer.state[layer.values][k]
        if v.dim() == 0:
            assert torch.equal(state, v)
        else:
            assert torch.equal(state[pos_kept], v[kept]) and bool((state[pos_grow] == 0).all())
    layer(torch.randn(2, 3, 5, 5)).square().sum().backward()
    optimizer.step()


@pytest.mark.parametrize("grow", grow_criteria())
def test_every_grow_criterion_keeps_exact_density(grow):
    model = ConvNet()
    try:
        sp = sparsegrow.sparsify(model, 0.3, method="set", grow=grow, storage="sparse",
                                 schedule=sparsegrow.UpdateSchedule(every=2, end=30, fraction=0.4,
                                                                    decay="constant"))
    except (ImportError, TypeError) as e:
        pytest.skip(f"grow {grow!r} cannot be built with defaults here: {e}")
    assert isinstance(model.stem, SparseConv2d) and isinstance(model.classifier, sl.SparseLinear)
    if sp.signals is not None:  # search: the conv layers' (dZ, patch) rows are captured
        assert any(isinstance(s, LayerSignal) and s.module is model.down
                   for s in sp.signals.layers.values())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp.attach(optimizer)
    nnz0 = {p.fqn: p.nnz() for p in sp.params}
    n_updates = 0
    for _ in range(8):
        loss = model(torch.randn(4, 2, 8, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        n_updates += sp.step() is not None
        for p in sp.params:
            assert p.nnz() == nnz0[p.fqn]
            if isinstance(p.module, SparseConv2d):
                assert_valid(p.module, nnz0[p.fqn])
    assert n_updates == 4
    assert sp.report()["global_density"] == pytest.approx(0.3, abs=2e-2)


@pytest.mark.parametrize("method", ["set", "search"])
def test_sparse_cnn_trains_like_masked(method):
    """Same seed -> same topology, updates, losses and weights with storage masked and sparse;
    search grows from the convolutions' unfolded rows in both."""
    runs = {}
    for storage in ("masked", "sparse"):
        torch.manual_seed(0)
        model = ConvNet().double()
        sp = sparsegrow.sparsify(model, 0.3, method=method, storage=storage, seed=1,
                                 schedule=sparsegrow.UpdateSchedule(every=2, end=20, fraction=0.3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp.attach(optimizer)
        gen = torch.Generator().manual_seed(3)
        losses = []
        for _ in range(6):
            x = torch.randn(4, 2, 8, 8, generator=gen, dtype=torch.float64)
            loss = model(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sp.step()
            losses.append(loss.item())
        runs[storage] = (sp, optimizer, losses)
    (sm, om, lm), (ss, os_, ls) = runs["masked"], runs["sparse"]
    assert ls == pytest.approx(lm, rel=1e-9)
    for pm, ps in zip(sm.params, ss.params):
        assert torch.equal(pm.active(), ps.active()), pm.fqn
        torch.testing.assert_close(pm.param.detach().view(-1)[pm.active()], ps.module.values.detach())
        buf = om.state[pm.param]["momentum_buffer"]
        torch.testing.assert_close(buf.view(-1)[pm.active()], os_.state[ps.param]["momentum_buffer"])


# ---------------------------------------------------------------------------------------------
# bad arguments


def test_bad_arguments_give_clear_errors():
    active = torch.tensor([0, 5, 9])
    with pytest.raises(ValueError, match="groups=2; only groups=1"):
        SparseConv2d(4, 4, 3, active, groups=2)
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        SparseConv2d(4, 4, 3, active, padding_mode="reflect")
    with pytest.raises(ValueError, match="unevenly"):
        SparseConv2d(4, 4, 2, active, padding="same")
    with pytest.raises(ValueError, match="stride 1"):
        SparseConv2d(4, 4, 3, active, padding="same", stride=2)
    with pytest.raises(ValueError, match="padding='full'"):
        SparseConv2d(4, 4, 3, active, padding="full")
    with pytest.raises(ValueError, match="sorted"):
        SparseConv2d(4, 4, 3, torch.tensor([5, 0]))
    with pytest.raises(ValueError, match="outside"):
        SparseConv2d(4, 4, 3, torch.tensor([4 * 4 * 9]))
    layer = SparseConv2d(4, 4, 3, active)
    with pytest.raises(ValueError, match=r"device|meta"):  # mixed devices
        layer(torch.randn(1, 4, 5, 5, device="meta"))
    with pytest.raises(ValueError, match="float32.*float64"):
        layer(torch.randn(1, 4, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        layer(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="smaller than"):
        layer(torch.randn(1, 4, 2, 2))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="0.weight.*groups=2"):
        sparsegrow.sparsify(grouped, 0.5, method="static", storage="sparse")


# ---------------------------------------------------------------------------------------------
# conversion, checkpoints, export, the loop


def test_conversion_round_trip_identical_outputs():
    torch.manual_seed(0)
    model = ConvNet().double().eval()
    sp = sparsegrow.sparsify(model, 0.3, method="static", storage="sparse", seed=0)
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
    masks = sp.masks()
    params = sparsegrow.to_masked(model)
    assert type(model.stem) is nn.Conv2d and set(params) == set(masks)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)
    back = sparsegrow.to_sparse(model, params)
    assert isinstance(model.down, SparseConv2d) and model.down.stride == (2, 2)
    assert {f: p.active() for f, p in back.items()}.keys() == masks.keys()
    for f, p in back.items():
        assert torch.equal(p.active(), masks[f])
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)


def test_checkpoint_round_trip():
    def build(seed):
        torch.manual_seed(seed)
        model = ConvNet()
        sp = sparsegrow.sparsify(model, 0.3, method="set", storage="sparse", seed=seed,
                                 schedule=sparsegrow.UpdateSchedule(every=2, end=30))
        optimizer = torch.optim.Adam(model.parameters())
        sp.attach(optimizer)
        return model, sp, optimizer

    model, sp, optimizer = build(0)
    for _ in range(4):
        model(torch.randn(4, 2, 8, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        sp.step()
    state = copy.deepcopy({"m": model.state_dict(), "s": sp.state_dict(), "o": optimizer.state_dict()})
    model2, sp2, optimizer2 = build(1)  # another topology
    model2.load_state_dict(state["m"])
    sp2.load_state_dict(state["s"])
    optimizer2.load_state_dict(state["o"])
    x = torch.randn(2, 2, 8, 8)
    model.eval(), model2.eval()
    with torch.no_grad():
        torch.testing.assert_close(model2(x), model(x))
    for a, b in zip(sp.params, sp2.params):
        assert torch.equal(a.active(), b.active())


def test_loop_materialises_batchnorm_on_meta_built_models():
    from sparsegrow.experiments.loop import _init_conv_bn, materialise_dense
    with torch.device("meta"):
        model = ConvNet()
    sparsegrow.sparsify(model, 0.3, method="static", storage="sparse", seed=0,
                        include=["stem.weight", "down.weight"])
    done = materialise_dense(model)
    assert set(done) == {"bn", "mix", "classifier"}  # BatchNorm and the layers left dense
    _init_conv_bn(model)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert torch.equal(model.bn.weight, torch.ones(6)) and int(model.bn.num_batches_tracked) == 0
    std = model.down.values.std().item()  # Kaiming normal, fan_out = 8 * 9
    assert 0.5 * (2 / 72) ** 0.5 < std < 1.5 * (2 / 72) ** 0.5
    model(torch.randn(2, 2, 8, 8)).sum().backward()


@pytest.mark.skipif(not (__import__("sparsegrow.experiments.data", fromlist=["x"]).FASHION_MNIST_DIR
                         / "t10k-labels-idx1-ubyte.gz").exists(), reason="Fashion-MNIST not installed")
def test_cli_wrn_storage_sparse_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """A WRN (BatchNorm materialised after the meta build) trained truly sparse with search grow
    reading conv rows; a crash and resume ends exactly as the uninterrupted run."""
    from sparsegrow.experiments import loop
    from sparsegrow.experiments.config import load_config
    from test_cli import assert_same_run, crash_in_epoch_2_then_resume

    args = ["model.name=wrn", "model.kwargs={depth: 10, width: 1}", "data.pad_to=32",
            "train.epochs=2", "data.train_subset=128", "data.test_subset=100",
            "train.batch_size=64", "sparsity.method=search", "sparsity.storage=sparse",
            "sparsity.density=0.2", "sparsity.update_every=1", "signal.sketch_dim=64",
            "train.threads=1"]
    cfg = load_config(None, args)
    full = loop.train(cfg, tmp_path / "full", progress=False)
    ckpt = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    assert any(k.endswith("stem.values") for k in ckpt["model"])  # the convs were truly sparse
    resumed = crash_in_epoch_2_then_resume(cfg, tmp_path / "crash", monkeypatch)
    assert_same_run(tmp_path / "full", tmp_path / "crash", full, resumed)


def test_no_grad_forward_unfolds_in_chunks(monkeypatch):
    """Evaluation batches are unfolded a few samples at a time, with the same result."""
    from sparsegrow.layers import sparse_conv
    layer = SparseConv2d(3, 4, 3, random_active(4 * 27, 30), padding=1, dtype=torch.float64)
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        whole = layer(x)
        monkeypatch.setattr(sparse_conv, "_EVAL_PATCH_NUMEL", 27 * 36 * 2)  # 2 samples a chunk
        torch.testing.assert_close(layer(x), whole, rtol=0, atol=0)
    torch.testing.assert_close(layer(x).detach(), whole, rtol=0, atol=0)
