#!/usr/bin/env bash
# Run the step / conv / sampled-grow benchmarks once on a CUDA machine (fast settings).
# Each under `timeout 150`, output to $OUT/bench_<name>.txt; a failure does not stop the rest.
set -u
OUT=${OUT:-/tmp/device_bench}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export SPARSEGROW_CACHE=${SPARSEGROW_CACHE:-/tmp/sparsegrow-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.txt" 2>&1 || true

run() {  # run NAME ARGS...
    local name=$1; shift
    local t0=$SECONDS
    echo "== $name: $PY $*" | tee "$OUT/bench_$name.txt"
    timeout "${BENCH_TIMEOUT:-150}" "$PY" "$@" >> "$OUT/bench_$name.txt" 2>&1
    local rc=$?
    echo "== $name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$OUT/bench_$name.txt"
}

# BENCHES: which to run (default all); SPARSE_STEP_ARGS: the step benchmark's sizes
for b in ${BENCHES:-sparse_step sparse_conv sampled_grow}; do
  case $b in
    sparse_step) run sparse_step benchmarks/bench_sparse_step.py --device cuda \
        ${SPARSE_STEP_ARGS:---widths 4096 16384 65536 --densities 0.1 0.01 0.001} --repeats 5 \
        --json "$OUT/bench_sparse_step.json" ;;
    sparse_conv) run sparse_conv benchmarks/bench_sparse_conv.py --device cuda \
        --nets wrn-10-1 wrn-28-5 --repeats 5 --repeats-large 5 ;;
    sampled_grow) run sampled_grow benchmarks/bench_sampled_grow.py --device cuda \
        --sizes 16384 65536 --densities 0.01 0.001 --repeats 1 ;;
  esac
done
exit 0
