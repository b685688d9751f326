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
echo "### Experiment 2: equal parameter budget"
$SG report runs/width_budget --ci --itop
echo "### Experiment 3, pilot"
$SG report runs/thesis_cnn_pilot
