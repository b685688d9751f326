"""Sweeps: every shipped sweep validates; a sweep skips finished runs and resumes interrupted ones."""
from pathlib import Path

import pytest

from sparsegrow.experiments import loop, sweep
from sparsegrow.experiments.config import ConfigError
from test_cli import ROOT, SWEEPS, needs_fmnist


@pytest.mark.parametrize("path", SWEEPS)
def test_every_shipped_sweep_validates(path):
    assert (ROOT / path).read_text().startswith("# sparsegrow sweep "), "starts with its command"
    for smoke in (False, True):
        _, jobs = sweep.load_sweep(ROOT / path, smoke=smoke)
        assert jobs and len({j.run_dir for j in jobs}) == len(jobs)


def _write_sweep(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"""# sparsegrow sweep s.yaml
base: {ROOT / 'configs/fmnist_lenet.yaml'}
output: {tmp_path / 'out'}
seeds: [0, 1]
overrides: [train.epochs=2, data.train_subset=300, train.batch_size=50, sparsity.update_every=2,
            model.name=mlp, "model.kwargs={{hidden: [32]}}", train.threads=1]
rows:
  - {{label: static, overrides: [sparsity.method=static]}}
  - {{label: set, overrides: [sparsity.method=set], seeds: [3]}}
""")
    return spec


@needs_fmnist
def test_sweep_skips_finished_and_resumes_interrupted(tmp_path, monkeypatch):
    spec = _write_sweep(tmp_path)
    calls = []
    real_train = loop.train

    def counting_train(cfg, run_dir, resume=False, progress=True):
        calls.append((Path(run_dir).name, cfg.seed))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the second run dies before it starts training
        return real_train(cfg, run_dir, resume=resume, progress=progress)

    monkeypatch.setattr(sweep, "train", counting_train)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(spec, progress=False)
    monkeypatch.setattr(sweep, "train", real_train)

    out = tmp_path / "out"
    assert (out / "static/seed0/summary.json").exists()
    first = (out / "static/seed0/summary.json").read_text()
    summaries = sweep.run_sweep(spec, progress=False)
    assert [s["seed"] for s in summaries] == [0, 1, 3]
    assert (out / "static/seed0/summary.json").read_text() == first  # skipped, not retrained
    assert (out / "set/seed3/summary.json").exists()


def test_smoke_seeds_limit_the_smoke_sweep(tmp_path):
    spec = _write_sweep(tmp_path)
    spec.write_text(spec.read_text() + "smoke: [train.epochs=1]\nsmoke_seeds: [1]\n")
    _, jobs = sweep.load_sweep(spec, smoke=True)
    assert [(j.label, j.seed) for j in jobs] == [("static", 1), ("set", 3)]
    _, jobs = sweep.load_sweep(spec)
    assert [(j.label, j.seed) for j in jobs] == [("static", 0), ("static", 1), ("set", 3)]


def test_bad_sweep_is_a_clear_error(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(f"base: {ROOT / 'configs/fmnist_lenet.yaml'}\nrowz: []\n")
    with pytest.raises(ConfigError, match="unknown sweep key"):
        sweep.load_sweep(spec)
    spec.write_text(f"base: {ROOT / 'configs/fmnist_lenet.yaml'}\nrows: [{{label: a, overrides: [sparsity.density=3]}}]\n")
    with pytest.raises(ConfigError, match="density must be in"):
        sweep.load_sweep(spec)


@needs_fmnist
def test_plots_render_from_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from sparsegrow.experiments.cli import main

    spec = _write_sweep(tmp_path)
    sweep.run_sweep(spec, progress=False)
    for kind in ("density", "loss", "accuracy", "itop", "layer-density", "churn", "density-acc",
                 "time"):
        out = tmp_path / f"{kind}.png"
        assert main(["plot", kind, str(tmp_path / "out"), "--out", str(out)]) == 0
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    # plots of what the runs never logged: one line on stderr, exit code 2, no file
    for kind, what in (("recall", "recall"), ("churn", "topology update")):
        runs = tmp_path / "out" / ("static" if kind == "churn" else "")
        out = tmp_path / f"missing-{kind}.png"
        capsys.readouterr()
        assert main(["plot", kind, str(runs), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert what in err and err.count("\n") == 1 and not out.exists()


def test_rows_option_runs_only_the_named_rows(tmp_path, capsys):
    from sparsegrow.experiments.cli import main

    spec = _write_sweep(tmp_path)
    assert main(["sweep", str(spec), "--rows", "set", "--dry-run", "--no-progress"]) == 0
    listed = capsys.readouterr().out.strip().splitlines()
    assert len(listed) == 1 and listed[0].startswith(str(tmp_path / "out/set/seed3"))
    with pytest.raises(ConfigError, match=r"unknown row label\(s\) \['sett'\]; the sweep has: static, set"):
        sweep.run_sweep(spec, rows=["sett"], progress=False, dry_run=True)


@needs_fmnist
def test_parallel_sweep_equals_sequential_and_reports_failures_together(tmp_path):
    """--jobs 2 trains the same runs as --jobs 1 (same masks, same metrics); --seeds filters;
    one failing run does not stop the others and the failure names the run."""
    import json

    import torch

    spec = _write_sweep(tmp_path)
    seq = sweep.run_sweep(spec, progress=False, seeds=[0, 3])
    assert [s["seed"] for s in seq] == [0, 3]
    out = tmp_path / "out"
    saved = {d: (out / d / "summary.json").read_text() for d in ("static/seed0", "set/seed3")}
    masks = {d: torch.load(out / d / "checkpoint.pt", weights_only=False) for d in saved}
    import shutil
    shutil.move(out, tmp_path / "seq")
    par = sweep.run_sweep(spec, progress=False, seeds=[0, 3], jobs=2)
    assert [s["seed"] for s in par] == [0, 3]
    for d, text in saved.items():
        a, b = json.loads(text), json.loads((out / d / "summary.json").read_text())
        assert a["test_acc"] == b["test_acc"] and a["test_loss"] == b["test_loss"], d
        ma = {k: v for k, v in masks[d]["model"].items() if k.endswith("_mask")}
        mb = {k: v for k, v in torch.load(out / d / "checkpoint.pt", weights_only=False)["model"].items()
              if k.endswith("_mask")}
        assert ma.keys() == mb.keys() and ma and all(torch.equal(ma[k], mb[k]) for k in ma), d
    with pytest.raises(ConfigError, match=r"--seeds: seed\(s\) \[7\] are not in the sweep; it has: \[0, 1, 3\]"):
        sweep.run_sweep(spec, seeds=[7], progress=False)
    # seed 1 of `static` cannot create its run directory (a file is in the way): it fails alone
    (out / "static/seed1").write_text("in the way")
    with pytest.raises(RuntimeError, match=r"1 of 3 sweep runs failed:\n.*static/seed1"):
        sweep.run_sweep(spec, progress=False, jobs=2)
