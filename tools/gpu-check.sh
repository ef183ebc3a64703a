#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: install what the GPU paths need, run the gpu-marked tests,
# measure SDXL 1024², batch 2, fp16 (tools/gpu_bench.py), refit the cost model on what it timed
# (tools/cost_check.py --fit: gpu-check-out/cost-fit.txt), and say what was skipped and why.
#
#   bash tools/gpu-check.sh                  # on the GPU machine; results in gpu-check-out/
#   bash tools/gpu-check.sh --dry-run        # anywhere: print what it would install and run
#   bash tools/gpu-check.sh --wheels DIR     # offline: pip installs only from a folder of wheels
#
# Options: --out DIR (default gpu-check-out), --python PY (default: python3, the one holding CUDA torch),
# --budget-s N (default 470: the whole check is sized for 8 minutes of GPU time; tests and measurements
# stop starting new parts past it), --parts LIST (gpu_bench's parts; default parity,map-layer,kernels,stages,compile,eager;
# onnxruntime-gpu and TensorRT-RTX are installed only where onnxruntime or engines are asked for),
# --test-timeout-s N (default 120), --skip-tests, --skip-bench.
# The torch and triton already installed are kept (pinned for pip): CUDA torch and its triton come together.
# Environment: ATEDM_TORCH_INDEX, the index CUDA torch comes from when the python has none
# (default https://download.pytorch.org/whl/cu130).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0; OUT=gpu-check-out; PY=python3; WHEELS=""; BUDGET=470; TESTS=1; BENCH=1; TEST_LIMIT=120
PARTS=parity,map-layer,kernels,stages,compile,eager
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --python) PY="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    --budget-s) BUDGET="$2"; shift ;;
    --parts) PARTS="$2"; shift ;;
    --test-timeout-s) TEST_LIMIT="$2"; shift ;;
    --skip-tests) TESTS=0 ;;
    --skip-bench) BENCH=0 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown option '$1'; expected --dry-run, --out, --python, --wheels, --budget-s, --parts, --test-timeout-s, --skip-tests, --skip-bench" >&2; exit 2 ;;
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
wants() { [[ ",$PARTS," == *",$1,"* ]]; }  # the bench is asked for this part
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# offline machines answer no index: fail fast rather than retry for minutes
PIP=("$PY" -m pip install -q --disable-pip-version-check --timeout 15 --retries 1)
[ -n "$WHEELS" ] && PIP+=(--no-index --find-links "$WHEELS")
# the checkout is importable without an install (the tests and the bench run from it)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${TRITON_INTERPRET:-}" ]; then
  say "TRITON_INTERPRET=$TRITON_INTERPRET unset: on the GPU the kernels compile for it, not for Triton's interpreter"
  unset TRITON_INTERPRET
fi

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
# torch and triton as installed are constraints of every later pip install: never replaced, never reinstalled
CONSTRAINTS=$(mktemp)
"$PY" - >"$CONSTRAINTS" 2>/dev/null <<'PYEOF'
from importlib.metadata import PackageNotFoundError, version
for name in ("torch", "triton", "pytorch-triton"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
PYEOF
[ -s "$CONSTRAINTS" ] && PIP+=(-c "$CONSTRAINTS") && say "kept as installed (pip constraints): $(tr '\n' ' ' <"$CONSTRAINTS")"
TRITON=$("$PY" -c 'import triton; print(triton.__version__)' 2>/dev/null)
if [ -n "$TRITON" ]; then
  say "triton $TRITON present: the map layer's kernels compile for $CAP"
else
  skip "map_impl kernels: triton is not importable beside this torch (it comes with CUDA torch; not installed here, it must match torch): the bench times the explicit map layer only"
fi
# the package's requirements: installed only where one is missing (an offline machine with them all runs as it is)
MISSING=$("$PY" - 2>/dev/null <<'PYEOF'
import re
from importlib.metadata import PackageNotFoundError, version

text = open("pyproject.toml").read()
try:
    import tomllib

    project = tomllib.loads(text)["project"]
    reqs = project["dependencies"] + project.get("optional-dependencies", {}).get("dev", [])
except ImportError:  # python 3.10: the two lists read from the text
    text = re.sub(r"#.*", "", text)
    reqs = [r for block in (re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M),
                            re.search(r"^dev = \[(.*?)\]", text, re.S | re.M)) if block
            for r in re.findall(r'"([^"]+)"', block.group(1))]
try:
    from packaging.requirements import Requirement
except ImportError:
    Requirement = None
missing = []
for req in reqs:
    name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
    try:
        have = version(name)
    except PackageNotFoundError:
        missing.append(req)
        continue
    if Requirement is not None:
        parsed = Requirement(req)
        if (parsed.marker is None or parsed.marker.evaluate()) and not parsed.specifier.contains(have, prereleases=True):
            missing.append(f"{req} (have {have})")
print("; ".join(missing))
PYEOF
) || MISSING="(the requirements could not be read)"
if [ -z "$MISSING" ]; then
  say "atedm-export's requirements present: not reinstalled"
else
  say "missing: $MISSING"
  # the package and its requirements, without replacing the CUDA torch (and its triton) already there
  if ! run "${PIP[@]}" -e ".[dev]"; then
    # what is missing may be optional here (tomesd: the eager part's ToMe reference); the package itself must import
    if has <<<'import atedm_export.cli, atedm_export.bench'; then
      skip "requirements: could not install $MISSING (offline? pass --wheels DIR); going on with what is installed"
    else
      echo "gpu-check: cannot install atedm-export's requirements (offline? pass --wheels DIR)" >&2; exit 3
    fi
  fi
fi
if ! wants onnxruntime; then
  skip "onnxruntime-cuda: not in --parts ($PARTS); onnxruntime-gpu is not installed"
elif has <<<'import onnxruntime as o, sys; sys.exit(0 if "CUDAExecutionProvider" in o.get_available_providers() else 1)'; then
  say "onnxruntime with CUDAExecutionProvider present"
else
  # onnxruntime-gpu and onnxruntime are one module: the CPU build must go, or it shadows the GPU one; it
  # goes only once the GPU wheel is in hand, so an offline machine keeps a working (CPU) onnxruntime
  ORT_DIR=$(mktemp -d)
  DOWNLOAD=("$PY" -m pip download -q --disable-pip-version-check --timeout 15 --retries 1 --no-deps -d "$ORT_DIR" "onnxruntime-gpu>=1.18")
  [ -n "$WHEELS" ] && DOWNLOAD+=(--no-index --find-links "$WHEELS")
  if run "${DOWNLOAD[@]}"; then
    run "$PY" -m pip uninstall -q -y onnxruntime
    run "${PIP[@]}" "$ORT_DIR"/onnxruntime_gpu-*.whl
  else
    skip "onnxruntime-cuda: onnxruntime-gpu could not be fetched (offline? its wheel is ~300 MB: pass --wheels)"
  fi
fi
if ! wants engines; then
  skip "tensorrt-rtx: not in --parts ($PARTS); its wheels are not installed"
elif [[ " $RTX_TARGETS " == *" $CAP "* ]]; then
  run "${PIP[@]}" -e ".[rtx]" || skip "tensorrt-rtx: the TensorRT-RTX wheels could not be installed"
else
  skip "tensorrt-rtx: $CAP is not a TensorRT-RTX 1.7 target ($RTX_TARGETS); engines are neither built nor run"
fi
if has <<<'import tensorrt, sys; sys.exit(0 if hasattr(tensorrt, "Builder") else 1)'; then
  say "datacenter TensorRT present: its engine tests run"
else
  skip "tensorrt: datacenter TensorRT is not installed (its wheels download from pypi.nvidia.com only)"
fi

# ---- the gpu tests -------------------------------------------------------------------------------
STATUS=0
if [ "$TESTS" = 1 ]; then
  LIMIT=$(( $(left) / 3 < TEST_LIMIT ? $(left) / 3 : TEST_LIMIT )); [ "$LIMIT" -lt 60 ] && LIMIT=60
  say "gpu-marked tests, at most $LIMIT s (ATEDM_REQUIRE_GPU=1: they fail instead of skipping if the GPU vanishes)"
  run env ATEDM_REQUIRE_GPU=1 timeout "$LIMIT" "$PY" -m pytest -q -m gpu -rs tests \
    || { STATUS=1; say "gpu tests FAILED (or ran past $LIMIT s)"; }
else
  skip "gpu tests: --skip-tests"
fi

# ---- the measurements ----------------------------------------------------------------------------
if [ "$BENCH" = 1 ]; then
  FIT_S=30  # kept back for the cost-model fit after the measurements (about 15 s on a 2-core CPU)
  LIMIT=$(( $(left) - FIT_S > 120 ? $(left) - FIT_S : 120 ))
  say "measurements: SDXL 1024², batch 2, fp16, random weights, parts $PARTS ($(left) s of budget left)"
  run mkdir -p "$OUT"
  run timeout -k 10 "$LIMIT" "$PY" tools/gpu_bench.py --out "$OUT" --budget-s "$(( LIMIT - 30 ))" --parts "$PARTS" \
    || { STATUS=1; say "measurements FAILED (or ran past $LIMIT s)"; }
  # the cost model refitted on what the stages part timed: CPU seconds, while the GPU idles
  if [ "$DRY" = 1 ]; then
    run timeout 60 "$PY" tools/cost_check.py --fit --measured "$OUT/gpu-bench.json"
  elif grep -q '"stock UNet"' "$OUT/gpu-bench.json" 2>/dev/null; then
    say "run: tools/cost_check.py --fit --measured $OUT/gpu-bench.json (> $OUT/cost-fit.txt)"
    timeout 60 "$PY" tools/cost_check.py --fit --measured "$OUT/gpu-bench.json" > "$OUT/cost-fit.txt" 2>&1 \
      && cat "$OUT/cost-fit.txt" || say "cost-model fit FAILED: $(tail -n 1 "$OUT/cost-fit.txt")"
  else
    skip "cost-model fit: no stages part in $OUT/gpu-bench.json"
  fi
else
  skip "measurements: --skip-bench"
fi

say "done in $(( $(date +%s) - START )) s; skipped ${#SKIPPED[@]}:"
for reason in "${SKIPPED[@]}"; do printf '  - %s\n' "$reason"; done
rm -f "$CONSTRAINTS"
[ "$DRY" = 1 ] || [ ! -f "$OUT/gpu-bench.md" ] || { echo; cat "$OUT/gpu-bench.md"; }
exit "$STATUS"
