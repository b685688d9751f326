"""The library on a CUDA device, against the CPU reference.

Run on a GPU machine: `pytest tests/test_cuda.py -q`. Without CUDA every test is skipped. To check
the test code itself on a CPU-only machine: `SPARSEGROW_TEST_DEVICE=cpu pytest tests/test_cuda.py`
(the "device" run is then a second CPU run, compared to the CPU reference).
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsegrow as sg
from sparsegrow.layers import sparse_linear as sl
from sparsegrow.layers.sparse_conv import SparseConv2d
from sparsegrow.search import BACKENDS, exact_top_pairs, top_pairs
from sparsegrow.signals import GrowSignals
from sparsegrow.topology import MaskedParam, isin_sorted, sample_inactive

from test_state_machine import OPTIMIZERS, combos

DEV = os.environ.get("SPARSEGROW_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV.startswith("cuda") and not torch.cuda.is_available(),
                                reason="CUDA not available (set SPARSEGROW_TEST_DEVICE=cpu to check the tests)")
CPU = torch.device("cpu")
TOL32 = dict(atol=1e-5, rtol=1e-4)
TOL64 = dict(atol=1e-10, rtol=1e-9)
EMPTY = torch.empty(0, dtype=torch.long)


def on_dev(t: torch.Tensor) -> bool:
    return t.device.type == torch.device(DEV).type


def batch(seed, n_in=12, n_out=4, n=16, dtype=torch.float32):
    """Inputs drawn on the CPU (the same numbers on every device), then moved to DEV."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, n_in, generator=g, dtype=dtype), torch.randint(0, n_out, (n,), generator=g)
    return x.to(DEV), y.to(DEV)


def build(method, storage, opt_cls, seed=0, device=DEV, dtype=torch.float32, every=2):
    """The state-machine tests' MLP, built on the CPU with `seed`, moved to `device`, then sparsified."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)).to(device=device, dtype=dtype)
    sp = sg.Sparsifier(model, 0.3, method=method, storage=storage, seed=seed,
                       schedule=sg.UpdateSchedule(every=every, end=10_000, fraction=0.3, decay="constant"))
    opt = opt_cls(model.parameters(), **OPTIMIZERS[opt_cls])
    sp.attach(opt)
    return model, sp, opt


def train(model, sp, opt, steps, device=DEV):
    dtype = next(model.parameters()).dtype
    losses, updates = [], 0
    for t in range(steps):
        x, y = batch(t, dtype=dtype)
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        updates += sp.step() is not None
        losses.append(loss.item())
    return losses, updates


def assert_all_on_dev(model, sp, opt):
    """No silent CPU tensor: parameters, buffers (masks, CSR indices), masks, optimizer state."""
    for k, v in itertools.chain(model.named_parameters(), model.named_buffers()):
        assert on_dev(v), f"{k} on {v.device}"
    for k, v in sp.masks().items():
        assert on_dev(v), f"mask {k} on {v.device}"
    for p in sp.params:
        assert on_dev(p.active()), f"{p.fqn} active set on {p.active().device}"
    for p, state in opt.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and not (k == "step" and v.dim() == 0):  # torch keeps `step` on CPU
                assert on_dev(v), f"optimizer state {k} on {v.device}"


# ---------------------------------------------------------------------------------------------
# 1. every method x storage x optimizer trains on DEV with the invariants


@pytest.mark.parametrize("method, storage, opt_cls", combos())
def test_every_combo_trains_on_device_with_invariants(method, storage, opt_cls):
    """Guards: tensors following the model to DEV (no CPU leftovers after updates), exact
    scheduled density, sorted unique indices, inactive weights exactly zero, finite loss, and
    determinism on the device (same seed twice -> identical masks)."""
    runs = []
    for _ in range(2):
        model, sp, opt = build(method, storage, opt_cls)
        losses, updates = train(model, sp, opt, 8)
        assert updates == (0 if method in ("dense", "static") else 4)
        assert all(math.isfinite(v) for v in losses)
        assert_all_on_dev(model, sp, opt)
        for p, count in zip(sp.params, sp.target_counts()):
            active = p.active()
            assert active.numel() == count, p.fqn
            assert bool((active[1:] > active[:-1]).all()), f"{p.fqn}: duplicates or unsorted"
            assert 0 <= int(active[0]) and int(active[-1]) < p.numel
            if isinstance(p, MaskedParam):
                inactive = torch.ones(p.numel, dtype=torch.bool, device=active.device)
                inactive[active] = False
                assert bool((p.param.detach().view(-1)[inactive] == 0).all()), p.fqn
        runs.append({k: v.cpu() for k, v in sp.masks().items()})
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), f"{k}: not deterministic on {DEV}"


@pytest.mark.parametrize("net", ["mlp", "conv"])
@pytest.mark.parametrize("method, storage", sorted({(m, s) for m, s, o in
                                                    (p.values for p in combos()) if o is torch.optim.SGD}))
def test_sparsifier_built_before_the_move_to_device(net, method, storage):
    """Guards: a Sparsifier built on the CPU model, which is moved to DEV afterwards (what the
    CLI does for meta-built truly sparse models, and what users do), keeps working on DEV: every
    piece of its own state follows the layers (the ITOP record, signals), updates keep the exact
    density, and the report is computed. (Was: a CPU ever-active set beside CUDA indices.)"""
    from test_sparse_conv import ConvNet
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)) if net == "mlp" else ConvNet()
    sp = sg.Sparsifier(model, 0.3, method=method, storage=storage, seed=0,
                       schedule=sg.UpdateSchedule(every=2, end=10_000, fraction=0.3, decay="constant"))
    model.to(DEV)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp.attach(opt)
    updates = 0
    for t in range(6):
        g = torch.Generator().manual_seed(t)
        shape = (16, 12) if net == "mlp" else (16, 2, 8, 8)
        x = torch.randn(*shape, generator=g).to(DEV)
        y = torch.randint(0, 4, (16,), generator=g).to(DEV)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        updates += sp.step() is not None
    assert updates == (0 if method in ("dense", "static") else 3)
    assert_all_on_dev(model, sp, opt)
    for p, count in zip(sp.params, sp.target_counts()):
        assert p.active().numel() == count, p.fqn
    rep = sp.report()
    assert 0.0 < rep["itop"] <= 1.0


# ---------------------------------------------------------------------------------------------
# 2. the device chooses the same connections as the CPU (float64)


def _mask_run(method, storage, device):
    model, sp, opt = build(method, storage, torch.optim.SGD, seed=3, device=device,
                           dtype=torch.float64)
    train(model, sp, opt, 8, device=device)
    return {k: v.cpu() for k, v in sp.masks().items()}, [x.detach().cpu() for x in model.parameters()]


@pytest.mark.parametrize("method, storage", [
    ("static", "masked"), ("rigl", "masked"), ("search", "masked"), ("search", "sparse"),
    ("set", "masked"), ("set", "sparse")])
def test_masks_equal_cpu_float64(method, storage):
    """Guards: deterministic choices (magnitude drop, RigL's dense gradient, exact search) and the
    random ones (SET: every draw comes from the Sparsifier's CPU generator) give the CPU's masks
    after 4 updates, and the weights agree in float64."""
    ref_masks, ref_w = _mask_run(method, storage, "cpu")
    masks, w = _mask_run(method, storage, DEV)
    for k in ref_masks:
        assert torch.equal(masks[k], ref_masks[k]), f"{method}/{storage} {k}: masks differ from CPU"
    for a, b in zip(w, ref_w):
        torch.testing.assert_close(a, b, **TOL64)


# ---------------------------------------------------------------------------------------------
# 3. SparseLinear / SparseConv2d


def _grads(layer, x, g, names):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    out = torch.autograd.grad(y, [x] + [getattr(layer, n) for n in names], g)
    return [y.detach().cpu()] + [t.cpu() for t in out]


def test_sparse_linear_forward_and_grads_equal_cpu():
    """Guards: the CUDA path of SparseLinear's kernels (spmm, its transpose, sddmm) against the
    CPU in float64: output, input gradient, value and bias gradients."""
    active = sample_inactive(24 * 40, EMPTY, 200, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    layer = sl.SparseLinear.from_dense(nn.Linear(40, 24).double(), active)
    x, g = torch.randn(11, 40, dtype=torch.float64), torch.randn(11, 24, dtype=torch.float64)
    ref = _grads(layer, x, g, ["values", "bias"])
    dev = copy.deepcopy(layer).to(DEV)
    got = _grads(dev, x.to(DEV), g.to(DEV), ["values", "bias"])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL64)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), ((2, 1), (1, 2), 2),
                                                     (1, "same", (1, 2))])
def test_sparse_conv_forward_and_grads_equal_cpu(stride, padding, dilation):
    """Guards: SparseConv2d on DEV equals the CPU in float64 over several geometries."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, dilation=dilation).double()
    active = sample_inactive(3 * 2 * 9, EMPTY, 20, torch.Generator().manual_seed(0))
    layer = SparseConv2d.from_dense(conv, active)
    x = torch.randn(2, 2, 7, 8, dtype=torch.float64)
    y0 = layer(x)
    g = torch.randn_like(y0)
    ref = _grads(layer, x, g, ["values", "bias"])
    dev = copy.deepcopy(layer).to(DEV)
    got = _grads(dev, x.to(DEV), g.to(DEV), ["values", "bias"])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_device_close_to_float32(dtype):
    """Guards: SparseLinear under torch.autocast(DEV, dtype) runs, returns `dtype` like nn.Linear,
    and stays within 2u (unit roundoff) of the float32 model, output and value gradients.
    (On CPU, float16 autocast covers what the CPU autocast supports.)"""
    u = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 20), nn.Tanh(),
                          nn.Linear(20, 5)).to(DEV)
    sg.sparsify(model, 0.3, method="static", storage="sparse")
    ref = copy.deepcopy(model)
    x, g = torch.randn(64, 30).to(DEV), torch.randn(64, 5).to(DEV)
    y_ref = ref(x)
    y_ref.backward(g)
    with torch.autocast(torch.device(DEV).type, dtype=dtype):
        y = model(x)
    assert y.dtype == dtype
    y.float().backward(g)
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    assert rel(y.detach(), y_ref.detach()) <= 2 * u
    for (name, a), b in zip(sl.sparse_layers(model).items(), sl.sparse_layers(ref).values()):
        assert a.values.grad.dtype == torch.float32
        assert rel(a.values.grad, b.values.grad) <= 2 * u, name


def test_masked_sparse_conversion_on_device_identical_outputs():
    """Guards: to_masked / to_sparse on DEV keep the device and give the same outputs (MLP and
    convs), with the same active sets."""
    from test_sparse_conv import ConvNet
    torch.manual_seed(0)
    model = ConvNet().double().to(DEV).eval()
    sp = sg.sparsify(model, 0.3, method="static", storage="sparse", seed=0)
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64).to(DEV)
    with torch.no_grad():
        ref = model(x)
    masks = sp.masks()
    params = sg.to_masked(model)
    assert all(on_dev(t) for t in model.state_dict().values())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)
    back = sg.to_sparse(model, params)
    assert all(on_dev(t) for t in model.state_dict().values())
    for f, p in back.items():
        assert torch.equal(p.active(), masks[f])
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 4. search backends and sampled search


def _signal(seed=0, N=48, M=60, R=24, density=0.1):
    g = torch.Generator().manual_seed(seed)
    Z, X = torch.randn(R, N, generator=g, dtype=torch.float64), torch.randn(R, M, generator=g, dtype=torch.float64)
    Z[:, :3] *= 10
    ex = sample_inactive(N * M, EMPTY, int(density * N * M), g)
    return Z, X, ex


def test_exact_search_equals_cpu():
    """Guards: exact search on DEV picks the CPU's pairs on the same signal. Exact search
    scores in float32 by design (search/exact.py: Z.float()), so the scores agree to float32
    rounding (two GEMMs summing in different orders), the pairs exactly (no near-ties here)."""
    Z, X, ex = _signal()
    ref, rv, _ = exact_top_pairs(Z, X, 200, ex, torch.Generator().manual_seed(0))
    idx, val, _ = exact_top_pairs(Z.to(DEV), X.to(DEV), 200, ex.to(DEV), torch.Generator().manual_seed(0))
    assert torch.equal(idx.cpu(), ref)
    torch.testing.assert_close(val.cpu(), rv, atol=0, rtol=1e-5)


NO_PACKAGE = [b for b in BACKENDS.names() if not b.startswith(("faiss", "hnsw"))]


@pytest.mark.parametrize("backend", NO_PACKAGE)
def test_search_backends_contract_on_device(backend):
    """Guards: every backend without an optional package (exact, lsh, auto, sampled) on DEV:
    exactly n distinct inactive pairs, deterministic for a seed; auto (small layer) = exact."""
    Z, X, ex = _signal()
    Zd, Xd, exd = Z.float().to(DEV), X.float().to(DEV), ex.to(DEV)
    run = lambda s: top_pairs(Zd, Xd, 150, exd, torch.Generator().manual_seed(s), backend,  # noqa: E731
                              k_similar=0.2)
    a, b = run(0), run(0)
    idx = a[0].cpu()
    assert idx.numel() == 150 and idx.unique().numel() == 150
    assert not isin_sorted(idx, ex).any(), "grew an active pair"
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), "not deterministic for a seed"
    if backend in ("exact", "auto"):
        ref, _, _ = exact_top_pairs(Z.float(), X.float(), 150, ex, torch.Generator().manual_seed(0))
        assert torch.equal(idx, ref)


@pytest.mark.parametrize("sampler", ["norm", "wedge", "diamond"])
def test_sampled_search_on_device_matches_cpu_draws(sampler):
    """Guards: the sampled search on DEV draws from the CPU generator: the same pairs as on CPU
    (float64 scores), exactly n, none active, no duplicates."""
    Z, X, ex = _signal(1)
    ref = top_pairs(Z, X, 100, ex, torch.Generator().manual_seed(0), f"sample-{sampler}")
    got = top_pairs(Z.to(DEV), X.to(DEV), 100, ex.to(DEV), torch.Generator().manual_seed(0),
                    f"sample-{sampler}")
    idx = got[0].cpu()
    assert idx.numel() == 100 and idx.unique().numel() == 100 and not isin_sorted(idx, ex).any()
    assert torch.equal(idx, ref[0]), "sampled pairs differ from CPU"


def test_lowrank_search_on_device_matches_cpu():
    """Guards: `lowrank` (eigh/SVD of the R × R core, rank-k search, SDDMM rescoring) on DEV
    picks the CPU's pairs (float64), exactly n, none active, no duplicates."""
    Z, X, ex = _signal(2)
    ref = top_pairs(Z, X, 120, ex, torch.Generator().manual_seed(0), "lowrank",
                    backend_options={"rank": 4})
    got = top_pairs(Z.to(DEV), X.to(DEV), 120, ex.to(DEV), torch.Generator().manual_seed(0),
                    "lowrank", backend_options={"rank": 4})
    idx = got[0].cpu()
    assert idx.numel() == 120 and idx.unique().numel() == 120 and not isin_sorted(idx, ex).any()
    assert torch.equal(idx, ref[0]), "lowrank pairs differ from CPU"


# ---------------------------------------------------------------------------------------------
# 5. GrowSignals


@pytest.mark.parametrize("method,sketch", [("search", 0), ("search", 8), ("rigl", 0)])
def test_grow_signals_accumulate_like_cpu(method, sketch):
    """Guards: GrowSignals on DEV (raw rows, sketched rows drawn from a CPU generator, dense
    gradient) over 3 accumulated backwards equal the CPU's (float64)."""
    crit = sg.GROW.get(sg.METHODS.get(method).grow)(**({"sketch_dim": sketch} if sketch else {}))
    spec = crit.needs_signal
    out = {}
    for dev in ("cpu", DEV):
        torch.manual_seed(0)
        layer = nn.Linear(20, 12).double().to(dev)
        p = MaskedParam("w", layer, "weight", sample_inactive(240, EMPTY, 60, torch.Generator().manual_seed(0)))
        signals = GrowSignals(spec, [p])
        signals.arm(True)
        for t in range(3):
            g = torch.Generator().manual_seed(t)
            layer(torch.randn(5, 20, generator=g, dtype=torch.float64).to(dev)).square().sum().backward()
        sig = signals.collect()["w"]
        out[dev] = {k: getattr(sig, k) for k in ("dense_grad", "Z", "X") if getattr(sig, k, None) is not None}
    assert out["cpu"].keys() == out[DEV].keys() and out["cpu"]
    for k, v in out["cpu"].items():
        assert on_dev(out[DEV][k])
        torch.testing.assert_close(out[DEV][k].cpu(), v, **TOL64)


# ---------------------------------------------------------------------------------------------
# 6. non-finite scores


@pytest.mark.parametrize("storage", ["masked", "sparse"])
def test_nonfinite_weight_skips_update_on_device(storage):
    """Guards: a NaN weight on DEV makes its layer skip the update with a RuntimeWarning, like
    on CPU; the density stays."""
    model, sp, opt = build("set", storage, torch.optim.SGD, every=1)
    p0 = sp.params[0]
    with torch.no_grad():
        p0.param.view(-1)[0 if storage == "sparse" else int(p0.active()[0])] = math.nan
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match=p0.fqn.replace(".", r"\.")):
        stats = sp.step()
    assert stats["skipped_nonfinite"] >= 1 and stats["layers"][p0.fqn]["skipped_nonfinite"]
    assert [p.nnz() for p in sp.params] == sp.target_counts()


# ---------------------------------------------------------------------------------------------
# 7. export / load


@pytest.mark.parametrize("storage", ["masked", "sparse"])
def test_export_load_round_trip_from_device(storage, tmp_path):
    """Guards: export_sparse from a DEV model and load_sparse onto DEV give its outputs."""
    model, sp, opt = build("set", storage, torch.optim.Adam)
    train(model, sp, opt, 4)
    model.eval()
    x = batch(9)[0]
    with torch.no_grad():
        ref = model(x)
    sg.export_sparse(model, tmp_path / "m.safetensors")
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    loaded = sg.load_sparse(tmp_path / "m.safetensors", skeleton).to(DEV)
    assert all(on_dev(t) for t in loaded.state_dict().values())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, **TOL32)
    for fqn, active in sp.masks().items():
        assert torch.equal(loaded.get_submodule(fqn.rpartition(".")[0]).active().cpu(), active.cpu())


# ---------------------------------------------------------------------------------------------
# 8. torch.compile


def test_compiled_sparse_linear_matches_eager():
    """Guards: a SparseLinear model compiled (inductor, fullgraph) on DEV trains through topology
    updates like eager, without recompiling."""
    pytest.importorskip("torch._inductor")
    if DEV.startswith("cuda"):
        pytest.importorskip("triton")  # inductor's CUDA code generator
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    runs = {}
    for mode in ("eager", "compiled"):
        model, sp, opt = build("set", "sparse", torch.optim.SGD)
        fwd = torch.compile(model, fullgraph=True) if mode == "compiled" else model
        losses, _ = train(fwd, sp, opt, 6)
        runs[mode] = (sp, losses)
    assert counters["stats"]["unique_graphs"] == 1, "recompiled after a topology update"
    assert runs["compiled"][1] == pytest.approx(runs["eager"][1], rel=1e-4, abs=1e-5)
    for a, b in zip(runs["eager"][0].params, runs["compiled"][0].params):
        assert torch.equal(a.active(), b.active())


# ---------------------------------------------------------------------------------------------
# 9. the CLI on real Fashion-MNIST


def _fmnist_present():
    root = os.environ.get("SPARSEGROW_DATA_ROOT")
    from sparsegrow.experiments.data import FASHION_MNIST_DIR
    folder = Path(root) if root else FASHION_MNIST_DIR
    if (folder / "fashion-mnist").is_dir():  # a root holding several data sets, as the loader allows
        folder = folder / "fashion-mnist"
    return (folder / "t10k-labels-idx1-ubyte.gz").exists()


needs_fmnist = pytest.mark.skipif(not _fmnist_present(), reason="Fashion-MNIST not found")


@needs_fmnist
@pytest.mark.parametrize("method,storage", [("rigl", "masked"), ("search", "masked"), ("search", "sparse")])
def test_cli_train_on_device_and_resume_equals_uninterrupted(method, storage, tmp_path, monkeypatch):
    """Guards: `train.device=DEV` end to end (1 epoch, a few steps, updates), the checkpoint
    holds DEV tensors' values, and a crash + resume ends exactly as the uninterrupted run.
    (rigl on storage=sparse is refused by design.)"""
    from sparsegrow.experiments import loop
    from sparsegrow.experiments.config import load_config
    from test_cli import assert_same_run, crash_in_epoch_2_then_resume

    args = ["model.name=mlp", "model.kwargs={hidden: [64]}", "train.epochs=2", "data.train_subset=300",
            "data.test_subset=200", "train.batch_size=50", "sparsity.update_every=2",
            f"sparsity.method={method}", f"sparsity.storage={storage}", "sparsity.density=0.1",
            "train.threads=1", f"train.device={DEV}"]
    cfg = load_config(None, args)
    full = loop.train(cfg, tmp_path / "full", progress=False)
    assert 0.0 <= full["test_acc"] <= 1.0 and full["density"] == pytest.approx(0.1, abs=1e-3)
    resumed = crash_in_epoch_2_then_resume(cfg, tmp_path / "crash", monkeypatch)
    assert_same_run(tmp_path / "full", tmp_path / "crash", full, resumed)


@needs_fmnist
@pytest.mark.parametrize("model_args", [["configs/fmnist_cnn.yaml"],
                                        ["configs/fmnist_wrn.yaml", "model.kwargs={depth: 10, width: 1}"]])
def test_cli_cnn_storage_sparse_on_device(model_args, tmp_path, capsys):
    """Guards: a CNN trained truly sparse (SparseConv2d, search reading conv rows) on DEV via the
    CLI entry point for a few steps: exit 0, convs stored sparse, density as configured."""
    from sparsegrow.experiments.cli import main
    root = Path(__file__).resolve().parents[1]
    rc = main(["train", str(root / model_args[0]), *model_args[1:], "train.epochs=1", "data.train_subset=128", "data.test_subset=100",
               "train.batch_size=64", "sparsity.method=search", "sparsity.storage=sparse",
               "sparsity.density=0.2", "sparsity.update_every=1", "signal.sketch_dim=64",
               "train.threads=1", f"train.device={DEV}", "--run-dir", str(tmp_path / "r"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert 0.0 <= summary["test_acc"] <= 1.0
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False, map_location="cpu")
    assert any(k.endswith(".values") for k in ckpt["model"])
