"""What the build folder's owner (``atedm_export.buildfolder``) promises: one record, read in every format this
version knows, a frozen view per shape, one spelling of a graph's id and label, and one writer that validates a
changed record as a whole and never leaves a manifest half-written."""

from __future__ import annotations

import json
import shutil

import pytest

from atedm_export.buildfolder import (FORMAT, MANIFEST, ManifestError, ShapeError, ShapeView, first_view, graph_id,
                                      graph_label, read_manifest, rewrite, view_at, view_for_latent, views,
                                      write_manifest)
from atedm_export.buildfolder.layout import engine_file, graph_file
from atedm_export.buildfolder.store import migrate
from atedm_export.shapes import Shape


def _as_format_3(data: dict) -> dict:
    """What the previous version wrote for the same build: graphs without their shape, the engine library named
    ``backend`` (``onnx`` for none) and its Python module ``library``."""
    old = json.loads(json.dumps(data))
    old["format"] = "atedm-export.manifest/3"
    for shape in old["shapes"]:
        for graph in (shape["baseline"], *shape["stages"]):
            del graph["shape"]
    engine = old["engine"]
    engine["backend"] = engine.pop("library") or "onnx"
    engine["library"] = engine.pop("module")
    return old


def test_a_manifest_written_before_graphs_knew_their_shape_still_loads(tiny_multi_build, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(tiny_multi_build, copy)
    new = read_manifest(tiny_multi_build, verify=False)
    (copy / MANIFEST).write_text(json.dumps(_as_format_3(json.loads((tiny_multi_build / MANIFEST).read_text()))))
    old = read_manifest(copy)  # every checksum too: the files are the build's
    assert old.format == FORMAT and old == new
    assert not new.engine.built and new.engine.library is None
    assert migrate(json.loads((tiny_multi_build / MANIFEST).read_text())) == json.loads((tiny_multi_build / MANIFEST).read_text())


def test_an_unknown_format_is_refused_in_one_line(tiny_build, tmp_path):
    copy = tmp_path / "future"
    shutil.copytree(tiny_build, copy)
    data = json.loads((copy / MANIFEST).read_text())
    data["format"] = "atedm-export.manifest/9"
    (copy / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"has format 'atedm-export.manifest/9'; this atedm-export reads "
                                            r"'atedm-export.manifest/4' \(rebuild it\)"):
        read_manifest(copy)


def test_each_graph_knows_its_shape_and_its_steps(tiny_multi_build):
    manifest = read_manifest(tiny_multi_build, verify=False)
    for view in views(manifest):
        for entry in view.graphs():
            assert entry.shape == view.shape.key
            assert entry.step_count == len(entry.step_range) == entry.steps[1] - entry.steps[0]
        assert sum(stage.step_count for stage in view.stages) == view.graph_spec.steps


def test_a_graph_moved_under_another_shape_is_refused(tiny_multi_build, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(tiny_multi_build, copy)
    data = json.loads((copy / MANIFEST).read_text())
    data["shapes"][0]["stages"][0], data["shapes"][1]["stages"][0] = data["shapes"][1]["stages"][0], data["shapes"][0]["stages"][0]
    (copy / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"graph '\w+' says shape .* under shape"):
        read_manifest(copy, verify=False)


def test_views_are_frozen_and_each_reads_its_own_shape(tiny_multi_build):
    manifest = read_manifest(tiny_multi_build, verify=False)
    shapes = views(manifest)
    assert [v.shape for v in shapes] == manifest.shape_list and first_view(manifest) == shapes[0]
    for view in shapes:
        assert view_at(manifest, view.shape) == view
        assert view_for_latent(manifest, *view.shape.latent) == view
        assert view.inputs[0].shape[0] == view.shape.batch and view.graph_spec.width == view.shape.width
        assert view.contract.inputs[0].shape[0] == view.shape.batch  # each view its own contract, never a cached one
    with pytest.raises(AttributeError):
        shapes[0].graphs_at = shapes[1].graphs_at  # type: ignore[misc]
    with pytest.raises(ShapeError, match="this build has no graphs for 64x64 batch 2"):
        view_at(manifest, Shape(batch=2, height=64, width=64))


def test_one_spelling_of_a_graphs_id_label_and_files(tiny_build, tiny_multi_build, tmp_path):
    single = first_view(read_manifest(tiny_build, verify=False))
    assert (single.graph_id("main"), single.label("main")) == ("main", "main") == (graph_id("main", None), graph_label("main", None))
    assert single.graph("main").onnx.path == "onnx/main.onnx"
    multi = views(read_manifest(tiny_multi_build, verify=False))[1]
    key = multi.shape.key
    assert (multi.graph_id("main"), multi.label("main")) == (f"main.{key}", f"main@{key}")
    assert multi.graph("main").onnx.path == f"onnx/main.{key}.onnx"
    assert graph_file(tmp_path, "main", key, "plugin") == tmp_path / "onnx" / f"main.{key}.plugin.onnx"
    assert engine_file(tmp_path, "main", None, "tensorrt", "sm90") == tmp_path / "engines" / "main.tensorrt.sm90.plan"


def test_rewrite_changes_every_shapes_graphs_and_validates_the_whole_record(tiny_multi_build):
    manifest = read_manifest(tiny_multi_build, verify=False)
    changed = rewrite(manifest, lambda entry: {"compile_seconds": 1.5}, build_seconds=2.0)
    assert all(g.compile_seconds == 1.5 for g in changed.all_graphs()) and changed.build_seconds == 2.0
    assert changed.model_dump(exclude={"shapes", "build_seconds"}) == manifest.model_dump(exclude={"shapes", "build_seconds"})
    assert all(g.compile_seconds is None for g in manifest.all_graphs())  # the record it was given is unchanged
    with pytest.raises(ValueError, match="says shape"):
        rewrite(manifest, lambda entry: {"shape": "1x1-b1"})


def test_the_manifest_is_written_whole_or_not_at_all(tiny_build, tmp_path, monkeypatch):
    folder = tmp_path / "build"
    folder.mkdir()
    manifest = read_manifest(tiny_build, verify=False)
    write_manifest(folder, manifest)
    before = (folder / MANIFEST).read_bytes()
    assert json.loads(before) == manifest.model_dump(mode="json")
    later = rewrite(manifest, build_seconds=9.0)

    def full_disk(*args, **kwargs):  # noqa: ANN002, ANN003
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_manifest(folder, later)
    assert (folder / MANIFEST).read_bytes() == before and sorted(p.name for p in folder.iterdir()) == [MANIFEST]


def test_a_shape_view_is_what_the_runtime_takes(tiny_multi_build):
    from atedm_export.runtime.backends import load_backend

    backend = load_backend("onnxruntime", tiny_multi_build)
    assert isinstance(backend.view, ShapeView) and backend.view == first_view(backend.manifest)
    other = views(backend.manifest)[1]
    shaped = backend.at(other)
    assert shaped.view == other and shaped is not backend and backend.at(backend.view) is backend
