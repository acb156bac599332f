#!/usr/bin/env bash
# The CPU measurements recorded in benchmarks/RESULTS.md, at the probe's
# settings (issue 7): VGG-A, conv widths / 4, FC 1024, 1 input channel,
# 10 classes, batch 64, 32 and 64 px; vgg_jax's lax and fast formulations
# interleaved with PyTorch (float32, default layout and channels-last).
# Then the same without the XLA:CPU flag, and inference (single crop, and
# dense evaluation at Q = 256/384/512 of the same width at 224).
# Usage: bash benchmarks/cpu_suite.sh [PYTHON] > log; JSON lines go to $OUT/cpu_suite.jsonl.
# Each jaxlib version's choices (vgg_jax/backend.py, CPU_CHOICES) come from these runs.
set -uo pipefail
PY=${1:-python3}
JSON=${OUT:-/tmp}/cpu_suite.jsonl
: >"$JSON"
PROBE="--models A --width-divisor 4 --fc-width 1024 --channels 1 --num-classes 10 --batch 64"
# Without the torch extra (CI's Python >= 3.12 stack) the JAX side still runs.
if ! $PY -c "import torch" 2>/dev/null; then
  echo "[cpu_suite] PyTorch is not importable with $PY: timing vgg_jax only" >&2
  PROBE="$PROBE --torch none"
fi
for size in 32 64; do
  $PY -m benchmarks.train_throughput $PROBE --image-size $size --formulation lax,fast \
    --steps 3 --repeats 7 --json-out "$JSON"
  VGG_JAX_CPU_FLAGS=0 $PY -m benchmarks.train_throughput $PROBE --image-size $size \
    --formulation lax,fast --steps 3 --repeats 5 --json-out "$JSON"
  $PY -m benchmarks.eval_throughput $PROBE --image-size $size --scales "" \
    --formulation lax,fast --steps 3 --repeats 7 --json-out "$JSON"
done
$PY -m benchmarks.eval_throughput $PROBE --image-size 224 --batch 8 --dense-batch 4 \
  --scales 256,384,512 --steps 2 --repeats 3 --json-out "$JSON"
