"""LoRAs: fused before export (spec ``loras:``) and ``StagedUNet.use_weights`` (switching them in a running UNet);
``atedm-export refit`` (new weights for the same graphs) is tests/test_refit.py's.

The LoRAs are made in conftest.py from the tiny UNet with PEFT (random A and B, so they change the output) and
saved the way diffusers' training scripts save UNet LoRAs (``save_lora_weights`` of
``convert_state_dict_to_diffusers``); a kohya copy of the same weights is written by hand. The base build is the
session's ToMe build (tiny-sd15, 128 px, fp32); the build with the LoRA in its spec has the baseline graph only
(schedule ``none``).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from atedm_export.cli import main
from atedm_export.lora import LoraError, check_loras, fuse_loras, read_lora
from atedm_export.contract import GraphContract
from atedm_export.buildfolder import Manifest, ManifestError, first_view, model_fingerprint, read_manifest, sha256
from atedm_export.models import build_unet, load_unet
from atedm_export.runtime.staged import StagedUNet
from atedm_export.spec import LoraSpec
from atedm_export.verify import verify_build

from .conftest import TOME_SPEC


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _feed(manifest: Manifest, seed: int = 1) -> dict[str, torch.Tensor]:
    return first_view(manifest).contract.example_feed(seed=seed)


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
    manifest = read_manifest(lora_build)
    assert [(lora.file, lora.scale) for lora in manifest.loras] == [(str(loras["style"]), 0.8)]
    assert manifest.loras[0].sha256 == sha256(loras["style"])
    assert model_fingerprint(first_view(manifest))["loras"] == [(sha256(loras["style"]), 0.8)]
    checks = verify_build(lora_build)  # the graph against eager with the LoRA fused (load_unet's loras)
    assert checks and all(c.passed and c.max_abs < 1e-4 for c in checks), checks


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
