"""`sparsegrow train --nproc 2` (torchrun, 2 gloo processes): the global batch split across ranks
gives what one process gives; rank 0 alone writes; resume carries the partial growth signal."""
import json
from pathlib import Path

import pytest
import torch

from sparsegrow.experiments.cli import main
from sparsegrow.experiments.data import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]
needs_fmnist = pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
                                  reason="Fashion-MNIST Debian package not installed")
# 640 examples / 64 = 10 steps per epoch; float64 so that summation order cannot flip a choice;
# a constant lr and an update end in steps keep the schedules independent of train.epochs.
SMALL = [str(ROOT / "configs/fmnist_lenet.yaml"), "model.name=mlp", "model.kwargs={hidden: [64]}",
         "data.train_subset=640", "data.test_subset=500", "train.batch_size=64",
         "train.threads=1", "train.dtype=float64", "train.lr_schedule=constant",
         "sparsity.update_every=4", "sparsity.update_end=18", "sparsity.density=0.1",
         "--no-progress"]


def masks(run_dir):
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)["sparsifier"]["params"]
    return {k: v["mask"] for k, v in state.items()}


def epochs(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "epoch"], [x for x in lines if x["kind"] == "update"]


@needs_fmnist
@pytest.mark.parametrize("method", ["rigl", "search"])
def test_two_processes_equal_one_on_the_same_global_batch(method, tmp_path):
    args = [*SMALL, "train.epochs=2", f"sparsity.method={method}"]
    assert main(["train", *args, "--run-dir", str(tmp_path / "one")]) == 0
    assert main(["train", *args, "--nproc", "2", "--run-dir", str(tmp_path / "two")]) == 0
    one, two = masks(tmp_path / "one"), masks(tmp_path / "two")
    assert all(torch.equal(one[k], two[k]) for k in one)
    (e1, u1), (e2, u2) = epochs(tmp_path / "one"), epochs(tmp_path / "two")
    assert len(e2) == 2 and len(u2) == len(u1) == 4  # rank 0 alone wrote the log
    for a, b in zip(e1, e2):  # train metrics are over the global batch, not rank 0's half
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
        assert a["train_acc"] == b["train_acc"]
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s1["test_acc"] == s2["test_acc"] and s2["world_size"] == 2


@needs_fmnist
def test_two_processes_resume_mid_window_with_accumulated_sketches(tmp_path):
    """Epoch 1 ends at step 10, inside the window 9..12; the checkpoint carries the summed sketch."""
    args = [*SMALL, "sparsity.method=search", "signal.sketch_dim=8", "signal.accumulate=true",
            "--nproc", "2"]
    assert main(["train", *args, "train.epochs=2", "--run-dir", str(tmp_path / "plain")]) == 0
    assert main(["train", *args, "train.epochs=1", "--run-dir", str(tmp_path / "split")]) == 0
    assert main(["train", *args, "train.epochs=2", "--resume", "--run-dir",
                 str(tmp_path / "split")]) == 0
    plain, split = masks(tmp_path / "plain"), masks(tmp_path / "split")
    assert all(torch.equal(plain[k], split[k]) for k in plain)


def test_nproc_must_be_positive(capsys):
    assert main(["train", *SMALL, "--nproc", "0"]) == 2
    assert "--nproc must be >= 1" in capsys.readouterr().err
