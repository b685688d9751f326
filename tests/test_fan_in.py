"""Learning rates scaled by active fan-in (sparsegrow.fan_in, train.lr_fan_in_base)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsegrow as sg
from sparsegrow.experiments import loop
from sparsegrow.experiments.build import build_optimizer
from sparsegrow.experiments.config import ConfigError, load_config
from sparsegrow.experiments.data import FASHION_MNIST_DIR
from sparsegrow.experiments.loop import build_model_and_sparsifier
from sparsegrow.fan_in import active_fan_in, fan_in_lr_scales, split_param_groups

from test_cli import assert_same_run

needs_fmnist = pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
                                  reason="Fashion-MNIST Debian package not installed")


def net():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 64), nn.ReLU(),
                         nn.Linear(64, 10))


@pytest.mark.parametrize("storage", ["masked", "sparse"])
def test_active_fan_in_counts_the_active_inputs_of_each_unit(storage):
    model = net()
    assert [active_fan_in(m) for m in model] == [27, None, 288, None, 64]
    sp = sg.Sparsifier(model, 0.25, method="static", distribution="uniform", storage=storage, seed=0)
    for p in sp.params:
        module = p.module
        assert active_fan_in(module) == pytest.approx(p.nnz() / p.shape[0])
        assert active_fan_in(module) < p.numel / p.shape[0] * 0.3  # not the dense fan-in
    assert active_fan_in(nn.ReLU()) is None


def test_fan_in_lr_scales_lists_only_the_layers_wider_than_base():
    model = net()
    assert fan_in_lr_scales(model, 100) == {"2.weight": pytest.approx(100 / 288)}
    assert fan_in_lr_scales(model, 20) == {"0.weight": pytest.approx(20 / 27), "2.weight": pytest.approx(20 / 288),
                                           "4.weight": pytest.approx(20 / 64)}
    assert fan_in_lr_scales(model, 288) == {}
    sg.Sparsifier(model, 0.25, method="static", distribution="uniform", storage="sparse", seed=0)
    assert set(fan_in_lr_scales(model, 20)) == {"2.values"}  # 72 active inputs; 0: 6.75, 4: 16
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="base must be a positive int"):
            fan_in_lr_scales(model, bad)


def test_split_param_groups_keeps_every_parameter_once_with_its_options():
    model = net()
    groups = [{"params": [model[0].weight, model[2].weight, model[4].weight], "weight_decay": 0.1},
              {"params": [model[0].bias, model[2].bias, model[4].bias], "weight_decay": 0.0}]
    out = split_param_groups(groups, model, {"2.weight": 0.25})
    seen = [id(p) for g in out for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    scaled = [g for g in out if g["lr_scale"] != 1.0]
    assert len(scaled) == 1 and scaled[0]["params"] == [model[2].weight]
    assert scaled[0]["weight_decay"] == 0.1 and all("lr_scale" in g for g in out)
    with pytest.raises(ValueError, match=r"\['2.weight'\] are scaled but in no param group"):
        split_param_groups(groups[1:], model, {"2.weight": 0.25})


def test_the_scaled_readout_step_moves_the_logits_as_a_narrow_one_does():
    """The reason for the option: one SGD step of a dense readout over W hidden units moves the
    logits ∝ W; with base / W it moves them as a base-wide readout's step does."""
    data = SimpleNamespace(input_shape=(1, 28, 28), num_classes=10)
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    moved = {}
    for width, base in ((256, None), (16384, None), (16384, 256)):
        cfg = load_config(None, [f"model.kwargs={{hidden: [{width}]}}", "model.name=mlp",
                                 "sparsity.method=static", "sparsity.storage=sparse",
                                 "sparsity.density=0.05", "sparsity.sparse_init=true",
                                 "train.momentum=0", "train.weight_decay=0", "train.lr=0.05",
                                 f"train.lr_fan_in_base={'null' if base is None else base}"])
        torch.manual_seed(1)
        model, sp = build_model_and_sparsifier(cfg, data, 10, torch.device("cpu"))
        opt = build_optimizer(cfg, model, sp)
        sp.attach(opt)
        before = model(x).detach()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        moved[(width, base)] = (model(x).detach() - before).abs().mean().item()
    assert moved[(16384, None)] > 20 * moved[(256, None)]  # the readout's fan-in is 64× larger
    # measured: 0.014 (256 wide), 1.36 (16384), 0.023 (16384, scaled: the hidden layer's part remains)
    assert moved[(16384, 256)] < 3 * moved[(256, None)]
    assert moved[(16384, 256)] < moved[(16384, None)] / 30


def test_lr_fan_in_base_must_be_positive_and_for_methods_that_start_sparse():
    with pytest.raises(ConfigError, match="train.lr_fan_in_base must be an input count >= 1"):
        load_config(None, ["train.lr_fan_in_base=0"])
    for method in ("gmp", "dst"):  # dense at the start: their fan-in is not the one they train at
        with pytest.raises(ConfigError, match=f"method '{method}' starts dense or learns its density"):
            load_config(None, ["train.lr_fan_in_base=16", f"sparsity.method={method}"])
    load_config(None, ["train.lr_fan_in_base=16", "sparsity.method=srigl"])


def test_frozen_weights_are_not_scaled():
    model = net()
    model[2].weight.requires_grad_(False)
    assert fan_in_lr_scales(model, 20) == {"0.weight": pytest.approx(20 / 27), "4.weight": pytest.approx(20 / 64)}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    out = split_param_groups(groups, model, fan_in_lr_scales(model, 20))
    assert sum(len(g["params"]) for g in out) == 5


@needs_fmnist
@pytest.mark.parametrize("base, old_checkpoint", [(16, False), (16, True), (None, True)])
def test_resume_with_scaled_lrs_equals_uninterrupted(base, old_checkpoint, tmp_path, monkeypatch):
    """The scaled groups survive a resume, also from a checkpoint written before groups carried
    "lr_scale" (their lr came from the schedule alone: one group, as every run before session 6)."""
    args = ["model.name=mlp", "model.kwargs={hidden: [64]}", "train.epochs=2", "data.train_subset=300",
            "train.batch_size=50", "sparsity.update_every=3", "sparsity.method=rigl",
            "sparsity.density=0.2", "train.threads=1",
            f"train.lr_fan_in_base={'null' if base is None else base}"]
    cfg = load_config(None, args)
    full = loop.train(cfg, tmp_path / "full", progress=False)
    # 784·d, 64·d > 16
    assert set(full["lr_scales"]) == ({"hidden.0.weight", "classifier.weight"} if base else set())

    real_evaluate = loop.evaluate

    def crash_in_epoch_2(*a, **k):
        if crash_in_epoch_2.calls == 1:
            raise KeyboardInterrupt
        crash_in_epoch_2.calls += 1
        return real_evaluate(*a, **k)

    crash_in_epoch_2.calls = 0
    monkeypatch.setattr(loop, "evaluate", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, tmp_path / "crash", progress=False)
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    ckpt_path = tmp_path / "crash" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    groups = ckpt["optimizer"]["param_groups"]  # the lrs of the step before the checkpoint
    plain = [g["lr"] for g in groups if g["lr_scale"] == 1.0]
    assert len(plain) == 1 and plain[0] > 0 and len(groups) == (3 if base else 1)
    for g in groups:
        assert g["lr"] == pytest.approx(plain[0] * g["lr_scale"])
        assert g["lr_scale"] == 1.0 or g["lr_scale"] < 0.5
    if old_checkpoint:
        for group in ckpt["optimizer"]["param_groups"]:
            del group["lr_scale"]
        torch.save(ckpt, ckpt_path)
    resumed = loop.train(cfg, tmp_path / "crash", resume=True, progress=False)
    assert_same_run(tmp_path / "full", tmp_path / "crash", full, resumed)
