"""export_sparse -> load_sparse gives the trained masked model's outputs, without the machinery."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsegrow as sg
from sparsegrow.export import read_header

from test_coverage import TinyTransformer, _data
from test_masks import _train
from test_sparsifier import ConvNet, batch, mlp


def _trained(build, storage="masked", density=0.2):
    torch.manual_seed(0)
    model = build()
    sp = sg.Sparsifier(model, density, method="set", storage=storage,
                       schedule=sg.UpdateSchedule(every=2, end=10))
    _train(model, sp, 5)
    return model.eval(), sp


@pytest.mark.parametrize("build,storage", [(mlp, "masked"), (ConvNet, "masked"), (mlp, "sparse"),
                                           (ConvNet, "sparse")])
def test_export_then_load_gives_the_same_outputs(build, storage, tmp_path):
    model, sp = _trained(build, storage)
    x = batch(7)[0]
    with torch.no_grad():
        ref = model(x)
    info = sg.export_sparse(model, tmp_path / "m.safetensors", metadata={"model": build.__name__})
    assert info["nnz"] == sp.report()["nnz"]
    assert read_header(tmp_path / "m.safetensors")["metadata"] == {"model": build.__name__}
    with torch.device("meta"):  # the architecture only
        skeleton = build()
    loaded = sg.load_sparse(tmp_path / "m.safetensors", skeleton)
    assert not loaded.training
    assert not any(k.endswith("_mask") for k in loaded.state_dict())
    assert all(not t.is_meta for t in loaded.state_dict().values())
    kinds = {type(m) for m in loaded.modules()}
    assert nn.Linear not in kinds and sg.SparseLinear in kinds  # Linear weights became sparse
    if build is ConvNet:  # conv weights load truly sparse too (issue 14)
        assert nn.Conv2d not in kinds and sg.SparseConv2d in kinds
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, rtol=1e-5, atol=1e-6)
    for fqn, active in sp.masks().items():
        layer = loaded.get_submodule(fqn.rpartition(".")[0])
        assert isinstance(layer, (sg.SparseLinear, sg.SparseConv2d))
        assert torch.equal(layer.active(), active)


def test_export_is_smaller_than_the_dense_state_dict(tmp_path):
    model, _ = _trained(lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 512), nn.ReLU(),
                                              nn.Linear(512, 10)),
                        density=0.05)
    info = sg.export_sparse(model, tmp_path / "m.safetensors")
    dense = sum(v.numel() * v.element_size() for k, v in model.state_dict().items()
                if not k.endswith("_mask"))
    assert info["bytes"] < 0.2 * dense


def test_transformer_export_keeps_attention_dense_with_zeros(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer()
    sp = sg.Sparsifier(model, 0.3, method="rigl", schedule=sg.UpdateSchedule(every=2, end=6))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp.attach(opt)
    x, y = _data()
    for _ in range(3):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step(); sp.step()
    model.eval()
    with torch.no_grad():
        ref = model(x)
    sg.export_sparse(model, tmp_path / "t.safetensors")
    with torch.device("meta"):
        skeleton = TinyTransformer()
    loaded = sg.load_sparse(tmp_path / "t.safetensors", skeleton)
    assert isinstance(loaded.head, sg.SparseLinear)
    assert type(loaded.encoder.layers[0].linear1) is nn.Linear  # read by the fast path
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("storage", ["masked", "sparse"])
def test_cli_export_of_a_run_loads_for_inference(storage, tmp_path, capsys):
    from sparsegrow.experiments import loop
    from sparsegrow.experiments.build import build_sparsifier
    from sparsegrow.experiments.cli import main
    from sparsegrow.experiments.config import load_config
    from sparsegrow.experiments.data import load_dataset, steps_per_epoch
    from sparsegrow.experiments.export import load_exported_run
    from sparsegrow.experiments.models import build_model

    args = ["model.name=mlp", "model.kwargs={hidden: [32]}", "train.epochs=1",
            "data.dataset=digits", "train.batch_size=100", "sparsity.update_every=3",
            "sparsity.method=set", "sparsity.density=0.1", f"sparsity.storage={storage}",
            "train.threads=1"]
    cfg = load_config(None, args)
    loop.train(cfg, tmp_path / "run", progress=False)
    out = tmp_path / "m.safetensors"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0, capsys.readouterr().err
    assert "of the dense state_dict" in capsys.readouterr().out
    loaded = load_exported_run(out)
    assert any(isinstance(m, sg.SparseLinear) for m in loaded.modules())
    # the trained model, rebuilt the way training built it
    data = load_dataset("digits", seed=cfg.seed)
    ref = build_model("mlp", data.input_shape, data.num_classes, hidden=[32])
    sp = build_sparsifier(cfg, ref, steps_per_epoch(len(data.train_y), 100))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    ref.load_state_dict(ckpt["model"])
    sp.load_state_dict(ckpt["sparsifier"])
    x = data.test_x[:20].float()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref.eval()(x), rtol=1e-5, atol=1e-5)
    assert main(["export", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "written by `sparsegrow train`" in capsys.readouterr().err
