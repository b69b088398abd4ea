#!/usr/bin/env bash
# Re-measure README's benchmark table (`make bench-results`).
#
#   bash scripts/measure_benchmarks.sh [--runs N]
#
# Runs every benchmark command of the table N times (default 3), interleaved (run 1 of each, then
# run 2 of each, ...) so that a change of load on a shared machine hits all of them alike, writes
# docs/results/bench/<name>_run<k>.json, then regenerates the table in README.md from those files
# (`rgbt-seg bench table`). Commit the JSON files with the README. About 3 minutes per run on a
# 2-core CPU; keep the machine otherwise idle while it runs.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "measure_benchmarks.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

cd "$REPO"
BIN="${VENV:-$REPO/.venv}/bin"
export AMENT_PREFIX_PATH="${VENV:-$REPO/.venv}${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA HF_HUB_OFFLINE=1
OUT="$REPO/docs/results/bench"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT"

"$BIN/rgbt-seg" make-sample-bag "$TMP/sample" --frames 60 >/dev/null
for k in $(seq 1 "$RUNS"); do
  echo "== run $k of $RUNS"
  "$BIN/rgbt-seg" bench pipeline --config models/sartm_micro.yaml --sizes 480x640 720x1280 --threads 2 \
    --repeats 50 --json "$OUT/pipeline_micro_run$k.json" >/dev/null
  "$BIN/rgbt-seg" bench pipeline --config models/sartm_micro.yaml --sizes 480x640 720x1280 --threads 2 \
    --repeats 50 --model-ms 10 --json "$OUT/pipeline_standin10_run$k.json" >/dev/null
  "$BIN/rgbt-seg" bench model --config models/sartm_tiny.yaml --threads 2 --repeats 3 \
    --json "$OUT/model_sartm_tiny_run$k.json" >/dev/null
  rm -rf "$TMP/replay"
  "$BIN/rgbt-seg" replay "$TMP/sample/bag" --out "$TMP/replay" >/dev/null 2>&1
  cp "$TMP/replay/metrics.json" "$OUT/replay_demo_run$k.json"
  "$BIN/rgbt-seg" bench memory --pairs 1000 --json "$OUT/memory_micro_run$k.json" >/dev/null 2>&1
  "$BIN/rgbt-seg" export-onnx --checkpoint models/demo --out "$TMP/demo.onnx" --time 5 --threads 2 \
    --json "$OUT/onnx_demo_run$k.json" >/dev/null
done
"$BIN/rgbt-seg" bench table
