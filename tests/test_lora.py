"""LoRAs: fused before export (spec ``loras:``), ``atedm-export refit`` (new weights for the same graphs), and
``StagedUNet.use_weights`` (switching them in a running UNet).

The LoRAs are made here from the tiny UNet with PEFT (random A and B, so they change the output) and saved the
way diffusers' training scripts save UNet LoRAs (``save_lora_weights`` of ``convert_state_dict_to_diffusers``);
a kohya copy of the same weights is written by hand. The base build is the session's ToMe build (tiny-sd15,
128 px, fp32); the build with the LoRA in its spec has the baseline graph only (schedule ``none``), which is the
graph a refit and a fresh build are compared on call for call; the refit's pruned graph is checked against eager
ToMe with the LoRA (``verify``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from atedm_export.build import BuildRequest, build
from atedm_export.cli import main
from atedm_export.lora import LoraError, check_loras, fuse_loras, read_lora
from atedm_export.contract import GraphContract
from atedm_export.errors import AtedmError
from atedm_export.manifest import FileEntry, Manifest, ManifestError, check_same_model, sha256
from atedm_export.models import build_unet, load_unet
from atedm_export.refit import DELTA_FILE, RefitError, RefitRequest, Region, _match, _Weights, refit
from atedm_export.runtime.backends import load_backend
from atedm_export.runtime.staged import StagedUNet
from atedm_export.spec import LoraSpec, parse_spec
from atedm_export.verify import verify_build

from .conftest import TOME_SPEC

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]  # proj_in: a 1x1 Conv2d in SD 1.5's blocks


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _peft_lora(seed: int) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA of tiny-sd15 with random A and B (PEFT's ``init_lora_weights=False``), PEFT's keys."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = load_unet("tiny-sd15", seed=0)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    return {k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def _save_diffusers(folder, state: dict[str, torch.Tensor]):  # noqa: ANN001, ANN202
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(state))
    return folder / "pytorch_lora_weights.safetensors"


def _save_kohya(path, state: dict[str, torch.Tensor], alpha: float = 4.0):  # noqa: ANN001, ANN202
    """kohya/A1111 names for the same weights: ``lora_unet_<module_path>.lora_down/lora_up.weight`` and ``alpha``."""
    from safetensors.torch import save_file

    kohya = {}
    for key, value in state.items():
        module, _, rest = key.partition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if rest.startswith('A') else 'lora_up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(kohya, str(path))
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    state = _peft_lora(seed=5)
    (folder / "style").mkdir()
    (folder / "other").mkdir()
    return {"style": _save_diffusers(folder / "style", state), "kohya": _save_kohya(folder / "kohya.safetensors", state),
            "other": _save_diffusers(folder / "other", _peft_lora(seed=7)), "state": state, "folder": folder}


@pytest.fixture(scope="module")
def lora_build(loras, tmp_path_factory):
    """The ToMe spec with the LoRA in it (×0.8), its baseline graph only (schedule none: one graph to export)."""
    out = tmp_path_factory.mktemp("lora-builds") / "with-lora"
    spec = {**TOME_SPEC, "name": "with-lora", "schedule": "none", "loras": [f"{loras['style']}:0.8"]}
    build(BuildRequest(parse_spec(spec), out, backend="onnx"))
    return out


@pytest.fixture(scope="module")
def refitted(tiny_tome_build, loras, tmp_path_factory):
    out = tmp_path_factory.mktemp("refits") / "refitted"
    result = refit(RefitRequest(tiny_tome_build, (LoraSpec(file=str(loras["style"]), scale=0.8),), out))
    return out, result


def _feed(manifest: Manifest, seed: int = 1) -> dict[str, torch.Tensor]:
    return manifest.contract.example_feed(seed=seed)


# --- reading and fusing ---------------------------------------------------------------------------------------


def test_a_lora_changes_the_eager_output_and_kohya_files_fuse_the_same(loras):
    base = load_unet("tiny-sd15", seed=0)
    fused = load_unet("tiny-sd15", seed=0, loras=[LoraSpec(file=str(loras["style"]), scale=0.8)])
    kohya = load_unet("tiny-sd15", seed=0, loras=[LoraSpec(file=str(loras["kohya"]), scale=0.8)])
    assert not any("lora" in n for n, _ in fused.named_modules())  # no PEFT layer left: plain modules, fused weights
    before, after = base.state_dict(), fused.state_dict()
    changed = [n for n, p in after.items() if not torch.equal(p, before[n])]
    assert len(changed) == 144 and all(n.endswith(".weight") for n in changed)  # 16 blocks x (8 attn + proj_in)
    assert any(n.endswith("proj_in.weight") for n in changed)
    for name, param in kohya.state_dict().items():
        torch.testing.assert_close(param, after[name], rtol=0, atol=1e-6)
    inputs = GraphContract.from_config(dict(base.config), 2, 128, 128)
    kwargs = inputs.unet_kwargs(inputs.example_feed(seed=1))
    with torch.no_grad():
        delta = (fused(**kwargs).sample - base(**kwargs).sample).abs().max()
    assert delta > 1e-2
    meta = build_unet(dict(base.config), device="meta")
    assert check_loras([LoraSpec(file=str(loras["style"]))], meta) == sorted(changed)  # read off the skeleton alone
    # several LoRAs fuse one after the other, each at its scale: +0.5 then -0.5 of one file is the base again
    back = load_unet("tiny-sd15", seed=0, loras=[LoraSpec(file=str(loras["style"]), scale=0.5),
                                                  LoraSpec(file=str(loras["style"]), scale=-0.5)])
    for name, param in back.state_dict().items():
        torch.testing.assert_close(param, before[name], rtol=0, atol=1e-6)


def _bad_lora(loras, name: str, edit) -> str:  # noqa: ANN001
    """The LoRA's tensors, edited, in diffusers' PEFT layout (``unet.<module>.lora_A.weight``)."""
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in loras["state"].items()}
    edit(state)
    path = loras["folder"] / f"{name}.safetensors"
    save_file({f"unet.{k}": v for k, v in state.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def bad_loras(loras):
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"

    def rename(state: dict) -> None:
        state[key.replace(".to_q.", ".to_qq.")] = state.pop(key)

    def reshape(state: dict) -> None:
        state[key] = torch.zeros(state[key].shape[0], 48)

    up = key.replace("lora_A", "lora_B")
    edits = {
        "nan": lambda state: state[key].view(-1)[:1].fill_(float("nan")),
        "inf": lambda state: state[up].view(-1)[:1].fill_(float("inf")),
        "huge": lambda state: state.update({key: state[key] * 1e6, up: state[up] * 1e6}),
        "int32": lambda state: state.update({key: state[key].to(torch.int32)}),
        "rank-mismatch": lambda state: state.update({key: torch.cat([state[key], state[key]])}),
        "rank-0": lambda state: state.update({key: state[key][:0], up: state[up][:, :0]}),
        "only-a": lambda state: state.pop(up),
    }
    bad = {name: _bad_lora(loras, f"bad-{name}", edit) for name, edit in
           edits.items()}
    return {"name": _bad_lora(loras, "bad-name", rename), "shape": _bad_lora(loras, "bad-shape", reshape), **bad}


def test_a_lora_that_does_not_fit_the_unet_is_one_line(bad_loras, tmp_path):
    meta = build_unet(dict(load_unet("tiny-sd15").config), device="meta")
    with pytest.raises(LoraError, match=r"^LoRA bad-name.safetensors: tensor 'unet\.down_blocks\.0\..*attn1\.to_qq\."
                                        r"lora_A\.weight' targets '.*attn1\.to_qq', which this UNet does not have"):
        check_loras([LoraSpec(file=bad_loras["name"])], meta)
    with pytest.raises(LoraError, match=r"^LoRA bad-shape.safetensors: tensor '.*attn1\.to_q\.lora_A\.weight' has "
                                        r"shape \[4, 48\]; '.*attn1\.to_q' \(Linear 32→32\) takes \[r, 32\]$"):
        check_loras([LoraSpec(file=bad_loras["shape"])], meta)
    with pytest.raises(LoraError, match="LoRA file .*missing.safetensors does not exist"):
        read_lora(str(tmp_path / "missing.safetensors"), 1.0, dict(meta.config))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraError, match="LoRA junk.safetensors: not a LoRA diffusers can read"):
        read_lora(str(tmp_path / "junk.safetensors"), 1.0, dict(meta.config))
    (tmp_path / "lora.ckpt").write_bytes(b"")
    with pytest.raises(LoraError, match="is not a .safetensors file"):
        fuse_loras(load_unet("tiny-sd15"), [LoraSpec(file=str(tmp_path / "lora.ckpt"))])


#: What each bad LoRA's one error line says: checked before diffusers or PEFT sees the file.
BAD_LORAS = {"name": "which this UNet does not have", "shape": "has shape", "nan": "holds NaN or infinite values",
             "inf": "holds NaN or infinite values", "huge": "changes a weight by", "int32": "is int32; expected floating",
             "rank-mismatch": "lora_A of rank 8 and lora_B of rank 4", "rank-0": "lora_A of rank 0",
             "only-a": "has lora_A ('unet."}


@pytest.mark.parametrize("bad", list(BAD_LORAS))
def test_a_bad_lora_is_one_line_through_the_cli_before_any_export(bad_loras, tiny_tome_build, tmp_path, bad):
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({**TOME_SPEC, "loras": [bad_loras[bad]]}))
    for args in (["build", str(spec), "--out", str(tmp_path / "b"), "--backend", "onnx"],
                 ["refit", str(tiny_tome_build), "--lora", f"{bad_loras[bad]}:0.5", "--out", str(tmp_path / "r")]):
        result = _cli(*args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: LoRA bad-"), result.output
        assert BAD_LORAS[bad] in lines[0], result.output
        assert "Traceback" not in result.output
        assert not (tmp_path / "b").exists() and not (tmp_path / "r").exists()
    result = _cli("refit", str(tiny_tome_build), "--lora", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        f"error: LoRA file {tmp_path / 'none.safetensors'} does not exist"]


# --- a build with the LoRA in its spec ------------------------------------------------------------------------


def test_a_build_with_a_lora_equals_eager_with_it_and_records_it(lora_build, loras):
    manifest = Manifest.load(lora_build)
    assert [(lora.file, lora.scale) for lora in manifest.loras] == [(str(loras["style"]), 0.8)]
    assert manifest.loras[0].sha256 == sha256(loras["style"])
    assert manifest.model_fingerprint()["loras"] == [(sha256(loras["style"]), 0.8)]
    checks = verify_build(lora_build)  # the graph against eager with the LoRA fused (load_unet's loras)
    assert checks and all(c.passed and c.max_abs < 1e-4 for c in checks), checks


# --- refit ----------------------------------------------------------------------------------------------------


def test_refit_equals_a_fresh_build_with_the_lora_and_shares_the_base_weights(refitted, lora_build, tiny_tome_build):
    out, result = refitted
    new, base, fresh = Manifest.load(out), Manifest.load(tiny_tome_build), Manifest.load(lora_build)
    assert result.seconds < 30
    # the same graphs, a small delta beside the base weights, which are the build's very file
    assert [g.name for g in new.graphs()] == [g.name for g in base.graphs()]
    assert new.weights == base.weights and new.weights_delta.path == f"onnx/{DELTA_FILE}"
    assert os.stat(out / new.weights.path).st_ino == os.stat(tiny_tome_build / base.weights.path).st_ino
    assert new.weights_delta.bytes < base.weights.bytes / 5
    assert {f.path for f in new.files()} == {f.path for f in base.files()} | {new.weights_delta.path}
    assert new.loras == fresh.loras and new.model_fingerprint() == fresh.model_fingerprint()
    assert new.refit.build == str(tiny_tome_build) and new.refit.origin_sha256 == new.refit.manifest_sha256
    # call for call, the refit's baseline is the fresh build's (onnxruntime); its ToMe graph is eager ToMe with the LoRA
    feed = _feed(new)
    refit_out = load_backend("onnxruntime", out).run("baseline", feed)
    assert torch.equal(refit_out, load_backend("onnxruntime", lora_build).run("baseline", feed))
    assert not torch.allclose(refit_out, load_backend("onnxruntime", tiny_tome_build).run("baseline", feed), atol=1e-3)
    checks = verify_build(out)
    assert {c.graph for c in checks} == {"baseline", "main"} and all(c.passed and c.max_abs < 1e-4 for c in checks)
    with pytest.raises(AtedmError, match="differ in loras"):
        check_same_model([tiny_tome_build, out], [base, new], "eval")


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
    weights = _Weights(tmp_path, ["w.data"])
    try:
        one, two = Region("w.data", 0, 48), Region("w.data", 48, 48)
        places = _match({"a": a, "b": b}, ["a"], weights, {one})
        assert [(p.region, p.transposed) for p in places["a"]] == [(one, True)]
        with pytest.raises(RefitError, match="parameter 'b' is not in the build's weights"):
            _match({"a": a, "b": b}, ["b"], weights, {one})
        with pytest.raises(RefitError, match="parameter 'a' is stored 2 times"):
            _match({"a": a, "b": b}, ["a"], weights, {one, two})
        with pytest.raises(RefitError, match="parameter 'a' has the same bytes as 'c'"):
            _match({"a": a, "c": a.clone()}, ["a"], weights, {one})
    finally:
        weights.close()


def _with_fake_engines(build, folder, **engine) -> None:  # noqa: ANN001
    """A copy of ``build`` whose manifest lists a plan per graph (a few bytes each; the runtime never opens them here)."""
    shutil.copytree(build, folder)
    data = json.loads((folder / "manifest.json").read_text())
    (folder / "engines").mkdir(exist_ok=True)
    for shape in data["shapes"]:
        for graph in (shape["baseline"], *shape["stages"]):
            plan = folder / "engines" / f"{graph['name']}.plan"
            plan.write_bytes(b"plan of " + graph["name"].encode())
            graph["engine"] = FileEntry(path=f"engines/{plan.name}", sha256=sha256(plan), bytes=plan.stat().st_size).model_dump()
    data["engine"] = {"backend": "tensorrt-rtx", "library": "tensorrt_rtx_bindings", "version": "1.0", "targets": ["sm89"],
                      **engine}
    (folder / "manifest.json").write_text(json.dumps(data))


def test_refittable_stripped_plans_are_linked_and_others_rebuilt_or_dropped(tiny_tome_build, loras, tmp_path):
    stripped = tmp_path / "stripped"
    _with_fake_engines(tiny_tome_build, stripped, weights_stripped=True, refittable=True)
    request = RefitRequest(stripped, (LoraSpec(file=str(loras["style"])),), tmp_path / "linked")
    new = refit(request).manifest
    assert new.engine.refittable and not new.engine.skipped
    for entry in new.graphs():
        assert os.stat(tmp_path / "linked" / entry.engine.path).st_ino == os.stat(stripped / entry.engine.path).st_ino
    identical = tmp_path / "identical"
    _with_fake_engines(tiny_tome_build, identical, weights_stripped=True)
    result = refit(RefitRequest(identical, request.loras, tmp_path / "dropped"))
    assert all(g.engine is None for g in result.manifest.all_graphs())
    assert "REFIT_IDENTICAL" in result.manifest.engine.skipped and any("engines dropped" in n for n in result.notes)


# --- switching weights in a running StagedUNet ----------------------------------------------------------------


def _staged(folder, backend: str) -> tuple[StagedUNet, tuple]:  # noqa: ANN001
    staged = StagedUNet.load(folder, backend=backend)
    staged.set_timesteps([999, 666, 333, 0])
    feed = _feed(staged.manifest)
    return staged, (feed["sample"], torch.tensor(666.0), feed["encoder_hidden_states"])  # step 1: the ToMe stage


def test_use_weights_switches_the_outputs_without_reloading_the_graphs(refitted, tiny_tome_build, lora_build):
    out, _ = refitted
    staged, call = _staged(tiny_tome_build, "onnxruntime")
    before = staged(*call).sample
    staged.use_weights(out)
    after = staged(*call).sample
    assert not torch.allclose(before, after, atol=1e-3)
    reference, _ = _staged(out, "onnxruntime")
    torch.testing.assert_close(after, reference(*call).sample, rtol=0, atol=1e-6)
    staged.use_weights(tiny_tome_build)  # and back: the base build holds the same graphs
    torch.testing.assert_close(staged(*call).sample, before, rtol=0, atol=1e-6)
    with pytest.raises(ManifestError, match="not a refit of the same build"):
        staged.use_weights(lora_build)
    # the eager reference follows too: the other build's LoRAs fused into a fresh UNet
    eager, _ = _staged(tiny_tome_build, "eager")
    eager.use_weights(out)
    torch.testing.assert_close(eager(*call).sample, after, rtol=0, atol=1e-4)


# --- slow: AT-EDM with onnxruntime's fused graphs ----------------------------------------------------------------


@pytest.mark.slow
def test_refit_of_an_atedm_build_with_onnxruntime_fused_graphs(loras, tmp_path):
    """AT-EDM (the map layer reads its block's first q/k) with onnxruntime's fused graphs, whose q/k/v stacks refit
    rewrites; then a refit of that refit with a second LoRA (the earlier delta's tensors carried into the new one)."""
    spec = {**{k: v for k, v in TOME_SPEC.items() if k != "method"}, "name": "atedm"}  # AT-EDM: the default method
    build(BuildRequest(parse_spec(spec), tmp_path / "base", backend="onnx", ort_fusion=True))
    first = refit(RefitRequest(tmp_path / "base", (LoraSpec(file=str(loras["style"]), scale=0.8),), tmp_path / "r1"))
    assert all(g.ort_onnx is not None for g in first.manifest.all_graphs()) and not first.notes
    second = refit(RefitRequest(tmp_path / "r1", (LoraSpec(file=str(loras["other"]), scale=-0.5),), tmp_path / "r2"))
    assert [lora.scale for lora in second.manifest.loras] == [0.8, -0.5]
    assert second.manifest.refit.origin_sha256 == first.manifest.refit.origin_sha256
    for out in (tmp_path / "r1", tmp_path / "r2"):
        checks = verify_build(out)
        assert {c.backend for c in checks} == {"onnxruntime", "onnxruntime-fused"}
        assert all(c.passed and c.max_abs < 1e-4 for c in checks), checks


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


@pytest.mark.parametrize("edit", ["scale", "dropped"])
def test_a_manifest_whose_loras_disagree_with_its_spec_is_refused(lora_build, tmp_path, edit):
    """A hand-edited LoRA scale (past the spec's bounds or not), or a LoRA dropped from one of the two lists: the
    build no longer says which weights it holds, so loading it is one line naming the lists."""
    copy = tmp_path / "edited"
    shutil.copytree(lora_build, copy)
    data = json.loads((copy / "manifest.json").read_text())
    if edit == "scale":
        data["loras"][0]["scale"] = 99.0
    else:
        data["spec"]["loras"] = []
    (copy / "manifest.json").write_text(json.dumps(data))
    result = _cli("inspect", str(copy))
    assert result.exit_code == 2 and "loras:" in result.output and "but its spec lists" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
