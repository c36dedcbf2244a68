#!/usr/bin/env bash
# The GPU check of the triton backend (issue 3), in one call on a CUDA machine without network:
#   1. build the package in place (CPU extension only: the triton backend needs no CUDA extension)
#   2. the GPU test module (tests/test_triton_gpu.py) with compiled kernels
#   3. benchmarks/triton_speed.py (the issue's speed targets), then benchmarks/throughput.py at
#      layer level if it is present
# Every step's output goes to files in benchmarks/results/gpu_<stamp>; when $OUT is set (the device
# tool's folder, which brings back at most 8 files) that folder is also packed into
# $OUT/gpu_check_triton.tgz, with summary.txt and triton_speed.md beside it.
# Each step has its own time limit so that a slow one cannot eat the others' time.
# Usage: bash benchmarks/gpu_check_triton.sh [quick]   (quick: bf16 only, batch 64 and 1, 3 rounds)
set -u
cd "$(dirname "$0")/.."
OUTDIR="benchmarks/results/gpu_$(date +%Y%m%d_%H%M%S)"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 IMSE_CUDA=0
export IMSE_TRITON_CACHE="$OUTDIR/triton_choices.json"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
log() { echo "== $(date +%T) $*" | tee -a "$OUTDIR/summary.txt"; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
} > "$OUTDIR/env.txt" 2>&1
log "env: $(tail -1 "$OUTDIR/env.txt")"

timeout 240 python setup.py build_ext --inplace > "$OUTDIR/build.txt" 2>&1
log "build rc=$?"

timeout 300 python -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py -rA > "$OUTDIR/gpu_tests.txt" 2>&1
log "gpu tests rc=$? $(tail -1 "$OUTDIR/gpu_tests.txt")"

if [ "${1:-}" = "quick" ]; then SPEED_ARGS="--dtypes bf16 --rounds 3"; else SPEED_ARGS="--rounds 5"; fi
timeout 300 python benchmarks/triton_speed.py $SPEED_ARGS --out "$OUTDIR" > "$OUTDIR/triton_speed.txt" 2>&1
log "triton_speed rc=$?"

if [ -f benchmarks/throughput.py ]; then
  timeout 240 python benchmarks/throughput.py --device cuda --level layer --out-dir "$OUTDIR" > "$OUTDIR/throughput.txt" 2>&1
  log "throughput rc=$?"
fi
log "done: $OUTDIR"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu_check_triton.tgz" "$OUTDIR"
  cp "$OUTDIR/summary.txt" "$OUT/"
  [ -f "$OUTDIR/triton_speed.md" ] && cp "$OUTDIR/triton_speed.md" "$OUT/"
fi
