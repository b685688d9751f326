"""The thesis sweeps (configs/thesis/, docs/thesis.md): their smoke size runs, and the thesis table
is reproduced exactly from a committed fixture of real smoke runs.

That every shipped sweep validates (full and smoke) is tests/test_sweep.py's
test_every_shipped_sweep_validates; that sweeps skip finished runs and resume interrupted ones is
its test_sweep_skips_finished_and_resumes_interrupted. Neither is repeated here.

Regenerate the fixture (after a change to what runs write) with: python tests/test_thesis.py
"""
import shutil
import sys
from pathlib import Path

import pytest

from sparsegrow.experiments import sweep, thesis
from sparsegrow.experiments.cli import main
from sparsegrow.experiments.config import load_config
from sparsegrow.experiments.loop import train
from sparsegrow.experiments.results import find_runs, load_run

ROOT = Path(__file__).resolve().parents[1]
TABLES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs/thesis").glob("table_3_*.yaml"))
FIXTURE = ROOT / "tests/fixtures/thesis_runs"
EXPECTED = ROOT / "tests/fixtures/thesis_table.md"
# (row label of configs/thesis/table_3_1.yaml or table_3_4.yaml, seeds) kept in the fixture
FIXTURE_ROWS = {"table_3_1.yaml": [("basic", [0, 1]), ("pruned", [0, 1]), ("bruteforce_K0.01", [0, 1]),
                                   ("faiss_ks0.15_K0.01", [0, 1]), ("set_K0.01", [0]), ("rigl_K0.01", [0])],
                "table_3_4.yaml": [("lsh_bits1", [0])]}


def smoke_jobs(table: str, seeds=(0,)):
    """The --smoke jobs of a thesis sweep, restricted to `seeds` (smoke cannot cut seeds itself)."""
    base, jobs = sweep.load_sweep(ROOT / table, smoke=True)
    return base, [j for j in jobs if j.seed in seeds]


def run_smoke(table: str, out: Path) -> list[dict]:
    base, jobs = smoke_jobs(table)
    return [train(load_config(base, j.overrides), out / j.label / f"seed{j.seed}", progress=False)
            for j in jobs]


def test_every_table_has_a_header_and_the_thesis_rows():
    assert [Path(t).name for t in TABLES] == [f"table_3_{i}.yaml" for i in range(1, 6)]
    for table in TABLES:
        text = (ROOT / table).read_text()
        assert text.startswith(f"# sparsegrow sweep {table}\n")
        assert "Scaling" in text and "cifar100" in text and "Time:" in text
        _, jobs = sweep.load_sweep(ROOT / table)
        labels = {thesis.model_label(load_config(ROOT / "configs/thesis/wrn_fmnist.yaml", j.overrides).to_dict())
                  for j in jobs}
        assert {"basic", "pruned", "SET", "RigL"} <= labels
        assert labels & {"pruned + bruteforce", "pruned + faiss", "pruned + lsh"}
        # the rows that carry a claim have 3 seeds: exact search ("bruteforce") everywhere, and
        # the static baseline where the table defines it (3.2 and 3.4 repeat 3.1's at one seed)
        seeds = {}
        for j in jobs:
            seeds.setdefault(j.label, set()).add(j.seed)
        claim = [k for k in seeds if k.startswith("bruteforce_K")]
        if not table.endswith(("3_2.yaml", "3_4.yaml")):
            claim.append("pruned")
        assert claim and all(seeds[k] == {0, 1, 2} for k in claim), seeds


@pytest.mark.parametrize("table", TABLES)
def test_smoke_size_of_every_table_runs(table, tmp_path):
    # ~15-20 s per table at seed 0 on 2 cores: every row kind of every table (exact, faiss-hnsw,
    # LSH, SET, RigL, unsketched, ΔT=epoch) runs in the default suite, i.e. in CI.
    summaries = run_smoke(table, tmp_path)
    _, jobs = smoke_jobs(table)
    assert len(summaries) == len(jobs)
    for s in summaries:
        assert 0.0 <= s["test_acc"] <= 1.0
        if s["method"] not in ("dense", "static"):
            assert s["n_updates"] >= 1
    runs = [load_run(d) for d in find_runs([tmp_path])]
    table_md = thesis.thesis_report(runs)
    assert table_md.count("\n") == len({thesis.row_key(r) for r in runs}) + 2
    if table.endswith("3_1.yaml"):  # the unsketched bruteforce check is its own row
        assert "| sketch |" in table_md.splitlines()[0] and "| 0 |" in table_md


def test_report_reproduces_the_committed_table(capsys):
    runs = [load_run(d) for d in find_runs([FIXTURE])]
    assert len(runs) == sum(len(s) for rows in FIXTURE_ROWS.values() for _, s in rows)
    assert thesis.thesis_report(runs) == EXPECTED.read_text()
    assert main(["report", "--thesis", str(FIXTURE)]) == 0
    assert capsys.readouterr().out == EXPECTED.read_text()


def test_thesis_columns_and_delta_vs_pruned():
    runs = [load_run(d) for d in find_runs([FIXTURE])]
    lines = thesis.thesis_report(runs).splitlines()
    assert lines[0] == "| " + " | ".join(thesis.COLUMNS) + " |"
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in lines[2:]}
    assert list(rows) == ["basic", "pruned", "pruned + bruteforce", "pruned + faiss", "pruned + lsh", "SET", "RigL"]
    assert rows["pruned"][7] == "—" and rows["basic"][1] == "0" and rows["pruned"][1] == "80"
    assert rows["pruned + lsh"][4] == "1" and rows["pruned + faiss"][3] == "0.15"
    # Δacc = mean acc - mean acc of pruned, recomputed from the summaries
    acc = {}
    for r in runs:
        acc.setdefault(thesis.model_label(r["config"]), []).append(100 * r["summary"]["test_acc"])
    mean = {k: sum(v) / len(v) for k, v in acc.items()}
    assert float(rows["RigL"][7]) == pytest.approx(mean["RigL"] - mean["pruned"], abs=0.006)


@pytest.mark.parametrize("kind", ["acc-vs-k", "recall"])
def test_thesis_plots(kind, tmp_path):
    out = tmp_path / f"{kind}.png"
    assert main(["plot", kind, str(FIXTURE), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000


def test_recall_curve_reads_update_records():
    run = load_run(FIXTURE / "faiss_ks0.15_K0.01/seed0")
    steps, recalls = thesis.recall_curve(run)
    assert steps and steps == sorted(steps) and all(0.0 <= r <= 1.0 for r in recalls)
    exact = load_run(FIXTURE / "bruteforce_K0.01/seed0")
    assert all(r == pytest.approx(1.0) for r in thesis.recall_curve(exact)[1])


def regenerate_fixture() -> None:
    """Rerun the fixture's smoke runs and rewrite the fixture and the expected table."""
    shutil.rmtree(FIXTURE, ignore_errors=True)
    for table, rows in FIXTURE_ROWS.items():
        base, jobs = sweep.load_sweep(ROOT / "configs/thesis" / table, smoke=True)
        want = {(label, s) for label, seeds in rows for s in seeds}
        for j in jobs:
            if (j.label, j.seed) in want:
                d = FIXTURE / j.label / f"seed{j.seed}"
                train(load_config(base, j.overrides), d, progress=False)
                (d / "checkpoint.pt").unlink()
    runs = [load_run(d) for d in find_runs([FIXTURE])]
    EXPECTED.write_text(thesis.thesis_report(runs))
    print(EXPECTED.read_text())


if __name__ == "__main__":
    sys.exit(regenerate_fixture())


def test_time_breakdown_takes_search_and_signal_out_of_update_and_backward(tmp_path):
    from sparsegrow.experiments.plots import phase_breakdown

    cfg = load_config(None, ["data.dataset=digits", "model.name=mlp", "model.kwargs={hidden: [32]}",
                             "train.epochs=1", "train.batch_size=64", "sparsity.method=search",
                             "sparsity.update_every=4", "signal.sketch_dim=8", "train.threads=1"])
    summary = train(cfg, tmp_path / "r", progress=False)
    parts = phase_breakdown(load_run(tmp_path / "r"))
    assert {"grow signal", "search", "recall measure", "apply"} <= set(parts) and "update" not in parts
    assert parts["grow signal"] > 0 and parts["search"] > 0
    assert sum(parts.values()) == pytest.approx(sum(summary["phases_s"].values()), rel=1e-6)
    static = load_config(None, ["data.dataset=digits", "model.name=mlp", "model.kwargs={hidden: [32]}",
                                "train.epochs=1", "sparsity.method=set", "sparsity.update_every=4", "train.threads=1"])
    train(static, tmp_path / "s", progress=False)
    assert set(phase_breakdown(load_run(tmp_path / "s"))) == {"forward", "backward", "optimizer", "update"}


def test_runs_repeated_across_tables_count_once():
    # table 3.2 reruns 3.1's pruned at seed 0: plotted together, that seed must not count twice
    runs = [load_run(d) for d in find_runs([FIXTURE])]
    once = {k: len(v) for k, v in thesis.group(runs).items()}
    assert {k: len(v) for k, v in thesis.group(runs + [dict(r) for r in runs]).items()} == once
    assert max(once.values()) == 2  # the fixture's two-seed rows stay two


def test_generic_grouping_tells_search_settings_apart():
    # LSH runs that differ only in bits (or k_similar, or sketch size) are different rows, not seeds
    from sparsegrow.experiments.report import group_runs

    run = load_run(FIXTURE / "faiss_ks0.15_K0.01/seed0")
    variants = []
    for change in ({}, {"k_similar": 0.2}, {"backend": "lsh", "bits": 1}, {"backend": "lsh", "bits": 2}):
        cfg = {**run["config"], "search": {**run["config"]["search"], **change}}
        variants.append({**run, "config": cfg})
    assert len(group_runs(variants)) == 4
    assert "bits=2" in dict(list(group_runs(variants))[3])["method"]
    # ... and so are runs that differ only in storage or in accumulating the signal
    sp, sig = run["config"]["sparsity"], run["config"].get("signal", {})
    more = [{**run, "config": {**run["config"], "sparsity": {**sp, "storage": "sparse"}}},
            {**run, "config": {**run["config"], "signal": {**sig, "sketch_dim": 64, "accumulate": True}}},
            {**run, "config": {**run["config"], "signal": {**sig, "sketch_dim": 64, "accumulate": False}}}]
    labels = [dict(k)["method"] for k in group_runs([run] + more)]
    assert len(labels) == 4 and labels[1].endswith(" (sparse)") and ",acc]" in labels[2], labels
