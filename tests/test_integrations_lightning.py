"""SparsegrowCallback in a real lightning Trainer: the masks of a plain loop, checkpoints, resume."""
import csv

import pytest
import torch
from torch import nn

import sparsegrow as sg

L = pytest.importorskip("lightning.pytorch")

from sparsegrow.integrations.lightning import SparsegrowCallback  # noqa: E402

STEPS, BATCH, N, EVERY, LR = 12, 8, 32, 3, 0.1  # 4 optimizer steps per epoch, 3 epochs


class LitNet(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))  # (B, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def loader(batch=BATCH, n=N):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, generator=g)
    ds = torch.utils.data.TensorDataset(x, x[:, :4].argmax(1))
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False)


SPARSE = dict(density=0.3, method="rigl", seed=0)


def fit(tmp_path, ckpt_path=None, callback_kw=None, callbacks=(), accumulate=1, logger=False,
        n=N):
    torch.manual_seed(0)
    module = LitNet()
    cb = SparsegrowCallback(**{**SPARSE, "every": EVERY, "end": 0.75, **(callback_kw or {})})
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=logger,
                        callbacks=[cb, *callbacks], enable_checkpointing=bool(callbacks),
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), accumulate_grad_batches=accumulate,
                        num_sanity_val_steps=0)
    trainer.fit(module, loader(BATCH // accumulate, n), ckpt_path=ckpt_path)
    return trainer, cb


def plain(accumulate=1, n=N, **sparse_kw):
    torch.manual_seed(0)
    model = LitNet()
    sp = sg.Sparsifier(model, **{**SPARSE, **sparse_kw},
                       schedule=sg.UpdateSchedule(every=EVERY, end=int(0.75 * STEPS)))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sp.attach(opt)
    batches = [b for _ in range(STEPS) for b in loader(BATCH // accumulate, n)]  # epochs repeat
    for step in range(STEPS):
        opt.zero_grad()
        for x, y in batches[step * accumulate:(step + 1) * accumulate]:
            (nn.functional.cross_entropy(model(x), y) / accumulate).backward()
        opt.step()
        sp.step()
    return sp


def assert_same_masks(a, b):
    ma, mb = a.masks(), b.masks()
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k


def test_lightning_gives_the_masks_of_a_plain_loop(tmp_path):
    trainer, cb = fit(tmp_path)
    assert trainer.global_step == STEPS == cb.sparsifier.step_count
    assert cb.sparsifier.n_updates == 2
    assert_same_masks(cb.sparsifier, plain())


def test_accumulate_grad_batches_steps_once_per_optimizer_step(tmp_path):
    trainer, cb = fit(tmp_path, accumulate=2)
    assert trainer.global_step == STEPS == cb.sparsifier.step_count
    assert_same_masks(cb.sparsifier, plain(accumulate=2))


def test_update_stats_reach_the_logger_at_their_steps(tmp_path):
    logger = L.loggers.CSVLogger(str(tmp_path), name="log")
    trainer, _ = fit(tmp_path, logger=logger)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("sparsegrow/update_grown")]
    assert [int(r["step"]) for r in rows] == [3, 6]
    assert float(rows[-1]["sparsegrow/density"]) == pytest.approx(0.3, abs=1e-3)
    assert float(rows[-1]["sparsegrow/itop"]) > float(rows[0]["sparsegrow/itop"]) > 0.3
    assert "sparsegrow/update_grown" in trainer.callback_metrics


@pytest.mark.parametrize("storage,method", [("masked", "rigl"), ("sparse", "set")])
def test_checkpoint_and_resume_give_the_same_masks(tmp_path, storage, method):
    # One batch per epoch: Lightning restarts a plain DataLoader's epoch on resume, so only
    # then does the resumed run see the data of the straight one.
    kw, one = {"storage": storage, "method": method}, {"n": BATCH}
    _, straight = fit(tmp_path / "a", callback_kw=kw, **one)
    assert_same_masks(straight.sparsifier, plain(method=method, **one))
    ckpts = tmp_path / "ckpt"
    every_4 = L.callbacks.ModelCheckpoint(dirpath=str(ckpts), save_top_k=-1, every_n_train_steps=4)
    fit(tmp_path / "b", callback_kw=kw, callbacks=[every_4], **one)
    first = ckpts / "epoch=3-step=4.ckpt"
    saved = torch.load(first, weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if "SparsegrowCallback" in k]
    assert state["sparsifier"]["step"] == 4 and state["sparsifier"]["n_updates"] == 1
    trainer, resumed = fit(tmp_path / "c", ckpt_path=str(first), callback_kw=kw, **one)
    assert trainer.global_step == STEPS == resumed.sparsifier.step_count
    assert resumed.sparsifier.n_updates == 2
    if storage == "sparse":
        assert isinstance(trainer.lightning_module.fc1, sg.SparseLinear)
    assert_same_masks(resumed.sparsifier, straight.sparsifier)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="never fires"):  # every=100 in 12 steps
        fit(tmp_path, callback_kw={"every": 100})
    with pytest.raises(TypeError, match="optimizer"):
        SparsegrowCallback(optimizer=None)


def test_example_runs(tmp_path, capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / "lightning_trainer.py"
    spec = importlib.util.spec_from_file_location("example_lightning_trainer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    report = mod.main(["--steps", "30", "--every", "5", "--accumulate", "2", "--out", str(tmp_path)])
    assert report["global_density"] == pytest.approx(0.1, abs=1e-3) and report["n_updates"] == 4
    assert "ITOP" in capsys.readouterr().out
