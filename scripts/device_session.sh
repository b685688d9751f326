#!/usr/bin/env bash
# One GPU-machine session: CUDA tests, issue 14's WRN acceptance on the GPU, CUDA benchmarks,
# and issue 16's LeNet sweep on spare CPU cores. Results are packed into $OUT at the end.
# Needs: the Fashion-MNIST gz files under .data/fashion-mnist (carried), torch with CUDA.
# Knobs (env): DEADLINE (s), LENET_JOBS, LENET_ROWS, WRN_ROWS, WRN_JOBS, BENCHES, BENCH_TIMEOUT.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 SPARSEGROW_DATA_ROOT=$PWD/.data SPARSEGROW_CACHE=/tmp/sgc
PY=python3
export PYTHON=python3  # device_bench.sh; the GPU image has python3 only
DEADLINE=${DEADLINE:-420}
export BENCH_TIMEOUT=${BENCH_TIMEOUT:-100}
LENET_JOBS=${LENET_JOBS:-6}
WRN_JOBS=${WRN_JOBS:-8}
R=/tmp/devout  # collected here, packed into $OUT at the end (at most 8 files come back)
mkdir -p "$R"
{ nvidia-smi; $PY -c "import torch;print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; nproc; } > "$R/machine.txt" 2>&1
LENET=
if [ -n "${LENET_ROWS:-}" ]; then  # issue 16 on CPU cores (device=cpu, one thread per run)
  $PY -m sparsegrow sweep configs/sweeps/long_lenet.yaml train.device=cpu --no-progress \
    --jobs "$LENET_JOBS" --rows $LENET_ROWS > "$R/sweep_lenet.log" 2>&1 &
  LENET=$!
fi
WRN=
if [ -n "${WRN_ROWS:-}" ]; then  # issue 14 on the GPU
  $PY -m sparsegrow sweep configs/sweeps/wrn_sparse_conv.yaml train.device=cuda --no-progress \
    --jobs "$WRN_JOBS" --rows $WRN_ROWS > "$R/sweep_wrn.log" 2>&1 &
  WRN=$!
fi
timeout 150 $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider -rfEs > "$R/test_cuda.txt" 2>&1
echo "test_cuda rc=$? at $SECONDS s" | tee -a "$R/test_cuda.txt"
while [ -n "$WRN" ] && kill -0 $WRN 2>/dev/null && [ $SECONDS -lt $((DEADLINE - 120)) ]; do sleep 5; done
echo "wrn sweep running=$(kill -0 ${WRN:-0} 2>/dev/null && echo yes || echo no) at $SECONDS s" >> "$R/machine.txt"
BENCHES=${BENCHES:-sparse_step sparse_conv sampled_grow} OUT="$R" bash scripts/device_bench.sh > "$R/bench.log" 2>&1 &
BENCH=$!
while kill -0 $BENCH 2>/dev/null && [ $SECONDS -lt $DEADLINE ]; do sleep 5; done
echo "stopped at $SECONDS s" >> "$R/machine.txt"
kill -INT $LENET $WRN $BENCH 2>/dev/null; sleep 8; pkill -f sparsegrow 2>/dev/null; pkill -f benchmarks/ 2>/dev/null; pkill -f multiprocessing 2>/dev/null; sleep 2
# finished runs without checkpoints (small); unfinished LeNet runs with theirs (to resume here)
find runs -name summary.json | sed 's#/summary.json##' > /tmp/done.txt
tar czf "$OUT/results.tgz" -C /tmp devout \
  $(for d in $(cat /tmp/done.txt); do echo "-C $PWD $d/summary.json $d/metrics.jsonl $d/config.yaml"; done) 2>/dev/null
find runs/long_lenet -name checkpoint.pt 2>/dev/null | sed 's#/checkpoint.pt##' | grep -vxF -f /tmp/done.txt > /tmp/part.txt
[ -s /tmp/part.txt ] && tar cf - $(sed 's#$#/*#' /tmp/part.txt) | gzip -1 | split -b 15M - "$OUT/partial.tgz."
ls -la "$OUT"
