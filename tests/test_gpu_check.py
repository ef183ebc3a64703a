"""tools/gpu-check.sh and tools/gpu_bench.py run here as far as a CPU lets them, so a lent GPU's minutes go to measuring."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu-check.sh"


def _bash(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_the_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine: the dry run would show its own plan")
def test_dry_run_prints_what_it_would_install_and_run_and_what_it_skips() -> None:
    done = _bash("--dry-run", "--python", sys.executable)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "no CUDA GPU here" in out
    assert "would run: " + sys.executable + " -m pip install" in out and "onnxruntime-gpu" in out
    assert "-m pytest -q -m gpu" in out and "tools/gpu_bench.py --out gpu-check-out" in out
    assert "skip: tensorrt-rtx: sm90 is not a TensorRT-RTX 1.7 target" in out
    assert not (ROOT / "gpu-check-out").exists()  # a dry run writes nothing


def test_without_a_gpu_a_real_run_stops_with_one_line() -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU machine")
    done = _bash()
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "gpu-check: no CUDA GPU found (nvidia-smi lists none); run this on the GPU machine, or --dry-run here"]
    bad = _bash("--fast")
    assert bad.returncode == 2 and "unknown option '--fast'" in bad.stderr


def _bench(tmp_path: Path, parts: str) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_bench.py"), "--device", "cpu", "--spec", "tiny-sdxl",
                           "--precision", "fp32", "--warmup", "0", "--repeats", "1", "--parts", parts, "--compare", "tiny-sdxl-tome",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((tmp_path / "gpu-bench.json").read_text())


@pytest.mark.slow
def test_bench_smoke_on_the_cpu_eager_part(tmp_path) -> None:
    """Stock vs every pruned DSAP stage (with the cost model's prediction beside it), the map layer vs the
    stock self-attention at each pruned shape; the table and JSON written."""
    report = _bench(tmp_path, "eager,map-layer")
    eager = [f for f in report["figures"] if f["part"] == "eager"]
    assert [f["what"] for f in eager] == ["stock UNet", "AT-EDM early stage", "AT-EDM main stage", "ToMe main stage",
                                          "ToMe main stage, tomesd 0.1.3 itself"]
    assert eager[0]["speedup"] == 1.0 and all(f["speedup"] > 0 for f in eager)
    assert report["cost_device"] == "this machine (CPU, measured)"
    assert all(f["predicted_speedup"] > 0 for f in eager[1:3])
    maps = [f["what"] for f in report["figures"] if f["part"] == "map-layer"]
    assert maps == ["stock self-attention, 256 tokens", "map layer, 256 tokens (keeps 95)",
                    "stock self-attention, 64 tokens", "map layer, 64 tokens (keeps 24)"]
    assert "| eager | AT-EDM main stage |" in (tmp_path / "gpu-bench.md").read_text()


@pytest.mark.slow
def test_bench_smoke_on_the_cpu_graph_parts(tmp_path) -> None:
    report = _bench(tmp_path, "onnxruntime,engines")
    assert [f["what"] for f in report["figures"]] == [
        f"{graph} ({form} attention)" for form in ("fused", "unfused") for graph in ("unpruned graph", "AT-EDM main stage graph")]
    assert report["skipped"] == {"tensorrt-rtx": "engines run on a GPU only"}
