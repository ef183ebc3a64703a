"""The engine runtime: why replays must hand out their own tensors (CPU), and whole loops on a GPU's engines.

The GPU tests build the tiny spec for the GPU present with whichever engine library supports it
(TensorRT-RTX for its targets, datacenter TensorRT for the GPU it runs on) and skip cleanly otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import EulerDiscreteScheduler, PNDMScheduler

from atedm_export.contract import GraphContract
from atedm_export.buildfolder import first_view, read_manifest
from atedm_export.runtime import StagedUNet
from atedm_export.runtime.engines import EngineRuntimeError
from atedm_export.runtime.pipeline import SDXL_SCHEDULER


from .conftest import needs_rtx, sample_loop

ROOT = Path(__file__).resolve().parents[1]
SCHEDULER = {k: v for k, v in SDXL_SCHEDULER.items() if k != "interpolation_type"}


def test_multistep_schedulers_keep_earlier_model_outputs(tiny_unet):
    """What a replayed CUDA graph would break if it returned its one output buffer: PNDM (SD 1.x's default
    scheduler) keeps the raw model outputs of earlier steps (``ets``), so a buffer overwritten in place
    changes every later update. (DPM-Solver++ keeps its own x0 predictions, derived tensors, and is safe.)"""
    contract = GraphContract.from_config(dict(tiny_unet.config), 1, 64, 64)  # small: the point is the scheduler
    buffer = torch.empty(contract.latent_shape)

    class Aliasing(torch.nn.Module):
        def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            out = tiny_unet(*args, **kwargs)
            buffer.copy_(out.sample)
            out.sample = buffer
            return out

    with torch.no_grad():
        owned = sample_loop(tiny_unet, PNDMScheduler(**SCHEDULER), contract, 6)
        aliased = sample_loop(Aliasing(), PNDMScheduler(**SCHEDULER), contract, 6)
        first_order = [sample_loop(m, EulerDiscreteScheduler(**SDXL_SCHEDULER), contract, 6) for m in (tiny_unet, Aliasing())]
    assert (owned - aliased).abs().max() > 1e-3  # the kept output changed under the scheduler
    torch.testing.assert_close(*first_order, atol=0, rtol=0)  # Euler keeps nothing: aliasing is harmless there


# --------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["launches", "cuda-graphs"])
@pytest.mark.parametrize("weights", ["resident", "cycled"])
@pytest.mark.parametrize("scheduler", [EulerDiscreteScheduler, PNDMScheduler], ids=lambda s: s.__name__)
def test_engine_loop_switches_stages_like_onnxruntime(gpu_engine_build, cuda_graphs, weights, scheduler):
    """A whole sampler loop on the engines: stages switch on schedule, CUDA graphs on and off, one activation
    buffer for every stage, one stage's weights on the GPU when cycled; results as onnxruntime's on the CPU."""
    try:
        engine = StagedUNet.load(gpu_engine_build, backend="engine", device="cuda", cuda_graphs=cuda_graphs,
                                 weights=weights)
    except EngineRuntimeError as exc:  # datacenter TensorRT cannot defer weights: it says so
        if weights == "cycled" and "deferred weight loading" in str(exc):
            pytest.skip(str(exc))
        raise
    reference = StagedUNet.load(gpu_engine_build, backend="onnxruntime")
    contract, steps = first_view(engine.manifest).contract, 8
    kwargs = SCHEDULER if scheduler is PNDMScheduler else SDXL_SCHEDULER
    got = sample_loop(engine, scheduler(**kwargs), contract, steps, device="cuda").cpu()
    want = sample_loop(reference, scheduler(**kwargs), contract, steps)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    ranges = engine.schedule.step_ranges(steps)
    for stage, expected in zip(first_view(engine.manifest).stages, ranges):  # every stage ran, at its steps
        assert engine.stats[stage.name].steps == list(expected)
    runtime = engine.backend.engines
    assert engine.backend.activations.numel() == max(runtime.activation_bytes, 1)  # one buffer for all stages
    assert len(runtime.loaded()) == (1 if weights == "cycled" else len(runtime.stages))

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["launches", "cuda-graphs"])
def test_each_call_returns_a_tensor_the_caller_owns(gpu_engine_build, cuda_graphs):
    from atedm_export.runtime.backends import load_backend

    backend = load_backend("engine", gpu_engine_build, device="cuda", cuda_graphs=cuda_graphs)
    contract = first_view(backend.manifest).contract
    first_feed, second_feed = (contract.example_feed(seed=s, device="cuda") for s in (1, 2))
    stage = first_view(backend.manifest).stages[-1].name
    first = backend.run(stage, first_feed)
    kept = first.clone()
    second = backend.run(stage, second_feed)
    backend.synchronize()
    assert first.data_ptr() != second.data_ptr()
    torch.testing.assert_close(first, kept, atol=0, rtol=0)  # the second call left the first result alone
    assert (first - second).abs().max() > 0


@pytest.mark.slow
@needs_rtx
def test_plan_weights_reads_the_sections_of_every_stage_plan(tiny_engine_build, tmp_path):
    """tools/plan_weights.py: each plan is header + engine section + weight section, and sharing is counted."""
    tiny_build = tiny_engine_build
    report_path = tmp_path / "share.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "plan_weights.py"), str(tiny_build), "--json",
                           str(report_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(report_path.read_text())
    assert report["plans_count"] == len(first_view(read_manifest(tiny_build)).graphs()) == 3
    for row in report["plans"]:
        assert row["engine_bytes"] + row["weight_bytes"] < row["plan_bytes"] < row["engine_bytes"] + row["weight_bytes"] + 4096
    assert 1.0 <= report["copies"] <= 3.0 and "copies of the weights for 3 engines" in done.stdout
