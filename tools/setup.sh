#!/usr/bin/env bash
# Sets up .venv with everything atedm-export needs, idempotently.
# torch is pinned to 2.13.0 so these machines take their local CPU wheel instead of a multi-GB CUDA build;
# on a GPU machine install the CUDA torch you want first, then run this with ATEDM_TORCH=skip.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "${ATEDM_TORCH:-}" != "skip" ]; then
  python -m pip install -q "torch==${ATEDM_TORCH:-2.13.0}"
fi
# OpenAI's Triton for the map layer's kernels, pinned where this script installs torch: 3.8 runs them in its
# interpreter with numpy 2.4 (3.6 fails there when a loop bound is a runtime int). With ATEDM_TORCH=skip the
# GPU machine keeps the triton its CUDA torch came with.
pins=()
[ "${ATEDM_TORCH:-}" != "skip" ] && pins+=("triton==${ATEDM_TRITON_KERNELS:-3.8.0}")
python -m pip install -q -e ".[dev,rtx,triton,kernels]" "${pins[@]}"

# TensorRT 10's published type stubs, for the API conformance test (tests/test_trt_conformance.py). They go
# into their own folder, off sys.path: installed normally they create a `tensorrt/` folder of .pyi files
# that imports as an empty namespace package, as if TensorRT were installed. --no-deps: the stubs
# package requires tensorrt itself, which does not download here.
if [ ! -f .venv/trt-stubs/tensorrt_bindings/tensorrt.pyi ]; then
  python -m pip install -q --no-deps --target .venv/trt-stubs "tensorrt-stubs==${ATEDM_TRT_STUBS_VERSION:-10.13.0.35.1}"
fi

# TensorRT's plugin framework (``tensorrt.plugin``, Python sources in the bindings wheel, whose libraries do not
# download here), unpacked into its own folder: tests/test_trt_conformance.py checks compile/plugins.py's names
# against it. The wheel is 1.2 MB; only its plugin/*.py files are kept.
if [ ! -f .venv/trt-plugin/plugin/_lib.py ]; then
  rm -rf .venv/trt-plugin .venv/trt-bindings-wheel
  python -m pip download -q --no-deps "tensorrt_cu13_bindings==${ATEDM_TRT_BINDINGS:-11.4.0.106}" -d .venv/trt-bindings-wheel
  python - <<'PY'
import pathlib, zipfile
wheel = next(pathlib.Path(".venv/trt-bindings-wheel").glob("tensorrt_cu13_bindings-*.whl"))
with zipfile.ZipFile(wheel) as archive:
    for info in archive.infolist():
        if info.filename.startswith("tensorrt_bindings/plugin/") and info.filename.endswith(".py"):
            target = pathlib.Path(".venv/trt-plugin/plugin") / pathlib.Path(info.filename).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(info))
PY
  rm -rf .venv/trt-bindings-wheel
fi

# A real Triton Inference Server for `atedm-export serve` and the deploy tests: the tritonserver binary
# (CPU, Python backend) that ships in nvidia-pytriton's wheel, unpacked into .venv/triton, not installed
# (pytriton itself pins numpy<2). ATEDM_TRITON=skip leaves it out.
if [ "${ATEDM_TRITON:-}" != "skip" ] && [ ! -x .venv/triton/pytriton/tritonserver/bin/tritonserver ]; then
  rm -rf .venv/triton .venv/triton-wheel
  python -m pip download -q --no-deps "nvidia-pytriton==${ATEDM_PYTRITON:-0.7.0}" -d .venv/triton-wheel
  python - <<'PY'
import pathlib, zipfile
wheel = next(pathlib.Path(".venv/triton-wheel").glob("nvidia_pytriton-*.whl"))
with zipfile.ZipFile(wheel) as archive:
    for info in archive.infolist():
        if info.filename.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/")):
            path = pathlib.Path(archive.extract(info, ".venv/triton"))
            path.chmod((info.external_attr >> 16) & 0o755 or 0o644)
PY
  rm -rf .venv/triton-wheel
fi
