#!/usr/bin/env bash
# The GPU checks of issue 3 as one call on a lent GPU machine (a device session has about
# 15 minutes of device time, its start included): compiled GPU tests, an interleaved A/B of
# the weight-gradient kernels (Triton tgmm, our Hopper tgmm, JAX's), the GPU gmm table, and the
# GPU MoE-layer table. Each stage gets its own time limit, cut to what is left of
# the whole budget, so the script ends inside the call's limit and what finished comes back.
#
# Usage (from the repository root; OUT is the folder whose files come back):
#   OUT=/tmp/out bash benchmarks/device_check.sh [STAGE ...]
# Stages: env tests tgmm gmm layer (default: all five, in that order). JMOE_DEVICE_BUDGET
# (seconds, default 510) bounds the whole run.
#
# Files under $OUT: env.txt, tests.log, mgpu_ab.md + tgmm.log, gmm.md + gmm.log, BENCHMARKS.md
# (a copy whose "moe layer (GPU)" section the layer stage rewrote) + layer.log, summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/jmoe_device}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BUDGET="${JMOE_DEVICE_BUDGET:-510}"
START=$SECONDS
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env tests tgmm gmm layer)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

# run STAGE CAP_SECONDS LOG COMMAND...: runs COMMAND under min(CAP, what is left), logs it.
run() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 20 ]; then
    echo "$name: skipped (${left}s left of ${BUDGET}s)" | tee -a "$SUMMARY"
    return
  fi
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  local note="rc=$rc"
  [ "$rc" -eq 124 ] && note="timed out at ${limit}s"
  echo "$name: $note in $((SECONDS - t0))s; $(tail -n 1 "$OUT/$log")" | tee -a "$SUMMARY"
}

for stage in "${STAGES[@]}"; do
  case "$stage" in
    env)
      run env 60 env.txt bash -c 'nvidia-smi; python3 -c "import jax, jaxlib;
print(\"jax\", jax.__version__, \"jaxlib\", jaxlib.__version__, jax.devices())
import torch; print(\"torch\", torch.__version__, hasattr(torch, \"_grouped_mm\"))"'
      ;;
    tests)
      # Compiled GPU tests only (the interpreted ones run in CI on CPU).
      run tests 240 tests.log python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 200 \
        tests/pallas_kernels/test_gmm.py tests/pallas_kernels/test_gmm_mosaic_gpu.py \
        tests/pallas_kernels/test_dispatch.py tests/sharding/test_expert_parallel.py
      ;;
    tgmm)
      # Random routing: group bounds inside row blocks (the Hopper kernel's masked steps).
      run tgmm 150 tgmm.log python3 benchmarks/gmm_mgpu_ab.py --kinds tgmm --routing random \
        --rounds 3 --out "$OUT"
      ;;
    gmm)
      run gmm 200 gmm.log python3 benchmarks/gmm.py --gpu --out "$OUT/gmm.md"
      ;;
    layer)
      cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
      run layer 240 layer.log python3 benchmarks/moe_layer.py --gpu --repeats 3 \
        --malloc default --write "$OUT/BENCHMARKS.md"
      ;;
    *)
      echo "unknown stage '$stage': allowed env, tests, tgmm, gmm, layer" >&2
      exit 2
      ;;
  esac
done
echo "--- summary ($((SECONDS - START))s of ${BUDGET}s)"
cat "$SUMMARY"
