#!/usr/bin/env bash
# The whole benchmark suite on one GPU in a single call of under 8 minutes,
# for a short GPU lease. Run from the repository root:
#
#     bash benchmarks/gpu_suite.sh [PYTHON]
#
# Needs JAX with CUDA and PyTorch with CUDA in PYTHON's environment (default
# python3); both checked first. Writes JSON lines to $OUT (or /tmp)/gpu_suite.jsonl
# and prints a compact table with the card's name at the end. Each part has its
# own time limit so one slow part cannot eat the lease; a part that times out
# is reported, the rest still run.
set -uo pipefail

PY=${1:-python3}
OUTDIR=${OUT:-/tmp}
JSON="$OUTDIR/gpu_suite.jsonl"
LOG="$OUTDIR/gpu_suite.log"
: >"$JSON"
: >"$LOG"
# Compiled programs survive between parts and reruns.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/vgg_jax_cache}
export TF_CPP_MIN_LOG_LEVEL=2
# JAX and PyTorch share the card: no up-front 75% grab by JAX.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
START=$(date +%s)

$PY - <<'PY' || { echo "gpu_suite: JAX or PyTorch cannot see the GPU; nothing measured." >&2; exit 2; }
import jax, torch
gpus = [d for d in jax.devices() if d.platform == "gpu"]
assert gpus, f"JAX sees no GPU: {jax.devices()}"
assert torch.cuda.is_available(), "PyTorch sees no CUDA device"
print("card:", gpus[0].device_kind, "| jax", jax.__version__, "| torch", torch.__version__)
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true

part() {  # part SECONDS MODULE ARGS...: one benchmark run under a time limit
  local limit=$1; shift
  echo "== $* (limit ${limit}s, $(( $(date +%s) - START ))s elapsed)" | tee -a "$LOG"
  if ! timeout "$limit" "$PY" -m "$@" --json-out "$JSON" >>"$LOG" 2>&1; then
    echo "   part failed or timed out: $*" | tee -a "$LOG"
  fi
}

# The issue's goal: VGG16 (D), bf16, batch 256 per device, vs PyTorch AMP channels-last.
part 150 benchmarks.train_throughput --models D --dtype bfloat16 --batch 256 \
  --steps 10 --repeats 5 --warmup 3
# The other configs, fewer repeats; and D in float32 (TF32 on both sides).
part 150 benchmarks.train_throughput --models A,E --dtype bfloat16 --batch 256 \
  --steps 5 --repeats 3 --warmup 2
part 70 benchmarks.train_throughput --models D --dtype float32 --batch 128 \
  --steps 5 --repeats 3 --warmup 2
# Inference: single crop and dense Q = 256/384/512.
part 100 benchmarks.eval_throughput --models D --dtype bfloat16 --batch 256 --dense-batch 32 \
  --steps 5 --repeats 3 --warmup 2

echo
echo "== summary ($(( $(date +%s) - START ))s)"
$PY - "$JSON" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
if not rows:
    sys.exit("no results")
print(f"card: {rows[0]['device']}")
print(f"{'bench':5} {'model':5} {'mode':10} {'dtype':8} {'batch':>5} {'impl':22} "
      f"{'img/s':>8} {'vs torch':>8} {'MFU':>6} {'compile':>7} {'GiB':>6}")
for r in rows:
    mode = r.get("mode", "train") + (f" {r['input_size']}" if r.get("mode") == "dense" else "")
    mem = r.get("peak_bytes") or 0
    fmt = lambda v, f: format(v, f) if v is not None else "-"
    print(f"{r['bench']:5} {r['model']:5} {mode:10} {r['dtype']:8} {r['batch']:>5} "
          f"{r['impl']:22} {r['images_per_s']:>8.0f} {fmt(r.get('vs_torch_best'), '8.2f')} "
          f"{fmt(r.get('mfu'), '6.1%')} {fmt(r.get('compile_s'), '7.1f')} {mem / 2**30:>6.1f}")
PY
