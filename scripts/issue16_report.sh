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
${PYTHON:-python} scripts/paired_rules.py runs/long_lenet --densities 0.05 0.01 0.005 \
  --pairs set:rigl search:rigl search-acc:rigl search-wedge:rigl search-wedge:search search:set
echo "### Experiment 2: equal parameter budget"
$SG report runs/width_budget --ci --itop
echo
echo "Experiment 2, paired by seed (95% CI):"
${PYTHON:-python} scripts/paired_rules.py runs/width_budget --pairs \
  set-w1000:dense-lenet set-w4000:dense-lenet set-w16000:dense-lenet \
  search-w1000:dense-lenet search-w4000:dense-lenet search-w16000:dense-lenet \
  set-w4000:set-w1000 set-w16000:set-w4000 search-w4000:search-w1000 search-w16000:search-w4000 \
  search-w1000:set-w1000 search-w4000:set-w4000 search-w16000:set-w16000
$SG plot accuracy $(ls -d runs/width_budget/*) --out docs/figures/width_budget_accuracy.png >&2 || true
echo "### Experiment 3, pilot"
$SG report runs/thesis_cnn_pilot
echo "### Experiment 3: the thesis's claim rows, conv8-conv16-fc32, 10 epochs"
$SG report runs/thesis_claims_cnn --ci --itop --paired static
echo
echo "Pairwise claims (paired by seed, 95% CI):"
${PYTHON:-python} scripts/paired_rules.py runs/thesis_claims_cnn --densities 0.2 0.1 \
  --pairs search-absip:static search-l2:static search-absip:search-l2 search-absip:set \
  search-absip:rigl set:rigl dense:static
for d in 0.2 0.1; do
  dirs=$(ls -d runs/thesis_claims_cnn/*-d$d runs/thesis_claims_cnn/dense 2>/dev/null)
  $SG plot accuracy $dirs --out docs/figures/thesis_claims_cnn_d${d}_accuracy.png >&2 || true
done
