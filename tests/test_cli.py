"""The CLI end to end: every shipped config runs a few steps; resume equals an uninterrupted run."""
import json
import re
from pathlib import Path

import pytest
import torch

from sparsegrow.experiments import loop
from sparsegrow.experiments.cli import main
from sparsegrow.experiments.config import ConfigError, load_config
from sparsegrow.experiments.data import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")
                if re.search(r"^base:", p.read_text(), re.M))  # a sweep names its base config
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")
                 if str(p.relative_to(ROOT)) not in SWEEPS)
needs_fmnist = pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
                                  reason="Fashion-MNIST Debian package not installed")
SMALL = ["train.epochs=1", "data.train_subset=256", "data.test_subset=500", "train.batch_size=64",
         "sparsity.update_every=2", "train.threads=2"]


WIDE = 100_000  # hidden units: such a config's full-width run takes minutes (slow suite)
WIDE_CONFIGS = [c for c in CONFIGS if max(load_config(ROOT / c).model.kwargs.get("hidden", [0])) > WIDE]


@needs_fmnist
@pytest.mark.parametrize("config", CONFIGS)
def test_every_shipped_config_runs_a_few_steps(config, tmp_path, capsys):
    run_shipped_config(config, tmp_path, capsys, full_width=False)


@pytest.mark.slow
@needs_fmnist
@pytest.mark.parametrize("config", WIDE_CONFIGS)
def test_wide_shipped_configs_run_a_few_steps_at_full_width(config, tmp_path, capsys):
    run_shipped_config(config, tmp_path, capsys, full_width=True)


def run_shipped_config(config, tmp_path, capsys, full_width: bool):
    """A few steps of a shipped config on small data; models wider than WIDE at 4096 wide (and
    density 0.01) unless full_width: their build, layers and optimizer groups are the same."""
    text = (ROOT / config).read_text()
    assert text.startswith(f"# sparsegrow "), "a config starts with the command that runs it"
    cfg = load_config(ROOT / config)
    extra = list(SMALL)
    if cfg.model.name in ("wrn", "resnet"):
        extra += ["model.kwargs={depth: 10, width: 1}" if cfg.model.name == "wrn" else "model.kwargs={depth: 8, width: 4}"]
    if config in WIDE_CONFIGS and not full_width:
        extra += ["model.kwargs={hidden: [4096, 4096]}", "sparsity.density=0.01"]
    cfg = load_config(ROOT / config, extra)
    rc = main(["train", str(ROOT / config), *extra, "--run-dir", str(tmp_path / "r"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert 0.0 <= summary["test_acc"] <= 1.0
    assert summary["density"] == pytest.approx(cfg.sparsity.density if cfg.sparsity.method not in ("dense", "dst") else summary["density"], abs=1e-3)


def untimed(obj):
    """obj without wall-clock fields (which differ between any two runs), tensors as lists."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items()
                if not (isinstance(k, str) and (k.endswith("time_s") or k == "phases_s"))}
    if isinstance(obj, (list, tuple)):
        return [untimed(v) for v in obj]
    if torch.is_tensor(obj):
        return obj.tolist()
    return obj


@needs_fmnist
@pytest.mark.parametrize("method", ["rigl", "set", "search", "dst"])
def test_resume_after_crash_gives_same_masks_and_accuracy(method, tmp_path, monkeypatch):
    args = ["model.name=mlp", "model.kwargs={hidden: [64]}", "train.epochs=3", "data.train_subset=600",
            "train.batch_size=50", "sparsity.update_every=5", f"sparsity.method={method}",
            "sparsity.density=0.1", "train.threads=1"]
    cfg = load_config(None, args)
    full = loop.train(cfg, tmp_path / "full", progress=False)

    resumed = crash_in_epoch_2_then_resume(cfg, tmp_path / "crash", monkeypatch, check_refusal=True)
    assert_same_run(tmp_path / "full", tmp_path / "crash", full, resumed)


@needs_fmnist
@pytest.mark.parametrize("recorded", ["peaks", "none"])
def test_resumed_run_reports_the_whole_runs_memory_peak(recorded, tmp_path, monkeypatch):
    """A run trained by two processes reports the higher of their peaks, not the last one's; a
    checkpoint that recorded no peaks (written before they were carried) marks them partial."""
    args = ["model.name=mlp", "model.kwargs={hidden: [32]}", "train.epochs=3", "data.train_subset=300",
            "train.batch_size=50", "sparsity.update_every=4", "sparsity.method=set", "sparsity.density=0.1",
            "train.threads=1"]
    cfg, run_dir = load_config(None, args), tmp_path / "r"
    big = 10.0 ** 7  # MiB: more than this process ever held; stands for an earlier process's peak
    real_save = loop.atomic_torch_save

    def as_if_an_earlier_process_peaked(obj, path):  # edits epoch 1's checkpoint, the first
        if obj["epoch"] == 1:                          # process's last (it crashes in epoch 2)
            if recorded == "none":
                del obj["peaks"]
            else:
                assert obj["peaks"]["peak_rss_mib"] > 0 and obj["peaks"]["peaks_partial"] is False
                obj["peaks"] = {**obj["peaks"], "peak_rss_mib": big}
        real_save(obj, path)

    monkeypatch.setattr(loop, "atomic_torch_save", as_if_an_earlier_process_peaked)
    summary = crash_in_epoch_2_then_resume(cfg, run_dir, monkeypatch)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    if recorded == "none":
        assert summary["peaks_partial"] is True and ckpt["peaks"]["peaks_partial"] is True
        assert 0 < summary["peak_rss_mib"] < big
    else:
        assert summary["peaks_partial"] is False
        assert summary["peak_rss_mib"] == big and ckpt["peaks"]["peak_rss_mib"] == big
    assert summary["peak_gpu_mib"] is None  # CPU


@needs_fmnist
def test_each_run_in_one_process_reports_its_own_memory_peak(tmp_path, monkeypatch):
    """`sweep --jobs 1` trains its runs in one process: a run's peak excludes an earlier run's."""
    args = ["model.name=mlp", "model.kwargs={hidden: [32]}", "train.epochs=1", "data.train_subset=200",
            "train.batch_size=50", "sparsity.update_every=2", "sparsity.method=set",
            "sparsity.density=0.1", "train.threads=1"]
    cfg = load_config(None, args)
    real_evaluate = loop.evaluate

    def evaluate_holding_1_gib(*a, **k):
        block = bytearray(2**30)
        block[::4096] = b"x" * len(block[::4096])  # touch every page: resident
        del block
        return real_evaluate(*a, **k)

    monkeypatch.setattr(loop, "evaluate", evaluate_holding_1_gib)
    first = loop.train(cfg, tmp_path / "a", progress=False)
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    second = loop.train(cfg, tmp_path / "b", progress=False)
    assert first["peak_rss_scope"] == second["peak_rss_scope"] == "run"  # Linux: /proc/self/clear_refs
    assert second["peak_rss_mib"] < first["peak_rss_mib"] - 500  # run b alone: ~600 MiB, a: ~1.4 GiB


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def crash_in_epoch_2_then_resume(cfg, run_dir: Path, monkeypatch, check_refusal: bool = False) -> dict:
    """Train cfg into run_dir, interrupted after epoch 2's training (before its checkpoint), then
    resume it; returns the resumed run's summary. check_refusal: also check that training into
    the interrupted run's folder without resume is refused, naming --resume."""
    real_evaluate = loop.evaluate
    calls = {"n": 0}

    def crash_in_epoch_2(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(loop, "evaluate", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, run_dir, progress=False)
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    assert not (run_dir / "summary.json").exists()
    if check_refusal:
        with pytest.raises(ConfigError, match="--resume"):
            loop.train(cfg, run_dir, progress=False)
    return loop.train(cfg, run_dir, resume=True, progress=False)


def assert_same_run(full_dir: Path, resumed_dir: Path, full: dict, resumed: dict) -> None:
    """The resumed run ended exactly as the uninterrupted one: summary (but its clocks), masks,
    sparsifier RNG, ITOP, weights, and every line of the metrics log (but its clocks)."""
    assert resumed["test_acc"] == full["test_acc"]
    assert untimed({**resumed, "peak_rss_mib": 0}) == untimed({**full, "peak_rss_mib": 0})
    a = torch.load(full_dir / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed_dir / "checkpoint.pt", weights_only=False)
    assert untimed(a["sparsifier"]) == untimed(b["sparsifier"])  # masks, RNG state, ITOP, ...
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    resumed_log = untimed(read_log(resumed_dir))
    assert resumed_log == untimed(read_log(full_dir))  # lines written after the last checkpoint were dropped
    assert sum(r["kind"] == "epoch" for r in resumed_log) == full["epochs"]


@needs_fmnist
@pytest.mark.parametrize("method,augment,crash", [
    ("rigl", False, "mid-epoch"), ("set", True, "mid-epoch"), ("search", False, "mid-epoch"),
    ("dst", False, "mid-epoch"), ("rigl", False, "after-last-batch")])
def test_resume_from_a_step_checkpoint_gives_same_masks_and_accuracy(method, augment, crash, tmp_path,
                                                                     monkeypatch):
    # 600 examples in batches of 50: 12 steps per epoch, 36 in all.
    args = ["model.name=mlp", "model.kwargs={hidden: [64]}", "train.epochs=3", "data.train_subset=600",
            "train.batch_size=50", "sparsity.update_every=5", f"sparsity.method={method}",
            "sparsity.density=0.1", "train.threads=1", f"data.augment={str(augment).lower()}"]
    full = loop.train(load_config(None, args), tmp_path / "full", progress=False)  # no step checkpoints

    if crash == "mid-epoch":  # checkpoints at steps 5, 10, (12), 15, 20, (24); dies in step 23
        cfg = load_config(None, args + ["output.checkpoint_steps=5"])
        real_lr_at = loop.lr_at

        def crash_in_step_23(cfg, step, *a):
            if step == 22:  # 0-based: the 23rd step, in epoch 2 after the checkpoint of step 20
                raise KeyboardInterrupt
            return real_lr_at(cfg, step, *a)

        monkeypatch.setattr(loop, "lr_at", crash_in_step_23)
        resume_at = (1, 8, 20)  # (epoch, batch, step) of the last checkpoint
    else:  # step 12 is epoch 1's last batch: its checkpoint comes before epoch 1's evaluation
        cfg = load_config(None, args + ["output.checkpoint_steps=6"])

        def crash_in_evaluate(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(loop, "evaluate", crash_in_evaluate)
        resume_at = (0, 12, 12)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, tmp_path / "crash", progress=False)
    monkeypatch.undo()
    ckpt = torch.load(tmp_path / "crash" / "checkpoint.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == resume_at
    resumed = loop.train(cfg, tmp_path / "crash", resume=True, progress=False)
    assert_same_run(tmp_path / "full", tmp_path / "crash", full, resumed)


@pytest.mark.parametrize("override,match", [
    ("sparsity.density=1.5", r"sparsity.density must be in \(0, 1\], got 1.5"),
    ("sparsity.method=magic", "unknown method 'magic'; allowed"),
    ("sparsity.distribution=flat", "unknown distribution 'flat'"),
    ("sparsity.densty=0.1", "unknown key"),
    ("train.epochs=ten", "train.epochs: got 'ten'"),
    ("sparsity.update_every=5000", "schedule never fires"),
    ("data.dataset=imagenet", "unknown dataset 'imagenet'"),
    ("train.eval_every=0", "train.eval_every must be an epoch count >= 1, got 0"),
    ("sparsity.fixed=[nope.weight]", r"fixed \['nope.weight'\] are not among the sparse parameters"),
    ("sparsity.method=dst sparsity.fixed=[hidden.0.weight]", "does not apply to method 'dst'"),
])
def test_cli_bad_input_is_one_clear_line(override, match, tmp_path, capsys):
    rc = main(["train", str(ROOT / "configs/fmnist_lenet.yaml"), "train.epochs=1", *override.split(),
               "--run-dir", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1
    import re
    assert re.search(match, err), err


def test_missing_dataset_package_is_a_clear_error(tmp_path, capsys):
    rc = main(["train", str(ROOT / "configs/fmnist_lenet.yaml"), f"data.root={tmp_path}",
               "--run-dir", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "apt-get install -y dataset-fashion-mnist" in err


@needs_fmnist
def test_report_renders_grouped_table(tmp_path, capsys):
    for seed in (0, 1):
        assert main(["train", str(ROOT / "configs/fmnist_lenet.yaml"), *SMALL, f"seed={seed}",
                     "--run-dir", str(tmp_path / f"s{seed}"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| lenet300100 | rigl | 0.02 | erk | 2 | 0.3 | 1 |" in out
    assert out.strip().splitlines()[-1].endswith("| 2 |")  # two seeds in one row


@needs_fmnist
def test_finished_run_from_an_older_config_version_is_still_recognised(tmp_path):
    import yaml

    args = ["model.name=mlp", "model.kwargs={hidden: [16]}", "train.epochs=1", "data.train_subset=200",
            "data.test_subset=300", "sparsity.method=static", "train.threads=1"]
    cfg = load_config(None, args)
    first = loop.train(cfg, tmp_path / "r", progress=False)
    assert first["test_acc"] * 300 == round(first["test_acc"] * 300)  # 300 test examples
    stored = yaml.safe_load((tmp_path / "r/config.yaml").read_text())
    del stored["search"]["global_threshold"]  # as written before this key existed
    (tmp_path / "r/config.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    assert loop.train(cfg, tmp_path / "r", resume=True, progress=False) == first
    changed = load_config(None, args + ["train.lr=0.5"])
    with pytest.raises(ConfigError, match="different config"):
        loop.train(changed, tmp_path / "r", resume=True, progress=False)


def test_yaml_boolean_words_stay_strings_in_overrides():
    cfg = load_config(None, ["search.measure=off", "signal.accumulate=true"])
    assert cfg.search.measure == "off" and cfg.signal.accumulate is True
    with pytest.raises(ConfigError, match="quote the word"):
        load_config(None, ["search.measure=false"])


@needs_fmnist
def test_eval_every_skips_test_epochs_but_always_evaluates_the_last(tmp_path):
    args = ["model.name=mlp", "model.kwargs={hidden: [16]}", "train.epochs=3", "data.train_subset=200",
            "data.test_subset=300", "sparsity.method=static", "train.threads=1", "train.eval_every=2"]
    summary = loop.train(load_config(None, args), tmp_path / "r", progress=False)
    epochs = [json.loads(line) for line in (tmp_path / "r/metrics.jsonl").read_text().splitlines()]
    accs = [r["test_acc"] for r in epochs if r["kind"] == "epoch"]
    assert [a is None for a in accs] == [True, False, False]  # epoch 2 (every 2nd) and 3 (last)
    assert summary["test_acc"] == accs[-1]


def test_progress_bar_memory_is_the_resident_set():
    """The progress bar's rss= is this process's resident memory now: positive, at most its peak."""
    import resource

    from sparsegrow.experiments.loop import memory_now
    rss = float(memory_now(torch.device("cpu"))["rss"].rstrip("G"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    assert 0.01 < rss <= peak + 0.01


_THP_PROBE = """
import os, sys
{setup}
from sparsegrow.experiments.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
import torch
x = torch.empty(2**26)  # 256 MiB, touched: faulted in on huge pages if madvised
x.fill_(1.0)
huge = [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages:")]
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), int(huge[0].split()[1]))
"""


@pytest.mark.skipif("[madvise]" not in (Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
                                        if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists() else ""),
                    reason="huge pages only on request: the kernel's THP mode must be madvise")
@pytest.mark.parametrize("user_setting", [None, "0"])
def test_cli_asks_for_huge_pages_unless_the_user_said_no(user_setting):
    # The CLI sets THP_MEM_ALLOC_ENABLE=1 before torch's first allocation (the 10⁶ model's step
    # is 1.5× faster on huge pages); a user's explicit 0 is kept.
    import subprocess
    import sys

    setup = ("os.environ.pop('THP_MEM_ALLOC_ENABLE', None)" if user_setting is None
             else f"os.environ['THP_MEM_ALLOC_ENABLE'] = {user_setting!r}")
    out = subprocess.run([sys.executable, "-c", _THP_PROBE.format(setup=setup)], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout.splitlines()[-1].split()
    if user_setting is None:
        assert out[0] == "1" and int(out[1]) >= 128 * 1024  # kB: at least half the tensor
    else:
        assert out[0] == "0" and int(out[1]) == 0
