"""The runtime: StagedUNet across a denoising loop, generate, bench, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import EulerDiscreteScheduler
from PIL import Image

from atedm_export.build import BuildRequest, build
from atedm_export.cli import main
from atedm_export.errors import AtedmError
from atedm_export.buildfolder import ManifestError, first_view, read_manifest
from atedm_export.runtime import ScheduleError, StagedUNet, load_backend
from atedm_export.runtime.backends import RuntimeInputError
from atedm_export.runtime.pipeline import SDXL_SCHEDULER
from atedm_export.spec import load_spec

from .conftest import sample_loop


def _denoise(staged: StagedUNet, num_steps: int, seed: int = 0) -> torch.Tensor:
    """A plain Euler loop (no pipeline): what a custom sampler does with a StagedUNet."""
    return sample_loop(staged, EulerDiscreteScheduler(**SDXL_SCHEDULER), first_view(staged.manifest).contract, num_steps, seed)


@pytest.mark.parametrize("num_steps", [20, 7, 1])
def test_onnxruntime_loop_equals_eager_loop_and_switches_stages_on_schedule(tiny_build, num_steps):
    onnx = StagedUNet.load(tiny_build, backend="onnxruntime")
    eager = StagedUNet.load(tiny_build, backend="eager")
    got, want = _denoise(onnx, num_steps), _denoise(eager, num_steps)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    ranges = onnx.schedule.step_ranges(num_steps)
    for staged in (onnx, eager):
        for stage, steps in zip(first_view(onnx.manifest).stages, ranges):
            assert staged.stats[stage.name].calls == len(steps)
            assert staged.stats[stage.name].steps == list(steps)


def test_stock_pipeline_runs_with_staged_unet(tiny_build):
    from atedm_export.runtime.pipeline import load_pipeline

    staged = StagedUNet.load(tiny_build, backend="onnxruntime")
    pipe = load_pipeline(staged)
    assert pipe.unet is staged
    image = pipe("a red fox", num_inference_steps=4, height=256, width=256, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (256, 256, 3) and np.isfinite(image).all()
    assert [r["calls"] for r in staged.stage_report()] == [0, 4]  # paper: the early stage ends at round(0.1 × 4) = 0


def test_generate_writes_a_deterministic_png(tiny_build, tmp_path):
    paths = [tmp_path / name for name in ("a.png", "b.png", "c.png")]
    for path, seed in zip(paths, (7, 7, 8)):
        result = CliRunner().invoke(main, ["generate", str(tiny_build), "--prompt", "a red fox", "--steps", "4",
                                           "--seed", str(seed), "-o", str(path)])
        assert result.exit_code == 0, result.output
        assert "early" in result.output and "main" in result.output
    images = [np.asarray(Image.open(p)) for p in paths]
    assert images[0].shape == (256, 256, 3)
    assert np.array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png"]


def test_bench_json_is_consistent(tiny_build, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(tiny_build), "--repeats", "2", "--warmup", "0",
                                       "--json", str(out), "--csv", str(tmp_path / "b.csv"), "--plot", str(tmp_path / "b.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["backends"] == ["eager", "onnxruntime"]
    rows = {(r["backend"], r["graph"]): r for r in report["rows"]}
    assert set(rows) == {(b, g) for b in ("eager", "onnxruntime") for g in ("baseline", "early", "main")}
    eager_stock = rows[("eager", "baseline")]["median_ms"]
    assert {(b, r["form"]) for b, r in report["references"].items()} == {("eager", "sdpa"), ("onnxruntime", "unfused")}
    for (backend, graph), r in rows.items():
        samples = report["samples_ms"][f"{backend}/{r['form']}/{graph}"]
        assert len(samples) == 2 and r["median_ms"] == pytest.approx(float(np.median(samples)))
        assert r["speedup_vs_eager"] == pytest.approx(eager_stock / r["median_ms"])
        assert r["speedup_vs_unpruned"] == pytest.approx(rows[(backend, "baseline")]["median_ms"] / r["median_ms"])
        assert r["flops_speedup"] == pytest.approx(rows[(backend, "baseline")]["graph_tflops"] / r["graph_tflops"])
    for s in report["schedule"]:
        per_image = sum(rows[(s["backend"], g)]["median_ms"] * rows[(s["backend"], g)]["steps"] for g in ("early", "main")) / 1e3
        assert s["seconds_per_image"] == pytest.approx(per_image)
        assert s["speedup_vs_unpruned"] == pytest.approx(s["unpruned_seconds_per_image"] / per_image)
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "b.csv").read_text().startswith("build,method,backend,graph,")


# --- bad input -----------------------------------------------------------------------------------


@pytest.fixture()
def feed(tiny_build):
    return first_view(read_manifest(tiny_build)).contract.example_feed()


def test_wrong_shape_and_dtype_name_the_expected_values(tiny_build, feed):
    backend = load_backend("onnxruntime", tiny_build)
    with pytest.raises(RuntimeInputError, match=r"'sample' has shape \[2, 4, 64, 64\]; the build expects \[2, 4, 32, 32\].*256x256"):
        backend.run("main", {**feed, "sample": torch.zeros(2, 4, 64, 64)})
    with pytest.raises(RuntimeInputError, match="'encoder_hidden_states' is torch.float16; the build expects float32"):
        backend.run("main", {**feed, "encoder_hidden_states": feed["encoder_hidden_states"].half()})
    with pytest.raises(AtedmError, match="build has no graph 'late'"):
        backend.run("late", feed)


def test_fp32_cpu_sessions_use_the_mapped_weights_in_place(tiny_build):
    """fp32 on a CPU: no prepacked copies of the weights (they stay mapped from the shared file)."""
    manifest = read_manifest(tiny_build)
    assert first_view(manifest).outputs[0].dtype == "float32"
    backend = load_backend("onnxruntime", tiny_build, manifest)
    options = backend.session(first_view(manifest).graph("main")).get_session_options()
    assert options.get_session_config_entry("session.disable_prepacking") == "1"
    assert not options.enable_mem_pattern  # no second activation plan beside the arena


def test_unknown_backend(tiny_build):
    with pytest.raises(AtedmError, match="unknown backend 'openvino'"):
        load_backend("openvino", tiny_build)
    result = CliRunner().invoke(main, ["bench", str(tiny_build), "--backends", "eager,openvino"])
    assert result.exit_code == 2 and "unknown backend 'openvino'" in result.output


def test_runtime_backend_names_are_the_classes_names():
    """``registry.RUNTIME_BACKENDS`` (read by the CLI without torch) are the names the backend classes declare, and
    an alias chooses its class without being offered as a choice."""
    from atedm_export.registry import ENGINE_LIBRARIES, RUNTIME_BACKENDS
    from atedm_export.runtime.backends import BACKENDS, CHOICES, TensorRTBackend, backend_type, backend_types

    assert CHOICES == set(RUNTIME_BACKENDS) and len(RUNTIME_BACKENDS) == len(CHOICES)
    assert {name for name, cls in BACKENDS.items() if name not in cls.aliases} == set(RUNTIME_BACKENDS)
    assert backend_type("engine") is TensorRTBackend and "engine" not in RUNTIME_BACKENDS
    assert all(backend_type(name).takes_engine_options == (name in ENGINE_LIBRARIES) for name in RUNTIME_BACKENDS)
    assert [cls.name for cls in backend_types(["eager", "onnxruntime"])] == ["eager", "onnxruntime"]
    assert [backend_type(name).stock_form for name in RUNTIME_BACKENDS] == [None, "sdpa", None, None]
    assert backend_type("onnxruntime").reference("unfused", ("fused", "unfused")).endswith("than its fused form)")
    with pytest.raises(AtedmError, match="unknown backend 'engine'; expected some of: onnxruntime, eager, tensorrt"):
        backend_types(["eager", "engine"])
    with pytest.raises(AtedmError, match="unknown backend ''; expected some of"):
        backend_types([])


def test_engine_names_need_a_build_with_engines_of_that_library(tiny_build):
    from atedm_export.runtime.backends import backend_class

    manifest = read_manifest(tiny_build)
    assert backend_class("onnxruntime", tiny_build, manifest).opens == ("portable", "onnxruntime")
    for name in ("engine", "tensorrt-rtx"):
        with pytest.raises(AtedmError, match=f"build {tiny_build} has no engines"):
            backend_class(name, tiny_build, manifest)


def test_missing_and_corrupted_files(tiny_build, tmp_path):
    """A graph the backend opens, corrupted or missing, refuses the build in one line (engine plans, which
    onnxruntime never opens: ``test_runtime_friction.py``)."""
    copy = tmp_path / "b"
    shutil.copytree(tiny_build, copy)
    artifact = copy / first_view(read_manifest(copy)).graph("early").onnx.path
    artifact.write_bytes(artifact.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ManifestError, match="early: .* does not match its checksum"):
        StagedUNet.load(copy)
    artifact.unlink()
    result = CliRunner().invoke(main, ["generate", str(copy), "-p", "x", "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "is missing" in result.output


@pytest.mark.slow
def test_engines_need_a_gpu(tiny_engine_build):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    with pytest.raises(AtedmError, match="needs a CUDA GPU"):
        load_backend("tensorrt-rtx", tiny_engine_build)


def test_a_build_without_engines_says_so_to_the_engine_backends(tiny_build):
    with pytest.raises(AtedmError, match="has no engines .*--library onnx.*rebuild with --library tensorrt or tensorrt-rtx"):
        load_backend("tensorrt-rtx", tiny_build)


@pytest.mark.slow
def test_steps_outside_the_build(tmp_path_factory, tiny_build, feed):
    out = tmp_path_factory.mktemp("partial") / "main-only"
    build(BuildRequest(load_spec("tiny-sd15"), out, library="onnx", stages=("main",)))
    staged = StagedUNet.load(out, backend="onnxruntime")
    with pytest.raises(ScheduleError, match="needs stage 'early' \\(steps 0-1\\), which this build does not have"):
        staged.set_timesteps(range(950, 0, -50))
    staged.set_timesteps([999])  # one step: 'early' is empty, 'main' runs it
    with pytest.raises(ScheduleError, match="timestep 500 is not one of the run's 1 timesteps"):
        staged(feed["sample"], torch.tensor(500.0), feed["encoder_hidden_states"],
               added_cond_kwargs={"text_embeds": feed["text_embeds"], "time_ids": feed["time_ids"]})
    fresh = StagedUNet.load(tiny_build, backend="onnxruntime")
    with pytest.raises(ScheduleError, match="does not know the run's timesteps"):
        fresh(feed["sample"], torch.tensor(500.0), feed["encoder_hidden_states"],
              added_cond_kwargs={"text_embeds": feed["text_embeds"], "time_ids": feed["time_ids"]})
    result = CliRunner().invoke(main, ["generate", str(out), "-p", "x", "--steps", "20", "-o", str(tmp_path_factory.mktemp("g") / "x.png")])
    assert result.exit_code == 2 and "needs stage 'early'" in result.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_backend_matches_onnxruntime_on_gpu(gpu_engine_build):
    manifest = read_manifest(gpu_engine_build)
    feed = first_view(manifest).contract.example_feed()
    engine = load_backend(manifest.engine.library, gpu_engine_build)
    onnx = load_backend("onnxruntime", gpu_engine_build)
    for entry in first_view(manifest).graphs():
        got = engine.run(entry.name, {k: v.cuda() for k, v in feed.items()}).cpu()
        torch.testing.assert_close(got, onnx.run(entry.name, feed), atol=2e-3, rtol=1e-3)


def test_second_order_scheduler_steps_map_to_stages(tiny_build):
    from diffusers import HeunDiscreteScheduler

    staged = StagedUNet.load(tiny_build, backend="onnxruntime")
    scheduler = HeunDiscreteScheduler(**{k: v for k, v in SDXL_SCHEDULER.items() if k != "interpolation_type"})
    scheduler.set_timesteps(20)
    staged._scheduler = scheduler  # what attach(pipe) does
    steps = [staged.locate(t)[0] for t in scheduler.timesteps]
    assert steps[0] == 0 and steps[-1] == 19 and sorted(set(steps)) == list(range(20))
    assert [staged.locate(t)[2] for t in scheduler.timesteps[:3]] == ["early", "early", "early"]
