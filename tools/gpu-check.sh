#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: install what the GPU paths need, run the gpu-marked tests,
# measure SDXL 1024², batch 2, fp16 (tools/gpu_bench.py), and say what was skipped and why.
#
#   bash tools/gpu-check.sh                  # on the GPU machine; results in gpu-check-out/
#   bash tools/gpu-check.sh --dry-run        # anywhere: print what it would install and run
#   bash tools/gpu-check.sh --wheels DIR     # offline: pip installs only from a folder of wheels
#
# Options: --out DIR (default gpu-check-out), --python PY (default: python3, the one holding CUDA torch),
# --budget-s N (default 540: tests and measurements stop starting new parts past it; the whole check
# is sized for 10 minutes of GPU time), --skip-tests, --skip-bench.
# Environment: ATEDM_TORCH_INDEX, the index CUDA torch comes from when the python has none
# (default https://download.pytorch.org/whl/cu130).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0; OUT=gpu-check-out; PY=python3; WHEELS=""; BUDGET=540; TESTS=1; BENCH=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --python) PY="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    --budget-s) BUDGET="$2"; shift ;;
    --skip-tests) TESTS=0 ;;
    --skip-bench) BENCH=0 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown option '$1'; expected --dry-run, --out, --python, --wheels, --budget-s, --skip-tests, --skip-bench" >&2; exit 2 ;;
  esac
  shift
done

START=$(date +%s)
SKIPPED=()
say() { printf '[%s +%ss] %s\n' "$(date +%H:%M:%S)" "$(( $(date +%s) - START ))" "$*"; }
skip() { SKIPPED+=("$1"); say "skip: $1"; }
run() {  # run (or, with --dry-run, print) one command
  if [ "$DRY" = 1 ]; then printf '  would run: %s\n' "$*"; return 0; fi
  say "run: $*"; "$@"
}
has() { "$PY" - "$@" >/dev/null 2>&1; }  # a python check passed as stdin by the caller
PIP=("$PY" -m pip install -q --disable-pip-version-check)
[ -n "$WHEELS" ] && PIP+=(--no-index --find-links "$WHEELS")

# ---- the GPU -------------------------------------------------------------------------------------
GPU=""; CAP=""
if command -v nvidia-smi >/dev/null 2>&1; then
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.' | sed 's/^/sm/')
fi
if [ -z "$GPU" ]; then
  if [ "$DRY" = 1 ]; then
    say "no CUDA GPU here (nvidia-smi finds none): a real run stops at this point; showing what a GPU machine would do"
    CAP=sm90
  else
    echo "gpu-check: no CUDA GPU found (nvidia-smi lists none); run this on the GPU machine, or --dry-run here" >&2
    exit 2
  fi
else
  say "GPU: $GPU ($CAP)"
fi
RTX_TARGETS="sm75 sm80 sm86 sm89 sm120 sm121"  # TensorRT-RTX 1.7's ComputeCapability list

# ---- install -------------------------------------------------------------------------------------
say "install (python: $PY${WHEELS:+, wheels from $WHEELS})"
if has <<<'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  say "CUDA torch present: $("$PY" -c 'import torch; print(torch.__version__)')"
else
  INDEX=(--index-url "${ATEDM_TORCH_INDEX:-https://download.pytorch.org/whl/cu130}")
  [ -n "$WHEELS" ] && INDEX=()
  run "${PIP[@]}" torch "${INDEX[@]}" || skip "CUDA torch: could not be installed (offline? pass --wheels)"
fi
# the package and its requirements, without replacing the CUDA torch already there
run "${PIP[@]}" -e ".[dev]" || { echo "gpu-check: cannot install atedm-export's requirements (offline? pass --wheels DIR)" >&2; [ "$DRY" = 1 ] || exit 3; }
if has <<<'import onnxruntime as o, sys; sys.exit(0 if "CUDAExecutionProvider" in o.get_available_providers() else 1)'; then
  say "onnxruntime with CUDAExecutionProvider present"
else
  # onnxruntime-gpu and onnxruntime are one module: the CPU build must go, or it shadows the GPU one; it
  # goes only once the GPU wheel is in hand, so an offline machine keeps a working (CPU) onnxruntime
  ORT_DIR=$(mktemp -d)
  DOWNLOAD=("$PY" -m pip download -q --disable-pip-version-check --no-deps -d "$ORT_DIR" "onnxruntime-gpu>=1.18")
  [ -n "$WHEELS" ] && DOWNLOAD+=(--no-index --find-links "$WHEELS")
  if run "${DOWNLOAD[@]}"; then
    run "$PY" -m pip uninstall -q -y onnxruntime
    run "${PIP[@]}" "$ORT_DIR"/onnxruntime_gpu-*.whl
  else
    skip "onnxruntime-cuda: onnxruntime-gpu could not be fetched (offline? its wheel is ~300 MB: pass --wheels)"
  fi
fi
if [[ " $RTX_TARGETS " == *" $CAP "* ]]; then
  run "${PIP[@]}" -e ".[rtx]" || skip "tensorrt-rtx: the TensorRT-RTX wheels could not be installed"
else
  skip "tensorrt-rtx: $CAP is not a TensorRT-RTX 1.7 target ($RTX_TARGETS); engines are neither built nor run"
fi
if has <<<'import tensorrt, sys; sys.exit(0 if hasattr(tensorrt, "Builder") else 1)'; then
  say "datacenter TensorRT present: its engine tests run"
else
  skip "tensorrt: datacenter TensorRT is not installed (its wheels download from pypi.nvidia.com only)"
fi

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# ---- the gpu tests -------------------------------------------------------------------------------
STATUS=0
if [ "$TESTS" = 1 ]; then
  say "gpu-marked tests (ATEDM_REQUIRE_GPU=1: they fail instead of skipping if the GPU vanishes)"
  run env ATEDM_REQUIRE_GPU=1 timeout "$(( $(left) > 60 ? $(left) / 3 : 60 ))" "$PY" -m pytest -q -m gpu -rs tests \
    || { STATUS=1; say "gpu tests FAILED"; }
else
  skip "gpu tests: --skip-tests"
fi

# ---- the measurements ----------------------------------------------------------------------------
if [ "$BENCH" = 1 ]; then
  say "measurements: SDXL 1024², batch 2, fp16, random weights ($(left) s of budget left)"
  run mkdir -p "$OUT"
  run timeout "$(( $(left) > 120 ? $(left) : 120 ))" "$PY" tools/gpu_bench.py --out "$OUT" --budget-s "$(( $(left) - 150 ))" \
    || { STATUS=1; say "measurements FAILED"; }
else
  skip "measurements: --skip-bench"
fi

say "done in $(( $(date +%s) - START )) s; skipped ${#SKIPPED[@]}:"
for reason in "${SKIPPED[@]}"; do printf '  - %s\n' "$reason"; done
[ "$DRY" = 1 ] || [ ! -f "$OUT/gpu-bench.md" ] || { echo; cat "$OUT/gpu-bench.md"; }
exit "$STATUS"
