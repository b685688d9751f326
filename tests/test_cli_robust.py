"""The command line under real use: overrides anywhere, resuming a run directory without retyping
its config, step checkpoints, and one clear line (exit code 2) for every unreadable file."""
import json
from pathlib import Path

import pytest
import yaml

from sparsegrow.experiments.cli import main
from test_cli import ROOT, needs_fmnist

# A run of a few seconds: 200 examples in batches of 50 (4 steps per epoch), 300 test examples.
TINY = ["model.name=mlp", "model.kwargs={hidden: [16]}", "data.train_subset=200", "data.test_subset=300",
        "train.batch_size=50", "sparsity.method=set", "sparsity.update_every=2", "train.threads=1"]


def one_line_error(capsys) -> str:
    """The stderr of a command that failed cleanly: exactly one line, no traceback."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@needs_fmnist
def test_overrides_may_come_after_options(tmp_path, capsys):
    rc = main(["train", str(ROOT / "configs/fmnist_lenet.yaml"), "--run-dir", str(tmp_path / "r"),
               TINY[0], "--no-progress", *TINY[1:], "train.epochs=1", "seed=3"])
    assert rc == 0, capsys.readouterr().err
    saved = yaml.safe_load((tmp_path / "r/config.yaml").read_text())
    assert saved["model"]["name"] == "mlp" and saved["seed"] == 3 and saved["train"]["epochs"] == 1


def test_sweep_overrides_may_come_after_options(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"base: {ROOT / 'configs/fmnist_lenet.yaml'}\noutput: {tmp_path / 'out'}\n"
                    "rows: [{label: a}, {label: b}]\n")
    assert main(["sweep", str(spec), "--dry-run", "train.epochs=7", "--no-progress", "train.lr=0.5",
                 "--rows", "b"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"{tmp_path / 'out/b/seed0'}: train.epochs=7 train.lr=0.5 seed=0"]
