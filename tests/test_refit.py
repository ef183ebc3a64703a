"""``atedm-export refit``: a build's graphs with LoRAs fused into their weights (``refit.py``), and the pieces it is
made of: the byte matcher that finds a parameter in a build's weights (``weights.py``) and onnxruntime's packed
q/k/v layout (``ortfuse.py``).

The LoRAs, the ToMe build with the LoRA in its spec and the session's refit of the ToMe build are conftest.py's;
the build with the LoRA has the baseline graph only (schedule ``none``), which is the graph a refit and a fresh
build are compared on call for call; the refit's pruned graph is checked against eager ToMe with the LoRA
(``verify``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from atedm_export.build import BuildRequest, build
from atedm_export.cli import main
from atedm_export.errors import AtedmError, RefitError
from atedm_export.buildfolder import Manifest, check_same_model, first_view, model_fingerprint, read_manifest
from atedm_export.ortfuse import fusion_options, packed_qkv, packed_qkv_key
from atedm_export.refit import DELTA_FILE, RefitRequest, refit
from atedm_export.runtime.backends import load_backend
from atedm_export.spec import LoraSpec, parse_spec
from atedm_export.verify import verify_build
from atedm_export.weights import HashedStore, Region, StoredWeights, find_parameters, tensor_key, tensor_layout

from .conftest import TOME_SPEC, with_fake_engines


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _feed(manifest: Manifest, seed: int = 1) -> dict[str, torch.Tensor]:
    return first_view(manifest).contract.example_feed(seed=seed)


# --- refit ----------------------------------------------------------------------------------------------------


def test_refit_equals_a_fresh_build_with_the_lora_and_shares_the_base_weights(refitted, lora_build, tiny_tome_build):
    out, result = refitted
    new, base, fresh = read_manifest(out), read_manifest(tiny_tome_build), read_manifest(lora_build)
    assert result.seconds < 30
    # the same graphs, a small delta beside the base weights, which are the build's very file
    assert [g.name for g in first_view(new).graphs()] == [g.name for g in first_view(base).graphs()]
    assert new.weights == base.weights and new.weights_delta.path == f"onnx/{DELTA_FILE}"
    assert os.stat(out / new.weights.path).st_ino == os.stat(tiny_tome_build / base.weights.path).st_ino
    assert new.weights_delta.bytes < base.weights.bytes / 5
    assert {f.path for f in new.files()} == {f.path for f in base.files()} | {new.weights_delta.path}
    assert new.loras == fresh.loras and model_fingerprint(first_view(new)) == model_fingerprint(first_view(fresh))
    assert new.refit.build == str(tiny_tome_build) and new.refit.origin_sha256 == new.refit.manifest_sha256
    # call for call, the refit's baseline is the fresh build's (onnxruntime); its ToMe graph is eager ToMe with the LoRA
    feed = _feed(new)
    refit_out = load_backend("onnxruntime", out).run("baseline", feed)
    assert torch.equal(refit_out, load_backend("onnxruntime", lora_build).run("baseline", feed))
    assert not torch.allclose(refit_out, load_backend("onnxruntime", tiny_tome_build).run("baseline", feed), atol=1e-3)
    checks = verify_build(out)
    assert {c.graph for c in checks} == {"baseline", "main"} and all(c.passed and c.max_abs < 1e-4 for c in checks)
    with pytest.raises(AtedmError, match="differ in loras"):
        check_same_model([tiny_tome_build, out], [first_view(base), first_view(new)], "eval")


def test_refit_cli_says_each_stage_and_refuses_what_it_must(tiny_tome_build, loras, tmp_path):
    out = tmp_path / "r"
    result = _cli("refit", str(tiny_tome_build), "--lora", f"{loras['kohya']}:0.8", "--out", str(out))
    assert result.exit_code == 0, result.output
    for stage in ("loras", "graphs", "model", "match", "fuse", "delta", "weights"):
        assert f"  {stage} " in result.output
    assert "hard-linked" in result.output and "hashing" in result.output and "writing" in result.output
    again = _cli("refit", str(tiny_tome_build), "--lora", str(loras["kohya"]), "--out", str(out))
    assert again.exit_code == 2 and "already exists; pass --force" in again.output
    inside = _cli("refit", str(tiny_tome_build), "--lora", str(loras["kohya"]), "--out", str(tiny_tome_build / "x"))
    assert inside.exit_code == 2 and f"and build {tiny_tome_build.resolve()} overlap" in inside.output
    assert _cli("refit", str(tiny_tome_build), "--out", str(out)).exit_code == 2  # --lora is required


def test_refit_names_a_parameter_it_cannot_place(tmp_path):
    """By content: a parameter found nowhere, found twice, or whose bytes another parameter shares is refused."""
    a, b = torch.arange(12, dtype=torch.float32).reshape(3, 4), torch.arange(12, 24, dtype=torch.float32).reshape(3, 4)
    data = np.concatenate([a.t().contiguous().numpy().ravel(), a.t().contiguous().numpy().ravel()]).view(np.uint8)
    (tmp_path / "w.data").write_bytes(data.tobytes())
    weights = StoredWeights(tmp_path, ["w.data"])
    try:
        one, two = Region("w.data", 0, 48), Region("w.data", 48, 48)
        places = find_parameters({"a": a, "b": b}, ["a"], weights, {one})
        assert [(p.region, p.transposed) for p in places["a"]] == [(one, True)]
        with pytest.raises(RefitError, match="parameter 'b' is not in the build's weights"):
            find_parameters({"a": a, "b": b}, ["b"], weights, {one})
        with pytest.raises(RefitError, match="parameter 'a' is stored 2 times"):
            find_parameters({"a": a, "b": b}, ["a"], weights, {one, two})
        with pytest.raises(RefitError, match="parameter 'a' has the same bytes as 'c'"):
            find_parameters({"a": a, "c": a.clone()}, ["a"], weights, {one})
    finally:
        weights.close()


def test_refittable_stripped_plans_are_linked_and_others_rebuilt_or_dropped(tiny_tome_build, loras, tmp_path):
    stripped = tmp_path / "stripped"
    with_fake_engines(tiny_tome_build, stripped, weights_stripped=True, refittable=True)
    request = RefitRequest(stripped, (LoraSpec(file=str(loras["style"])),), tmp_path / "linked")
    new = refit(request).manifest
    assert new.engine.refittable and not new.engine.skipped
    for entry in first_view(new).graphs():
        assert os.stat(tmp_path / "linked" / entry.engine.path).st_ino == os.stat(stripped / entry.engine.path).st_ino
    identical = tmp_path / "identical"
    with_fake_engines(tiny_tome_build, identical, weights_stripped=True)
    result = refit(RefitRequest(identical, request.loras, tmp_path / "dropped"))
    assert all(g.engine is None for g in result.manifest.all_graphs())
    assert "REFIT_IDENTICAL" in result.manifest.engine.skipped and any("engines dropped" in n for n in result.notes)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_refit_force_never_replaces_what_it_did_not_write_nor_its_own_input(tiny_tome_build, loras, tmp_path):
    """``--force`` onto a folder of the user's own, and an output that holds the build it reads: both refused in one
    line before any work, every file as it was."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes\n")
    nest = tmp_path / "nest"
    shutil.copytree(tiny_tome_build, nest / "inner")
    (nest / "sibling.txt").write_text("beside the build\n")
    before = _tree(tmp_path)
    user = _cli("refit", str(tiny_tome_build), "--lora", str(loras["kohya"]), "--out", str(mine), "--force")
    assert user.exit_code == 2 and "was not written by atedm-export" in user.output, user.output
    around = _cli("refit", str(nest / "inner"), "--lora", str(loras["kohya"]), "--out", str(nest), "--force")
    assert around.exit_code == 2 and "overlap" in around.output, around.output
    for result in (user, around):
        assert [line for line in result.output.splitlines() if line.strip()] == [result.output.strip()]
    assert _tree(tmp_path) == before


# --- the pieces: onnxruntime's packed q/k/v layout, the byte matcher, the delta's store ---------------------------


def test_packed_qkv_is_what_onnxruntimes_fusion_writes_under_our_options():
    """``ortfuse.packed_qkv`` of three random q/k/v weights is the tensor onnxruntime's UNet self-attention fusion
    writes with ``fusion_options()`` (its q/k/v bias all zeros), and ``packed_qkv_key`` is that tensor's key."""
    from onnx import helper, numpy_helper
    from onnxruntime.transformers.fusion_attention_unet import FusionAttentionUnet
    from onnxruntime.transformers.onnx_model import OnnxModel

    torch.manual_seed(0)
    parts = [torch.randn(8, 8) for _ in range(3)]  # Linear weights, [out, in]; the graph's MatMuls hold [in, out]
    nodes = [helper.make_node("MatMul", ["x", f"w{p}"], [p], name=p) for p in "qkv"]
    graph = helper.make_graph(
        nodes, "qkv", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8])],
        [helper.make_tensor_value_info(p, onnx.TensorProto.FLOAT, None) for p in "qkv"],
        [numpy_helper.from_array(w.t().contiguous().numpy(), f"w{p}") for w, p in zip(parts, "qkv")])
    model = OnnxModel(helper.make_model(graph))
    options = fusion_options()
    fusion = FusionAttentionUnet(model, 8, 2, is_cross_attention=False, enable_packed_qkv=options.enable_packed_qkv,
                                 enable_packed_kv=options.enable_packed_kv)
    node = fusion.create_attention_node(*nodes, num_heads=2, hidden_size=8, input="x", output="y")
    assert node is not None and node.op_type == "Attention"
    written = {t.name.removeprefix(f"{node.name}_"): numpy_helper.to_array(t) for t in model.model.graph.initializer
               if t.name.startswith(f"{node.name}_")}
    assert set(written) == {"qkv_weight", "qkv_bias"} and not written["qkv_bias"].any()
    np.testing.assert_array_equal(written["qkv_weight"], packed_qkv(parts).numpy())
    for width in (8, 64):  # rows shorter than the key's bytes, and longer
        wide = [torch.randn(width, 4) for _ in range(3)]
        assert packed_qkv_key(wide) == tensor_key(packed_qkv(wide), False)


def test_the_matcher_finds_a_tensor_stored_as_it_is_and_transposed(tmp_path):
    """A 2-D weight stored both ways (two graphs of one build may), a bias and a bfloat16 weight: each found where
    it is, in the layout it is stored in, and its bytes in that layout are what the file holds."""
    torch.manual_seed(0)
    params = {"w": torch.randn(3, 5), "b": torch.randn(7), "h": torch.randn(4, 6).to(torch.bfloat16)}
    stored = [("w", False), ("b", False), ("w", True), ("h", True)]
    regions, offset, data = {}, 0, b""
    for name, transposed in stored:
        chunk = tensor_layout(params[name], transposed).tobytes()
        regions[name, transposed] = Region("w.data", offset, len(chunk))
        data, offset = data + chunk, offset + len(chunk)
    (tmp_path / "w.data").write_bytes(data)
    weights = StoredWeights(tmp_path, ["w.data"])
    try:
        places = find_parameters(params, ["w", "b", "h"], weights, set(regions.values()))
        for name in params:
            assert {(p.region, p.transposed) for p in places[name]} == {
                (region, transposed) for (other, transposed), region in regions.items() if other == name}
        assert all(weights.view(r).tobytes() == tensor_layout(params[n], t).tobytes() for (n, t), r in regions.items())
    finally:
        weights.close()


def test_the_delta_store_is_hashed_as_written_and_keeps_one_copy_per_identity(tmp_path):
    with HashedStore(tmp_path / "delta.data") as store:
        first = store.put(np.arange(10, dtype=np.uint8), "region a")
        again = store.put(np.arange(10, dtype=np.uint8), "region a")
        other = store.put(np.arange(10, dtype=np.uint8), "region b")
        digest = store.hexdigest()
    assert first == again != other
    assert digest == hashlib.sha256((tmp_path / "delta.data").read_bytes()).hexdigest()


# --- slow: AT-EDM with onnxruntime's fused graphs ----------------------------------------------------------------


@pytest.mark.slow
def test_refit_of_an_atedm_build_with_onnxruntime_fused_graphs(loras, tmp_path):
    """AT-EDM (the map layer reads its block's first q/k) with onnxruntime's fused graphs, whose q/k/v stacks refit
    rewrites; then a refit of that refit with a second LoRA (the earlier delta's tensors carried into the new one)."""
    spec = {**{k: v for k, v in TOME_SPEC.items() if k != "method"}, "name": "atedm"}  # AT-EDM: the default method
    build(BuildRequest(parse_spec(spec), tmp_path / "base", library="onnx", ort_fusion=True))
    first = refit(RefitRequest(tmp_path / "base", (LoraSpec(file=str(loras["style"]), scale=0.8),), tmp_path / "r1"))
    assert all(g.ort_onnx is not None for g in first.manifest.all_graphs()) and not first.notes
    second = refit(RefitRequest(tmp_path / "r1", (LoraSpec(file=str(loras["other"]), scale=-0.5),), tmp_path / "r2"))
    assert [lora.scale for lora in second.manifest.loras] == [0.8, -0.5]
    assert second.manifest.refit.origin_sha256 == first.manifest.refit.origin_sha256
    for out in (tmp_path / "r1", tmp_path / "r2"):
        checks = verify_build(out)
        assert {c.backend for c in checks} == {"onnxruntime", "onnxruntime-fused"}
        assert all(c.passed and c.max_abs < 1e-4 for c in checks), checks
