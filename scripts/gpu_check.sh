#!/usr/bin/env bash
# The GPU check: one script, under 8 minutes on one H200.
#
#   scripts/gpu_check.sh [RESULTS_DIR]      (default: $OUT if set, else gpu-check-results)
#
# 1. the FLUX-shaped bench (mixgrpo bench --flux-shaped: real FLUX width, random weights;
#    iteration time, model passes and peak GPU memory per preset),
# 2. a 1-process torchrun smoke run with model.device=cuda, and an NCCL collective,
# 3. the GPU-capable tests (tests/test_gpu.py, the FLUX-shaped bench test, pipeline parity,
#    the device-choice tests).
# Every step writes its log to RESULTS_DIR and one line to RESULTS_DIR/results.md; the script
# exits non-zero if a step failed. Without CUDA it writes "skipped: no CUDA GPU" and exits 0.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RES="${1:-${OUT:-gpu-check-results}}"
mkdir -p "$RES"
RES="$(cd "$RES" && pwd)"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="python3"; fi
fi
cd "$ROOT"
SUMMARY="$RES/results.md"
: > "$SUMMARY"
FAILED=0

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME SECONDS COMMAND...: run with a time limit, log to RES/NAME.log, one line in results.md
step() {
  local name="$1" limit="$2"; shift 2
  local start end rc
  start=$(date +%s)
  timeout --signal=TERM --kill-after=20 "$limit" "$@" > "$RES/$name.log" 2>&1
  rc=$?
  end=$(date +%s)
  if [[ $rc -eq 0 ]]; then
    note "- $name: ok ($((end - start)) s)"
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
    note "- $name: TIMEOUT after ${limit} s (log: $name.log)"; FAILED=1
  else
    note "- $name: FAILED rc=$rc ($((end - start)) s; log: $name.log)"; FAILED=1
  fi
  return 0
}

note "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
note "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  note "skipped: no CUDA GPU (torch.cuda.is_available() is False)"
  exit 0
fi
"$PY" - >> "$SUMMARY" 2>&1 <<'EOF'
import torch
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} GPU(s)")
EOF
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

# 1. FLUX-shaped bench: 2 double + 2 single blocks at FLUX.1's width (hidden 3072), 512 px,
#    bf16; 3 presets x 3 iterations (costs only: the weights are random)
step flux-bench 240 "$PY" -m mixgrpo bench --flux-shaped --out "$RES/flux-bench" \
  --presets dance-grpo,mixgrpo,mixgrpo-flash --iterations 3
if [[ -f "$RES/flux-bench/bench.md" ]]; then
  { echo; cat "$RES/flux-bench/bench.md"; echo; } >> "$SUMMARY"
fi

# 2. torchrun, one process, NCCL: a smoke run of the tiny model on the GPU, then a collective
step torchrun-smoke 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m mixgrpo train \
  --out "$RES/smoke-run" --preset mixgrpo --set model.device=cuda --set iterations=2 \
  --set prompts_per_iter=2 --set group_size=4 --set eval_prompts=8 --set eval_every=2 --set checkpoint_every=2
if [[ -f "$RES/smoke-run/summary.json" ]]; then
  { echo; echo '```json'; cat "$RES/smoke-run/summary.json"; echo '```'; } >> "$SUMMARY"
fi

# 3. the GPU-capable tests (test_gpu.py runs the NCCL collective under torchrun)
step gpu-tests 150 "$PY" -m pytest -q -p no:cacheprovider -s tests/test_gpu.py tests/test_pipeline_parity.py \
  "tests/test_bench.py::test_flux_shaped_gpu_mode_runs_the_real_model_path" \
  tests/test_distributed.py -k "gpu or collectives or gloo or parity or flux_shaped or training_runs"
grep -E "parity on cuda|passed|failed|error" "$RES/gpu-tests.log" | tail -5 | sed 's/^/    /' >> "$SUMMARY"

note "result: $([[ $FAILED -eq 0 ]] && echo 'all steps ok' || echo 'some steps FAILED')"
echo "results in $SUMMARY"
exit $FAILED
