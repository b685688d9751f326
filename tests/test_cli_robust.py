"""The command line under real use: overrides anywhere, resuming a run directory without retyping
its config, step checkpoints, and one clear line (exit code 2) for every unreadable file."""
import json
import re
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


def train_tiny(run_dir, *extra) -> int:
    return main(["train", str(ROOT / "configs/fmnist_lenet.yaml"), *TINY, *extra,
                 "--run-dir", str(run_dir), "--no-progress"])


@needs_fmnist
def test_resume_reuses_the_run_config_and_names_every_changed_key(tmp_path, capsys):
    run = tmp_path / "r"
    assert train_tiny(run, "train.epochs=1") == 0
    before = yaml.safe_load((run / "config.yaml").read_text())
    first = (run / "summary.json").read_text()
    # Nothing retyped: the finished run is kept as it is.
    assert main(["train", "--resume", "--run-dir", str(run), "--no-progress"]) == 0
    assert (run / "summary.json").read_text() == first
    # Only the overrides that may change: a longer run, a different evaluation cadence.
    assert main(["train", "--resume", "train.epochs=2", "--run-dir", str(run), "train.eval_every=2",
                 "--no-progress"]) == 0
    after = yaml.safe_load((run / "config.yaml").read_text())
    assert after["train"].pop("epochs") == 2 and after["train"].pop("eval_every") == 2
    del before["train"]["epochs"], before["train"]["eval_every"]
    assert after == before  # the rest is the run's own config, not fmnist_lenet.yaml's
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 8
    capsys.readouterr()
    # Anything else: one error naming each differing key with its old and new value.
    assert main(["train", "--resume", "--run-dir", str(run), "train.lr=0.5", "sparsity.density=0.2",
                 "train.epochs=3", "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert "sparsity.density: 0.02 -> 0.2" in err and "train.lr: 0.1 -> 0.5" in err, err
    differences = re.search(r"different config \((.*)\); only", err).group(1)
    assert "train.epochs" not in differences  # may change on resume
    assert json.loads((run / "summary.json").read_text()) == summary  # untouched
    # A CONFIG may still be given; it is compared the same way.
    assert main(["train", str(ROOT / "configs/fmnist_lenet.yaml"), "--resume", "--run-dir", str(run),
                 "--no-progress"]) == 2
    assert "model.name: 'mlp' -> 'lenet300100'" in one_line_error(capsys)
    (run / "config.yaml").write_text("train: {epochs: [1, 2}\n")
    assert main(["train", "--resume", "--run-dir", str(run)]) == 2
    assert one_line_error(capsys).startswith(f"sparsegrow: error: {run / 'config.yaml'}: not valid YAML")


def test_resume_needs_a_config_or_a_run_config(tmp_path, capsys):
    assert main(["train", "--run-dir", str(tmp_path), "train.epochs=2"]) == 2
    assert "train needs a CONFIG file" in one_line_error(capsys)
    assert main(["train", "--resume", "--run-dir", str(tmp_path), "train.epochs=2"]) == 2
    assert "config.yaml' not found" in one_line_error(capsys)


def test_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    for run in (tmp_path / "new", tmp_path / "crashed_in_epoch_1"):
        if run.name.startswith("crashed"):  # what a run leaves before its first checkpoint
            run.mkdir()
            (run / "metrics.jsonl").write_text('{"kind": "update", "epoch": 0}\n')
        assert train_tiny(run, "--resume") == 2
        err = one_line_error(capsys)
        assert "holds no checkpoint to continue" in err and "without --resume" in err, err
        assert not (run / "summary.json").exists() and not (run / "checkpoint.pt").exists()


@needs_fmnist
def test_extending_a_finished_run_follows_the_schedules_of_the_new_length(tmp_path, capsys):
    from sparsegrow.experiments import loop
    from sparsegrow.experiments.build import lr_at, resolve_schedule
    from sparsegrow.experiments.config import ConfigError, load_config

    # 4 steps per epoch; updates every 2 steps before the end of training (update_end = 1).
    args = TINY + ["sparsity.update_end=1.0", "train.lr_schedule=cosine"]
    short = loop.train(load_config(None, args + ["train.epochs=2"]), tmp_path / "r", progress=False)
    short_log = (tmp_path / "r/metrics.jsonl").read_text().splitlines()
    updates = [json.loads(line)["step"] for line in short_log if '"kind": "update"' in line]
    assert updates == [2, 4, 6]  # the 2-epoch schedule ends at step 8

    cfg3 = load_config(None, args + ["train.epochs=3"])
    extended = loop.train(cfg3, tmp_path / "r", resume=True, progress=False)
    assert extended["epochs"] == 3 and extended["steps"] == 12
    assert extended["epochs_changes"] == [{"step": 8, "from": 2, "to": 3}]
    log = (tmp_path / "r/metrics.jsonl").read_text().splitlines()
    assert log[:len(short_log)] == short_log  # the two trained epochs stay as they were
    new = [json.loads(line) for line in log[len(short_log):]]
    # The 3-epoch schedules from step 8 on: the lr of the 12-step cosine (not the 8-step one,
    # which has ended), and topology updates again, at the 12-step schedule's update fraction.
    assert new[-1]["kind"] == "epoch" and new[-1]["lr"] == lr_at(cfg3, 11, 12, 4) > 0
    assert [(r["step"], r["fraction"]) for r in new if r["kind"] == "update"] == [
        (10, resolve_schedule(cfg3, 4, 12).fraction_at(10))]
    assert json.loads((tmp_path / "r/summary.json").read_text()) == extended  # rewritten
    # The report tells the extended run from one trained 3 epochs from the start.
    assert main(["report", str(tmp_path / "r")]) == 0
    assert "| 3 (2 until step 8) |" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="can be extended, not shortened"):
        loop.train(load_config(None, args + ["train.epochs=2"]), tmp_path / "r", resume=True,
                   progress=False)


@needs_fmnist
def test_resume_after_the_last_checkpoint_keeps_its_test_accuracy(tmp_path):
    # Interrupted between the last checkpoint and summary.json: the resumed run trains nothing
    # and must report the test accuracy measured before the interruption, not NaN.
    assert train_tiny(tmp_path / "r", "train.epochs=1") == 0
    first = json.loads((tmp_path / "r/summary.json").read_text())
    (tmp_path / "r/summary.json").unlink()
    assert train_tiny(tmp_path / "r", "train.epochs=1", "--resume") == 0
    resumed = json.loads((tmp_path / "r/summary.json").read_text())
    assert resumed["test_acc"] == first["test_acc"] and resumed["steps"] == first["steps"] == 4


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "r"
    assert train_tiny(run, "train.epochs=1") == 0
    return run


def _torch_pickle_of_a_dict() -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"model": {}}, buf)
    return buf.getvalue()


BAD_YAML = b"train: {epochs: [1, 2}\n"
# (file in the run directory, its new content or a function of the old, command)
DAMAGE = {
    "config.yaml-syntax-resume": ("config.yaml", BAD_YAML, "resume"),
    "config.yaml-list-resume": ("config.yaml", b"- a list\n- not a mapping\n", "resume"),
    "config.yaml-unknown-key-resume": ("config.yaml", b"train: {epochz: 2}\n", "resume"),
    "config.yaml-syntax-report": ("config.yaml", BAD_YAML, "report"),
    "summary.json-cut-resume": ("summary.json", lambda b: b[:len(b) // 2], "resume"),
    "summary.json-cut-report": ("summary.json", lambda b: b[:len(b) // 2], "report"),
    "summary.json-cut-plot": ("summary.json", lambda b: b[:len(b) // 2], "plot"),
    "summary.json-list-report": ("summary.json", b"[1, 2]\n", "report"),
    "metrics.jsonl-line-plot": ("metrics.jsonl", lambda b: b + b'{"kind": "epo\n', "plot"),
    "metrics.jsonl-line-resume": ("metrics.jsonl", lambda b: b"{oops" + b[5:], "resume-unfinished"),
    "metrics.jsonl-cut-resume": ("metrics.jsonl", lambda b: b[:len(b) // 2], "resume-unfinished"),
    "checkpoint.pt-cut-resume": ("checkpoint.pt", lambda b: b[:len(b) // 2], "resume-unfinished"),
    "checkpoint.pt-foreign-resume": ("checkpoint.pt", _torch_pickle_of_a_dict(), "resume-unfinished"),
}


@needs_fmnist
@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_run_file_is_one_line_naming_it(case, finished_run, tmp_path, capsys):
    import shutil

    name, content, command = DAMAGE[case]
    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    path = run / name
    path.write_bytes(content(path.read_bytes()) if callable(content) else content)
    if command == "resume-unfinished":  # interrupted after its last checkpoint
        (run / "summary.json").unlink()
    if command == "report":
        assert main(["report", str(run)]) == 2
    elif command == "plot":
        assert main(["plot", "accuracy", str(run), "--out", str(tmp_path / "p.png")]) == 2
    else:
        assert train_tiny(run, "train.epochs=1", "--resume") == 2
    err = one_line_error(capsys)
    assert err.startswith(f"sparsegrow: error: {path}: "), err
    if name == "metrics.jsonl" and command != "plot":  # the log was not extended or rewritten
        assert path.read_bytes() == (content(finished_run.joinpath(name).read_bytes())
                                     if callable(content) else content)


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_yaml_syntax_error_is_one_line_naming_the_file(command, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"seed: 1\n" + BAD_YAML)
    assert main([command, str(path), "--run-dir" if command == "train" else "--dry-run",
                 *([str(tmp_path / "r")] if command == "train" else [])]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"sparsegrow: error: {path}: not valid YAML (line 2, column 22: "), err


@pytest.mark.parametrize("device,cuda_devices,match", [
    ("cuda", None, r"train.device='cuda', but this torch build \(.*\) has no CUDA support"),
    ("cuda", 0, "train.device='cuda', but no CUDA device is visible"),
    ("cuda:2", 2, r"train.device='cuda:2', but only 2 CUDA device\(s\) are visible \(cuda:0..cuda:1\)"),
    ("gpu", 1, "train.device must be cpu, cuda or cuda:N, got 'gpu'"),
])
def test_unavailable_device_is_one_line_before_any_data_is_read(device, cuda_devices, match, tmp_path,
                                                                monkeypatch, capsys):
    import torch

    # This machine's CUDA, as the case has it: no CUDA build (None), or n visible devices.
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: cuda_devices is not None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(cuda_devices))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices or 0)
    # data.root holds no data set: the device is checked before the data is looked for.
    assert train_tiny(tmp_path / "r", f"train.device={device}", f"data.root={tmp_path}") == 2
    assert re.search(match, one_line_error(capsys))
