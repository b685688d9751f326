"""report --paired: each row's accuracy difference to a reference method's row, paired by seed."""
import statistics

import pytest

from sparsegrow.experiments.report import grouped_table, paired_difference


def _run(method: str, seed: int, acc: float, density: float = 0.01) -> dict:
    cfg = {"model": {"name": "lenet300100"}, "train": {"epochs": 10},
           "sparsity": {"method": method, "fraction": 0.3, "update_every": 100, "distribution": "erk"},
           "search": {"backend": "exact", "metric": "abs_ip", "k_similar": 0.15, "bits": 1.0},
           "signal": {}}
    summ = {"seed": seed, "test_acc": acc, "density": density, "epochs": 10, "train_time_s": 1.0,
            "update_time_s": 0.1, "itop": density * (1 if method == "static" else 3 + seed)}
    return {"config": cfg, "summary": summ, "dir": None}


def test_paired_difference_is_the_t_interval_of_the_per_seed_differences():
    a = {0: 80.0, 1: 82.0, 2: 81.0, 7: 50.0}  # seed 7 has no partner: left out
    b = {0: 79.0, 1: 80.5, 2: 80.0, 3: 10.0}
    n, mean, lo, hi = paired_difference(a, b)
    d = [1.0, 1.5, 1.0]
    h = 4.303 * statistics.stdev(d) / 3 ** 0.5  # t(0.975, 2 df)
    assert n == 3 and mean == pytest.approx(statistics.mean(d))
    assert (lo, hi) == pytest.approx((statistics.mean(d) - h, statistics.mean(d) + h))
    assert paired_difference({0: 1.0}, {0: 2.0}) is None


def test_paired_table_compares_within_density_and_gives_a_verdict():
    runs = []
    for s in range(3):
        runs += [_run("static", s, 0.5, density=0.05),  # another density (first): never the reference
                 _run("static", s, 0.80 + 0.01 * s), _run("rigl", s, 0.82 + 0.01 * s + 0.001 * (s % 2)),
                 _run("set", s, 0.80 + 0.01 * s + (0.01 if s == 1 else -0.005))]
    table = grouped_table(runs, paired="static")
    rows = {r.split(" | ")[1]: r for r in table.splitlines()[2:] if "0.01" in r}
    assert "(reference)" in rows["static"]
    assert "+2.03 [" in rows["rigl"] and rows["rigl"].rstrip(" |").endswith("higher")
    assert rows["set"].rstrip(" |").endswith("no difference")
    other = [r for r in table.splitlines()[2:] if "| 0.05 |" in r]
    assert len(other) == 1 and "(reference)" in other[0]


def test_itop_column_is_the_mean_final_itop_of_the_row():
    runs = [_run("set", s, 0.8) for s in range(3)] + [_run("static", s, 0.8) for s in range(3)]
    table = grouped_table(runs, itop=True).splitlines()
    assert table[0].split(" | ")[-2] == "ITOP"
    cells = {r.split(" | ")[1]: r.split(" | ")[-2] for r in table[2:]}
    assert cells == {"set": "0.0400 ± 0.0100", "static": "0.0100 ± 0.0000"}


def test_models_of_other_sizes_are_other_rows():
    """Runs of one model name with other kwargs (widths, depth) are never averaged as seeds."""
    runs = [_run("static", s, 0.8) for s in range(2)]
    wide = [_run("static", s, 0.9) for s in range(2)]
    for r in wide:
        r["config"]["model"] = {"name": "lenet300100", "kwargs": {"hidden": [1000, 1000]}}
    labels = [r.split(" | ")[0].lstrip("| ") for r in grouped_table(runs + wide).splitlines()[2:]]
    assert labels == ["lenet300100", "lenet300100(hidden=1000x1000)"]


@pytest.mark.parametrize("backend, label", [
    ("exact", "search[exact,abs_ip]"), ("auto", "search[auto,abs_ip]"),
    ("lowrank", "search[lowrank,abs_ip]"), ("sample-wedge", "search[sample-wedge,abs_ip]"),
    ("lsh", "search[lsh,abs_ip,ks=0.15,bits=1]")])
def test_search_labels_name_only_the_knobs_the_backend_uses(backend, label):
    """k_similar shapes only the per-query index searches; a label showing it for exact, auto,
    lowrank or a sampler would tell runs apart by a knob they never read."""
    runs = [_run("search", 0, 0.8)]
    runs[0]["config"]["search"]["backend"] = backend
    assert grouped_table(runs).splitlines()[2].split(" | ")[1] == label
