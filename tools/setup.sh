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
python -m pip install -q -e ".[dev,rtx]"
