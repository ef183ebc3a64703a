#!/usr/bin/env bash
# Fetches, here, the wheels a lent H200 lacks, into .whl/ (ignored), for the device tool to carry there.
#
#   bash tools/gpu-wheels.sh [--dry-run]
#
# The H200's image (/work/.library/device/KINDS.md) has CUDA torch 2.11, triton 3.6, transformers, accelerate,
# safetensors, peft, onnx, onnxruntime, click, rich, pyyaml, but no diffusers, pydantic, polygraphy,
# onnx-graphsurgeon or tomesd, and reaches no index. Each is fetched at the version this checkout's .venv holds
# (what the tests passed with), for that machine's Python 3.12 on x86-64, without dependencies: the list names
# every one the image lacks. There, before tools/gpu-check.sh:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD bash tools/gpu-check.sh --wheels .whl
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
PY=.venv/bin/python
[ -x "$PY" ] || { echo "gpu-wheels: no .venv here: run tools/setup.sh first (the versions are read from it)" >&2; exit 2; }
NEEDED=(diffusers pydantic pydantic_core annotated-types typing-inspection importlib_metadata polygraphy
        onnx_graphsurgeon tomesd)
PLATFORMS=()
for n in 17 24 27 28 31 34; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
mkdir -p .whl
for name in "${NEEDED[@]}"; do
  version=$("$PY" -c "from importlib.metadata import version; print(version('$name'))")
  cmd=("$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12
       --implementation cp "${PLATFORMS[@]}" -d .whl "$name==$version")
  if [ "$DRY" = 1 ]; then echo "would run: ${cmd[*]}"; else "${cmd[@]}"; fi
done
[ "$DRY" = 1 ] || { du -sh .whl; ls .whl; }
