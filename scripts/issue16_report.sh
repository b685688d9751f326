#!/usr/bin/env bash
# Tables and figures of issue 16's experiments from the runs present (partial sweeps included):
#   bash scripts/issue16_report.sh > /tmp/issue16.md
set -eu
SG="${PYTHON:-python} -m sparsegrow"
echo "### Experiment 1: LeNet-300-100, 100 epochs"
$SG report runs/long_lenet --ci --itop --paired static
for d in 0.05 0.01 0.005; do
  dirs=$(ls -d runs/long_lenet/*-d$d runs/long_lenet/dense 2>/dev/null)
  $SG plot accuracy $dirs --out docs/figures/long_lenet_d${d}_accuracy.png >&2 || true
done
echo
echo "Experiment 1, between rules (paired by seed, 95% CI):"
${PYTHON:-python} - <<'PY'
import json
from pathlib import Path
from sparsegrow.experiments.report import paired_difference

def acc(label):
    out = {}
    for f in Path("runs/long_lenet", label).glob("seed*/summary.json"):
        s = json.loads(f.read_text())
        out[s["seed"]] = 100 * s["test_acc"]
    return out

print("| comparison | density | Δ acc (pp) | 95% CI | pairs | verdict |")
print("|---|---|---|---|---|---|")
for d in ("0.05", "0.01", "0.005"):
    for a, b in (("set", "rigl"), ("search", "rigl"), ("search-acc", "rigl"), ("search-wedge", "rigl"),
                 ("search-wedge", "search"), ("search", "set")):
        got = paired_difference(acc(f"{a}-d{d}"), acc(f"{b}-d{d}"))
        if got is None:
            print(f"| {a} − {b} | {d} | - | - | <2 | |")
            continue
        n, m, lo, hi = got
        verdict = "no difference" if lo <= 0 <= hi else ("higher" if lo > 0 else "lower")
        print(f"| {a} − {b} | {d} | {m:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {n} | {verdict} |")
PY
echo "### Experiment 2: equal parameter budget"
$SG report runs/width_budget --ci --itop
echo "### Experiment 3, pilot"
$SG report runs/thesis_cnn_pilot
echo "### Experiment 3: the thesis's claim rows, conv8-conv16-fc32, 10 epochs"
$SG report runs/thesis_claims_cnn --ci --itop --paired static
echo
echo "Pairwise claims (paired by seed, 95% CI):"
${PYTHON:-python} - <<'PY'
import json
from pathlib import Path
from sparsegrow.experiments.report import paired_difference

def acc(label):
    out = {}
    for f in Path("runs/thesis_claims_cnn", label).glob("seed*/summary.json"):
        s = json.loads(f.read_text())
        out[s["seed"]] = 100 * s["test_acc"]
    return out

print("| comparison | density | Δ acc (pp) | 95% CI | pairs | verdict |")
print("|---|---|---|---|---|---|")
for d in ("0.2", "0.1"):
    for a, b in (("search-absip", "static"), ("search-l2", "static"), ("search-absip", "search-l2"),
                 ("search-absip", "set"), ("search-absip", "rigl"), ("set", "rigl"),
                 ("dense", "static")):
        la = a if a == "dense" else f"{a}-d{d}"
        got = paired_difference(acc(la), acc(f"{b}-d{d}"))
        if got is None:
            print(f"| {a} − {b} | {d} | - | - | <2 | |")
            continue
        n, m, lo, hi = got
        verdict = "no difference" if lo <= 0 <= hi else ("higher" if lo > 0 else "lower")
        print(f"| {a} − {b} | {d} | {m:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {n} | {verdict} |")
PY
for d in 0.2 0.1; do
  dirs=$(ls -d runs/thesis_claims_cnn/*-d$d runs/thesis_claims_cnn/dense 2>/dev/null)
  $SG plot accuracy $dirs --out docs/figures/thesis_claims_cnn_d${d}_accuracy.png >&2 || true
done
