"""Multi-shape builds: one graph per (shape, stage) over one weights file, each shape's graphs picked by the input.

The session's ``tiny_multi_build`` (conftest ``MULTI_SPEC``) holds tiny-sd15 at 128x128 and 192x128 with batch 2, and
128x128 with batch 4: two resolutions, two batch sizes, one stage each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from diffusers import EulerDiscreteScheduler

from atedm_export.cli import main
from atedm_export.errors import AtedmError, SpecError
from atedm_export.buildfolder import ManifestError, ShapeError, find_view, read_manifest, view_at, views
from atedm_export.runtime import StagedUNet
from atedm_export.runtime.pipeline import SDXL_SCHEDULER
from atedm_export.shapes import Shape, parse_shape
from atedm_export.spec import load_spec, parse_spec

from .conftest import MULTI_SPEC, sample_loop

SHAPES = [Shape(**s) for s in MULTI_SPEC["shapes"]]


# --- the spec ----------------------------------------------------------------------------------


def test_shapes_in_a_spec_set_the_first_shape_and_round_trip():
    spec = parse_spec(dict(MULTI_SPEC))
    assert spec.shape_list == tuple(SHAPES)
    assert (spec.batch, spec.height, spec.width) == (2, 128, 128)
    assert parse_spec(spec.model_dump(mode="json")) == spec  # what the manifest records parses back
    at = spec.at(SHAPES[1])
    assert (at.batch, at.height, at.width, at.shapes) == (2, 128, 192, None)
    one = parse_spec({**MULTI_SPEC, "shapes": [{"height": 256, "width": 128}]})
    assert one.shapes is None and (one.batch, one.height, one.width) == (2, 256, 128)


def test_sdxl_buckets_preset_and_its_keep_counts():
    """The seven ~1 MP buckets, each planned at its own token counts (meta device: no weights)."""
    from atedm_export.build import BuildRequest, _prepare

    sdxl = load_spec("sdxl-base-1024").model_dump(mode="json")
    spec = parse_spec({**sdxl, "shapes": "sdxl-buckets", "height": 1024, "width": 1024, "batch": 2})
    assert [s.key for s in spec.shape_list] == ["1024x1024-b2", "1152x896-b2", "896x1152-b2", "1216x832-b2",
                                                "832x1216-b2", "1344x768-b2", "768x1344-b2"]
    two = parse_spec({**sdxl, "shapes": [s.model_dump() for s in spec.shape_list[::3]]})  # 1024², 1216x832, 768x1344
    model = _prepare(BuildRequest(two, Path("unused")), [0, 1])
    finest = {at.shape.key: max(b.tokens for b in at.blocks) for at in model.shapes}
    assert finest == {"1024x1024-b2": 64 * 64, "1216x832-b2": 76 * 52, "768x1344-b2": 48 * 84}
    main_stage = {at.shape.key: at.plans[1].keep for at in model.shapes}
    assert main_stage["1216x832-b2"]["down_blocks.1.attentions.0"] == round(0.37 * 76 * 52)


@pytest.mark.parametrize("shapes, message", [
    ([], "shapes: expected a non-empty list"),
    ("buckets", "unknown set 'buckets'; expected a list of shapes or one of: sdxl-buckets"),
    ([{"height": 128, "width": 128}, {"width": 128, "height": 128}], "shapes: 128x128-b2 is listed twice"),
    ([{"height": 130, "width": 128}], "shapes[0]: height: must be a multiple of 8"),
    ([{"height": 128, "width": 128, "depth": 3}], "shapes[0]: unknown key 'depth'"),
])
def test_bad_shapes_are_one_line(shapes, message):
    with pytest.raises(SpecError, match=None) as caught:
        parse_spec({**MULTI_SPEC, "shapes": shapes})
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_shapes_beside_another_height_are_refused():
    with pytest.raises(SpecError, match="height: 512 beside shapes: give shapes, or one batch/height/width"):
        parse_spec({**MULTI_SPEC, "height": 512})


def test_parse_shape_from_the_command_line():
    assert parse_shape("1216x832") == Shape(width=1216, height=832, batch=2)
    assert parse_shape("1216x832:4") == Shape(width=1216, height=832, batch=4)
    for bad in ("1216", "1216x832x2", "1216x830"):
        with pytest.raises(SpecError, match=f"shape '{bad}'"):
            parse_shape(bad)


# --- the build (slow: the session's 3-shape build is six exports, ~80 s on 2 cores) ------------------


@pytest.mark.slow
def test_multi_shape_build_shares_one_weights_file(tiny_multi_build):
    manifest = read_manifest(tiny_multi_build)
    assert manifest.shape_list == SHAPES and manifest.multi_shape
    data_files = sorted(p.name for p in (tiny_multi_build / "onnx").iterdir() if not p.name.endswith(".onnx"))
    assert data_files == ["weights.onnx.data"]
    graphs = {e.onnx.path for e in manifest.all_graphs()}
    assert len(graphs) == 2 * len(SHAPES)  # baseline and main per shape, each its own static graph
    assert all(path.endswith(f".{view.shape.key}.onnx") for view in views(manifest) for path in
               (e.onnx.path for e in view.graphs()))
    for view, shape in zip(views(manifest), SHAPES):
        assert view.inputs[0].shape == [shape.batch, 4, shape.height // 8, shape.width // 8]
        tokens = (shape.height // 8) * (shape.width // 8)  # SD 1.5 attends at the latent size first
        assert view.tokens["down_blocks.0.attentions.0"] == tokens
        assert view.stages[0].keep["down_blocks.0.attentions.0"] == round(0.37 * tokens)
    graph_bytes = sum((tiny_multi_build / p).stat().st_size for p in graphs)
    assert graph_bytes < 6 * 1.5 * 2**20  # each graph file is small; the weights are stored once


@pytest.mark.slow
def test_multi_shape_graphs_verify_at_their_shape(tiny_multi_build):
    from atedm_export.verify import verify_build

    checks = verify_build(tiny_multi_build, shapes=[SHAPES[1]])  # the loop test below runs every shape
    assert [c.graph for c in checks] == ["baseline@192x128-b2", "main@192x128-b2"]
    assert all(c.passed and c.cosine > 0.99999 for c in checks), checks


class _Recorder(torch.nn.Module):
    """Passes every call to ``model`` and keeps its inputs and output."""

    def __init__(self, model: StagedUNet) -> None:
        super().__init__()
        self.model, self.calls = model, []

    def set_timesteps(self, timesteps) -> None:  # noqa: ANN001
        self.model.set_timesteps(timesteps)

    def forward(self, sample, t, encoder_hidden_states, added_cond_kwargs=None):  # noqa: ANN001, ANN201
        out = self.model(sample, t, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
        self.calls.append((sample.clone(), t, encoder_hidden_states, out.sample))
        return out


@pytest.mark.slow
def test_a_sampling_loop_at_each_shape_equals_eager_per_call(tiny_multi_build):
    """One StagedUNet runs a whole loop at every shape of the build; each call equals the eager module's on the
    same inputs (per call: near-uniform random maps flip kept tokens over a trajectory, DESIGN.md §6)."""
    ort = StagedUNet.load(tiny_multi_build, backend="onnxruntime")
    eager = StagedUNet.load(tiny_multi_build, backend="eager")
    manifest = ort.manifest
    for shape in SHAPES:
        recorder = _Recorder(ort)
        final = sample_loop(recorder, EulerDiscreteScheduler(**SDXL_SCHEDULER), view_at(manifest, shape).contract, 2)
        assert list(final.shape) == [shape.batch, 4, shape.height // 8, shape.width // 8]
        eager.set_timesteps(_timesteps(2))
        for sample, t, text, out in recorder.calls:
            expected = eager(sample, t, text).sample
            torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-3)
    assert ort.stats["main"].calls == 2 * len(SHAPES)


def _timesteps(steps: int) -> torch.Tensor:
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps


@pytest.mark.slow
def test_a_shape_the_build_lacks_is_one_line(tiny_multi_build):
    staged = StagedUNet.load(tiny_multi_build, backend="onnxruntime")
    staged.set_timesteps(_timesteps(4))
    with pytest.raises(ShapeError) as caught:
        staged(torch.zeros(2, 4, 24, 24), _timesteps(4)[0], torch.zeros(2, 77, 32))
    assert str(caught.value) == ("no graphs for batch 2 at 192x192 px (latent 24x24); this build has: 128x128-b2, "
                                 "192x128-b2, 128x128-b4")
    with pytest.raises(ShapeError, match="no graphs for width 640; it has: 128x128-b2, 192x128-b2, 128x128-b4"):
        find_view(staged.manifest, width=640)
    assert find_view(staged.manifest, height=128, batch=4).shape == SHAPES[2]


@pytest.mark.slow
def test_cli_generate_at_two_shapes_inspect_grid_and_missing_shape(tiny_multi_build, tmp_path):
    from PIL import Image

    runner = CliRunner()
    for width, name in ((128, "square.png"), (192, "wide.png")):
        result = runner.invoke(main, ["generate", str(tiny_multi_build), "-p", "a red fox", "--steps", "2",
                                      "--width", str(width), "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert Image.open(tmp_path / name).size == (width, 128)
    result = runner.invoke(main, ["generate", str(tiny_multi_build), "-p", "x", "--width", "640", "-o",
                                  str(tmp_path / "no.png")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == ("error: this build has no graphs for width 640; it has: 128x128-b2, 192x128-b2, "
                                     "128x128-b4 (width x height, batch)")
    assert not (tmp_path / "no.png").exists()
    result = runner.invoke(main, ["inspect", str(tiny_multi_build)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "3 shapes (128x128-b2, 192x128-b2, 128x128-b4)" in result.output
    assert all(key in result.output for key in ("192x128-b2", "128x128-b4", "kept tokens per attention block at"))
    data = json.loads(runner.invoke(main, ["inspect", str(tiny_multi_build), "--json"]).output)
    assert [s["shape"] for s in data["shapes"]] == [s.key for s in SHAPES]
    assert data["weights"]["graphs_sharing"] == 6 and data["graphs"] == data["shapes"][0]["graphs"]
    assert data["shapes"][1]["graphs"][1]["onnx"] == "onnx/main.192x128-b2.onnx"


@pytest.mark.slow
def test_manifest_shapes_must_be_the_specs(tiny_multi_build, tmp_path):
    data = json.loads((tiny_multi_build / "manifest.json").read_text())
    data["shapes"] = data["shapes"][:2]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="shapes: 128x128-b2, 192x128-b2 are recorded, but its spec lists "
                                            "128x128-b2, 192x128-b2, 128x128-b4"):
        read_manifest(tmp_path, verify=False)


@pytest.mark.slow
def test_bench_times_the_shape_asked_for(tiny_multi_build):
    from atedm_export.bench import run_bench

    report = run_bench(tiny_multi_build, ["onnxruntime"], warmup=0, repeats=1, shape=SHAPES[2])
    assert report["shape"] == "128x128-b4" and report["batch"] == 4
    with pytest.raises(AtedmError, match="no graphs for 640x128 batch 2"):
        run_bench(tiny_multi_build, ["onnxruntime"], warmup=0, repeats=1, shape=Shape(width=640, height=128))


def test_generate_writes_every_image_a_batch_draws(tiny_multi_build, tmp_path):
    """``--batch 4`` with guidance draws two images a call: both are written (``fox.png``, ``fox-2.png``), not one."""
    from PIL import Image

    result = CliRunner().invoke(main, ["generate", str(tiny_multi_build), "-p", "a red fox", "--steps", "2",
                                       "--batch", "4", "-o", str(tmp_path / "fox.png")], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox-2.png", "fox.png"]
    assert "draws 2 images a call" in result.output
    first, second = (Image.open(tmp_path / name) for name in ("fox.png", "fox-2.png"))
    assert first.size == second.size == (128, 128) and first.tobytes() != second.tobytes()
