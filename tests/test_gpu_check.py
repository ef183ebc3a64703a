"""tools/gpu-check.sh and tools/gpu_bench.py run here as far as a CPU lets them, so a lent GPU's minutes go to measuring."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from atedm_export.kernels.runnable import TRITON_INSTALLED

from .conftest import tool

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu-check.sh"
BENCH = ROOT / "tools" / "gpu_bench.py"
NEW_PARTS = "parity,map-layer,kernels,stages,compile,eager"


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
    assert "would run: " + sys.executable + " -m pip install" in out  # this torch has no CUDA
    assert "kept as installed (pip constraints): torch==" in out  # never reinstalled under the bench
    assert "-m pytest -q -m gpu" in out and "timeout 120" in out
    assert "tools/gpu_bench.py --out gpu-check-out --budget-s" in out and f"--parts {NEW_PARTS}" in out
    assert "tools/cost_check.py --fit --measured gpu-check-out/gpu-bench.json" in out  # after the measurements
    # the default parts need neither onnxruntime-gpu nor TensorRT-RTX: nothing of theirs is fetched
    assert "onnxruntime-gpu>=" not in out and "skip: onnxruntime-cuda: not in --parts" in out
    assert "skip: tensorrt-rtx: not in --parts" in out
    assert not (ROOT / "gpu-check-out").exists()  # a dry run writes nothing


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine")
def test_dry_run_with_the_graph_parts_fetches_onnxruntime_gpu() -> None:
    out = _bash("--dry-run", "--python", sys.executable, "--parts", "stages,onnxruntime,engines").stdout
    assert "onnxruntime-gpu>=1.18" in out and "--parts stages,onnxruntime,engines" in out
    assert "skip: tensorrt-rtx: sm90 is not a TensorRT-RTX 1.7 target" in out


def test_without_a_gpu_a_real_run_stops_with_one_line() -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU machine")
    done = _bash()
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "gpu-check: no CUDA GPU found (nvidia-smi lists none); run this on the GPU machine, or --dry-run here"]
    bad = _bash("--fast")
    assert bad.returncode == 2 and "unknown option '--fast'" in bad.stderr


def _bench(tmp_path: Path, *args: str, env: dict | None = None, timeout: int = 600) -> dict:
    done = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--spec", "tiny-sdxl", "--precision", "fp32",
                           "--warmup", "0", "--repeats", "1", "--out", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.startswith("**Before** (docs/benchmarks.md, 2026-11-30: H200")  # today's figures first
    return json.loads((tmp_path / "gpu-bench.json").read_text())


@pytest.mark.slow  # seconds of CPU in a subprocess: the default suite keeps to the dry runs
def test_bench_smoke_on_the_cpu_map_layer_and_stages(tmp_path) -> None:
    """The map layer (explicit) beside SDPA at each pruned shape, every stage of two schedules against the stock UNet
    (a plan two schedules share timed once), and each schedule's step-weighted total; the table and JSON written."""
    env = {"TRITON_INTERPRET": "0"}
    report = _bench(tmp_path, "--parts", "parity,map-layer,stages", "--impls", "explicit", "--schedules",
                    "paper,uniform-63", "--cost-device", "none", env=env, timeout=120)
    assert report["impls"] == ["explicit"] and report["replay"] == "none (eager calls)"
    assert report["skipped"] == {"parity": "needs both map_impl explicit and kernels"} and not report["failed"]
    maps = [f for f in report["figures"] if f["part"] == "map-layer"]
    assert [f["what"] for f in maps] == [
        "SDPA self-attention, 256 tokens (16×16)", "map layer explicit, 256 tokens (16×16), keeps 95",
        "SDPA self-attention, 64 tokens (8×8)", "map layer explicit, 64 tokens (8×8), keeps 24"]
    assert all(f["x_sdpa"] > 0 for f in maps) and maps[1]["x_sdpa"] == pytest.approx(maps[1]["median_ms"] / maps[0]["median_ms"])
    stages = [f for f in report["figures"] if f["part"] == "stages"]
    assert [f["what"] for f in stages] == ["stock UNet", "paper early stage, explicit", "paper main stage, explicit",
                                           "uniform-63 main stage, explicit"]
    assert stages[3]["note"] == "the plan of 'paper main stage, explicit': timed once"
    assert stages[3]["median_ms"] == stages[2]["median_ms"] and stages[3]["steps"] == 20
    schedule = {f["what"]: f for f in report["figures"] if f["part"] == "schedule"}
    assert list(schedule) == ["stock UNet × 20 steps", "paper schedule, explicit (20 steps: early 2 + main 18)",
                              "uniform-63 schedule, explicit (20 steps: main 20)"]
    paper = schedule["paper schedule, explicit (20 steps: early 2 + main 18)"]
    assert paper["median_ms"] == pytest.approx(2 * stages[1]["median_ms"] + 18 * stages[2]["median_ms"])
    assert paper["speedup"] == pytest.approx(20 * stages[0]["median_ms"] / paper["median_ms"])
    table = (tmp_path / "gpu-bench.md").read_text()
    assert table.startswith("**Before**") and "| 41.6 |" in table and "**Now:**" in table
    assert "| stages | paper main stage, explicit |" in table and "map layer explicit, 256 tokens (16×16), keeps 95: " in table
    # the cost model fitted on what the stages part timed (tools/cost_check.py --fit, which gpu-check.sh runs after it)
    fit = subprocess.run([sys.executable, str(ROOT / "tools" / "cost_check.py"), "--fit", "--measured",
                          str(tmp_path / "gpu-bench.json"), "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)
    assert fit.returncode == 0, fit.stderr
    assert "tiny-sdxl on this machine" in fit.stdout and "paper early stage, explicit" in fit.stdout


@pytest.mark.slow
@pytest.mark.skipif(not TRITON_INSTALLED, reason="triton is not installed")
def test_bench_smoke_of_the_kernels_in_tritons_interpreter(tmp_path) -> None:
    """Parity (kept tokens, recovery sources, the pruned UNet's output), the map layer in both forms and each kernel
    alone: the kernels on CPU tensors in Triton's interpreter, at the tiny spec."""
    report = _bench(tmp_path, "--parts", "parity,map-layer,kernels", "--cost-device", "none",
                    env={"TRITON_INTERPRET": "1"}, timeout=240)
    assert report["impls"] == ["explicit", "kernels"] and not report["failed"] and not report["skipped"]
    blocks = report["parity"]["blocks"]
    assert [(b["tokens"], b["keep"]) for b in blocks] == [(256, 95), (256, 95), (64, 24), (64, 24)]
    assert all(b["kept_total"] == 2 * b["keep"] and b["sources_total"] == 2 * b["tokens"] for b in blocks)
    assert all(b["kept_differ"] == 0 for b in blocks if b["input"].startswith("peaked"))  # the ranking is clear there
    unet = report["parity"]["unet"]
    assert unet["stage"] == "main" and unet["max_abs_diff"] >= 0 and unet["tolerance"] > 0.01
    maps = [f["what"] for f in report["figures"] if f["part"] == "map-layer"]
    assert maps[:3] == ["SDPA self-attention, 256 tokens (16×16)", "map layer explicit, 256 tokens (16×16), keeps 95",
                        "map layer kernels, 256 tokens (16×16), keeps 95"]
    assert "**Parity on this device**" in (tmp_path / "gpu-bench.md").read_text()
    kernels = [f["what"] for f in report["figures"] if f["part"] == "kernels"]
    assert len(kernels) == 2 * 12  # per block shape: 7 kernels alone and 5 tiles of the map kernel
    assert kernels[0] == "attention_lse (on CUDA: PyTorch's flash), 256 tokens"
    assert "head_mean_map at 128×128, 8 warps, 2 stages, 64 tokens" in kernels


@pytest.mark.slow  # seconds of CPU in a subprocess: the default suite keeps to the dry runs
def test_bench_compile_part_stops_what_does_not_compile_in_time(tmp_path) -> None:
    """Each compile child in its own process, stopped at the limit (its compiler with it) and skipped with the reason."""
    report = _bench(tmp_path, "--parts", "compile", "--impls", "explicit", "--compile-backend", "eager",
                    "--compile-limit-s", "2", "--cost-device", "none", timeout=120)
    assert report["skipped"] == {
        what: f"did not compile and time within the 2 s limit (torch.compile backend eager; log: compile/{item}.log)"
        for what, item in (("stock UNet, torch.compile", "stock"), ("paper main stage, explicit, torch.compile", "explicit"))}
    left = subprocess.run(["pgrep", "-f", "--", f"compile-child .*--out {tmp_path}"], capture_output=True, text=True)
    left = left.stdout.split()
    assert left == []


def test_predictions_are_read_defensively() -> None:
    """The cost model's per-map_impl speedups wherever the report gives them, '-' (None) where it does not."""
    bench = tool("gpu_bench")
    assert bench._impl_speedup({"map_impls": {"explicit": 0.8, "kernels": 1.3}}, "kernels", None) == 1.3
    assert bench._impl_speedup({"map_impls": {"kernels": {"predicted_speedup": 1.2}}}, "kernels", None) == 1.2
    assert bench._impl_speedup({"map_impls": {"kernels": {"ms": 20.0}}}, "kernels", 30.0) == 1.5
    assert bench._impl_speedup({"predicted_speedup": 0.9}, "kernels", None) is None
    assert bench._impl_speedup({"map_impls": "later"}, "kernels", None) is None
    stages = {"early": {"kernels": 1.0}, "main": {"kernels": 2.0}}
    assert bench._schedule_from_stages(stages, {"early": 5, "main": 45}, "kernels") == pytest.approx(50 / (5 + 22.5))
    assert bench._schedule_from_stages(stages, {"early": 5, "main": 45}, "explicit") is None
    report = bench.Report("s", 2, [8, 8], "fp16", "gpu", "sm90", "torch")
    fig = bench.Figure("stages", "paper main stage, kernels", 10, 9, 11, 0, impl="kernels", schedule="paper", stage="main")
    report.figures.append(fig)
    bench.speedups(report)
    assert fig.predicted_speedup is None and "| - |" in bench.markdown(report)
    report.predictions = {"paper": {"stages": {"main": {"generic": 0.8, "explicit": 0.8, "kernels": 1.4}}}}
    bench.speedups(report)
    assert fig.predicted_speedup == 1.4


@pytest.mark.slow
def test_bench_smoke_on_the_cpu_eager_part(tmp_path) -> None:
    """The earlier eager part: stock vs every pruned DSAP stage (with the cost model's prediction beside it) and ToMe."""
    report = _bench(tmp_path, "--parts", "eager", "--compare", "tiny-sdxl-tome")
    eager = [f for f in report["figures"] if f["part"] == "eager"]
    assert [f["what"] for f in eager] == ["stock UNet", "AT-EDM early stage", "AT-EDM main stage", "ToMe main stage",
                                          "ToMe main stage, tomesd 0.1.3 itself"]
    assert eager[0]["speedup"] == 1.0 and all(f["speedup"] > 0 for f in eager)
    assert report["cost_device"] == "this machine (CPU, measured)"
    assert all(f["predicted_speedup"] > 0 for f in eager[1:3])
    assert "| eager | AT-EDM main stage |" in (tmp_path / "gpu-bench.md").read_text()


@pytest.mark.slow
def test_bench_smoke_on_the_cpu_compile_part(tmp_path) -> None:
    """The stock UNet and the main stage compiled (dynamo alone: backend eager), each timed in its own process."""
    report = _bench(tmp_path, "--parts", "compile", "--impls", "explicit", "--compile-backend", "eager",
                    "--compile-limit-s", "400", "--schedules", "paper")
    compiled = [f for f in report["figures"] if f["part"] == "compile"]
    assert [f["what"] for f in compiled] == ["stock UNet, torch.compile", "paper main stage, explicit, torch.compile"]
    assert compiled[0]["speedup"] == 1.0 and compiled[1]["speedup"] > 0 and all(f["compile_s"] > 0 for f in compiled)
    assert compiled[1]["predicted_speedup"] > 0


@pytest.mark.slow
def test_bench_smoke_on_the_cpu_graph_parts(tmp_path) -> None:
    report = _bench(tmp_path, "--parts", "onnxruntime,engines")
    assert [f["what"] for f in report["figures"]] == [
        f"{graph} ({form} attention)" for form in ("fused", "unfused") for graph in ("unpruned graph", "AT-EDM main stage graph")]
    assert report["skipped"] == {"tensorrt-rtx": "engines run on a GPU only"}
