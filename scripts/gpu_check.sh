#!/usr/bin/env bash
# One command that measures everything on a GPU machine (docs/gpu_check.md).
#
#   bash scripts/gpu_check.sh [--device cuda|cpu] [--wheels DIR] [--out DIR] [--budget-s 480]
#
# On a machine with an NVIDIA GPU and PyTorch installed, no network needed:
#   (a) checks that python and torch import and, with --device cuda, that torch.cuda.is_available();
#   (b) installs from DIR (default gpu_wheels/, made by `make gpu-wheels`) only the runtime
#       dependencies that are missing, then sam2 and this package; torch is never reinstalled or upgraded
#       (pip runs with a constraint pinning the installed torch and its CUDA libraries);
#   (c) runs, each under a timeout taken from the budget (default 480 s): pytest -m cuda,
#       `rgbt-seg bench model` of the three tiny configs at 480x640, `rgbt-seg bench pipeline` at
#       640x480 and 1280x720, `rgbt-seg bench train` (batch 8: step time, peak memory), and the
#       Segmenter in fp32 / bf16 / fp16 / torch.compile (rgbt_seg_ros/bench/segmenter_benchmark.py);
#   (d) records a step that fails or times out in OUT/summary.json and goes on; exits 1 if any failed;
#   (f) prints where the JSON files are (OUT, default gpu_check_out/) and a table.
# --device cpu is the dry run (micro configs, 1-2 repetitions, same commands): CI runs it
# (test/test_gpu_check.py) so that the first GPU run does not fail on a typo.
#
# Python: $PYTHON if set, else the checkout's .venv/bin/python if there is one, else python3.
# The checkout goes first on PYTHONPATH: the code measured is this checkout's.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE=cuda
WHEELS="$REPO/gpu_wheels"
OUT="$REPO/gpu_check_out"
BUDGET=480

usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
need_value() { [ "$#" -ge 2 ] && [ -n "$2" ] || { echo "gpu_check.sh: $1 needs a value" >&2; exit 2; }; }

while [ "$#" -gt 0 ]; do
    case "$1" in
        --device) need_value "$@"; DEVICE="$2"; shift 2 ;;
        --device=*) DEVICE="${1#*=}"; shift ;;
        --wheels) need_value "$@"; WHEELS="$2"; shift 2 ;;
        --wheels=*) WHEELS="${1#*=}"; shift ;;
        --out) need_value "$@"; OUT="$2"; shift 2 ;;
        --out=*) OUT="${1#*=}"; shift ;;
        --budget-s) need_value "$@"; BUDGET="$2"; shift 2 ;;
        --budget-s=*) BUDGET="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device must be cuda or cpu, not '$DEVICE'" >&2; exit 2 ;; esac
[[ "$BUDGET" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "gpu_check.sh: --budget-s must be a number of seconds" >&2; exit 2; }

if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then
    PY="$REPO/.venv/bin/python"
else
    PY=python3
fi
command -v "$PY" >/dev/null 2>&1 || { echo "gpu_check.sh: python '$PY' not found (set PYTHON=...)" >&2; exit 3; }
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    { echo "gpu_check.sh: $PY is not Python 3.10 or newer" >&2; exit 3; }

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
case "$WHEELS" in /*) ;; *) WHEELS="$PWD/$WHEELS" ;; esac
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
cd "$REPO"

echo "gpu_check.sh: device $DEVICE, python $PY, wheels $WHEELS, out $OUT, budget ${BUDGET} s"
# (a) python + torch (+ CUDA): nothing else can run without them
"$PY" -m rgbt_seg_ros.bench.gpu_check check --device "$DEVICE" --out "$OUT"
# (b) what is missing, from the wheels; a failure is recorded (install.json) and the steps still run
"$PY" -m rgbt_seg_ros.bench.gpu_check install --wheels "$WHEELS" --out "$OUT" --repo "$REPO" || true
# (c)-(f)
rc=0
"$PY" -m rgbt_seg_ros.bench.gpu_check run --device "$DEVICE" --out "$OUT" --budget-s "$BUDGET" --repo "$REPO" || rc=$?
exit "$rc"
