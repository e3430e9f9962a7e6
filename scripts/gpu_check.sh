#!/usr/bin/env bash
# The first-GPU check (issue 22, section 5): on a machine with one H100 / H200, from the repo root,
# with the project installed (make setup). About 5-8 minutes. Figures go to $OUT (default
# ./gpu_check_out): one .log (what was printed) and one .json (the figures) per part; paste them
# into the README's "Benchmarks" section.
#   scripts/gpu_check.sh            the whole check on the GPU
#   scripts/gpu_check.sh --smoke    the same parts, tiny and on the CPU (to check the script runs)
set -uo pipefail
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

if [ "${1:-}" = "--smoke" ]; then
  DEV=cpu; GEMM=(--small); ARCH=tiny-qwen2.5-vl; BATCHES=1,2; TOKENS=4; REPEATS=1
else
  DEV=cuda; GEMM=(); ARCH=qwen2.5-vl-7b; BATCHES=1,8,32; TOKENS=32; REPEATS=3
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1 || true
fi

failed=0
part() {  # part NAME LIMIT_S ARGS...: one part, in its own process, bounded in time
  local name=$1 limit=$2; shift 2
  echo "== $name"
  if timeout "$limit" "$PY" "$@" --json 2>&1 | tee "$OUT/$name.log"; then
    tail -n 1 "$OUT/$name.log" > "$OUT/$name.json"
  else
    echo "!! $name failed (see $OUT/$name.log)"; failed=1
  fi
}

part gemm 60 -m vreason_batch.bench.gpu gemm --device "$DEV" "${GEMM[@]}"
part agreement 120 -m vreason_batch.bench.gpu agreement --device "$DEV" --new-tokens "$TOKENS"
part step 300 -m vreason_batch.bench.gpu step --device "$DEV" --arch "$ARCH" --batches "$BATCHES" \
  --new-tokens "$TOKENS" --repeats "$REPEATS"
part ops 180 -m vreason_batch.cli bench --workload step --device "$DEV"  # ops and host syncs per step vs HF
echo "figures in $OUT/"
exit $failed
