#!/usr/bin/env bash
# Re-measure the benchmark table (docs/benchmarks.md) (`make bench-results`).
#
#   bash scripts/measure_benchmarks.sh [--runs N] [--only NAME ...]
#
# Runs every benchmark command of the table N times (default 3), interleaved (run 1 of each, then
# run 2 of each, ...) so that a change of load on a shared machine hits all of them alike, writes
# docs/results/bench/<name>_run<k>.json, then regenerates the table in docs/benchmarks.md from those files
# (`rgbt-seg bench table`). --only re-measures some rows (names: pipeline_micro pipeline_standin10
# model_sartm_tiny model_segrgbx_tiny replay_demo replay_micro memory_micro onnx_demo scale). Commit the JSON files with the
# page. About 3.5 minutes per run on a 2-core CPU; keep the machine otherwise idle meanwhile.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS=3
ONLY=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS="$2"; shift 2 ;;
    --only) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do ONLY+=("$1"); shift; done ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "measure_benchmarks.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
want() { [ ${#ONLY[@]} -eq 0 ] || [[ " ${ONLY[*]} " == *" $1 "* ]]; }

cd "$REPO"
BIN="${VENV:-$REPO/.venv}/bin"
export AMENT_PREFIX_PATH="${VENV:-$REPO/.venv}${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA HF_HUB_OFFLINE=1
OUT="$REPO/docs/results/bench"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT"

"$BIN/rgbt-seg" make-sample-bag "$TMP/sample" --frames 60 >/dev/null
if want replay_micro; then  # a micro checkpoint the project writes itself: one training step
  "$BIN/rgbt-seg" train --config models/sartm_micro.yaml --dataset synthetic --max-steps 1 --batch-size 2 \
    --out "$TMP/micro" >/dev/null 2>&1
fi
replay() {  # NAME RUN ARGS...: one replay of the sample bag, its metrics.json kept
  local name="$1" k="$2"; shift 2
  rm -rf "$TMP/replay"
  "$BIN/rgbt-seg" replay "$TMP/sample/bag" --out "$TMP/replay" --no-progress "$@" >/dev/null 2>&1
  cp "$TMP/replay/metrics.json" "$OUT/${name}_run$k.json"
}
for k in $(seq 1 "$RUNS"); do
  echo "== run $k of $RUNS"
  if want pipeline_micro; then
    "$BIN/rgbt-seg" bench pipeline --config models/sartm_micro.yaml --sizes 480x640 720x1280 --threads 2 \
      --repeats 50 --json "$OUT/pipeline_micro_run$k.json" >/dev/null
  fi
  if want pipeline_standin10; then
    "$BIN/rgbt-seg" bench pipeline --config models/sartm_micro.yaml --sizes 480x640 720x1280 --threads 2 \
      --repeats 50 --model-ms 10 --json "$OUT/pipeline_standin10_run$k.json" >/dev/null
  fi
  if want model_sartm_tiny; then
    "$BIN/rgbt-seg" bench model --config models/sartm_tiny.yaml --threads 2 --repeats 3 \
      --json "$OUT/model_sartm_tiny_run$k.json" >/dev/null
  fi
  if want model_segrgbx_tiny; then
    "$BIN/rgbt-seg" bench model --config models/segrgbx_tiny.yaml --threads 2 --repeats 9 \
      --json "$OUT/model_segrgbx_tiny_run$k.json" >/dev/null
  fi
  if want scale; then  # the input-scale table: every backend's tiny config at 480x640 and 768x1024
    for backend in sartm cpal fusionsam segrgbx; do
      for size in "480 640" "768 1024"; do
        "$BIN/rgbt-seg" bench model --config "models/${backend}_tiny.yaml" --size $size --threads 2 --repeats 3 \
          --json "$OUT/scale_${backend}_${size/ /x}_run$k.json" >/dev/null
      done
    done
  fi
  if want replay_demo; then replay replay_demo "$k"; fi
  if want replay_micro; then replay replay_micro "$k" --checkpoint "$TMP/micro/last" --threads 1 --outputs-only; fi
  if want memory_micro; then
    "$BIN/rgbt-seg" bench memory --pairs 1000 --json "$OUT/memory_micro_run$k.json" >/dev/null 2>&1
  fi
  if want onnx_demo; then
    "$BIN/rgbt-seg" export-onnx --checkpoint models/demo --out "$TMP/demo.onnx" --time 5 --threads 2 \
      --json "$OUT/onnx_demo_run$k.json" >/dev/null
  fi
done
"$BIN/rgbt-seg" bench table
