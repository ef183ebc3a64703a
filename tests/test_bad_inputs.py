"""Bad input, as a new user types it, to every command: one ``error:`` line, exit 2, no traceback, nothing written.

Each row names the command line (``{build}``: the session's tiny build, ``{in}``: a folder of prepared bad
inputs, ``{out}``: a fresh folder to write into) and a fragment the one error line must hold. The inputs
folder, the build and the fresh folder are listed before and after: a failed command leaves all three
as they were (no half build, no lock file, no partial repository).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from atedm_export.cli import main
from atedm_export.models import BUILTIN_CONFIGS, build_unet

TINY = {"height": 256, "width": 256, "precision": "fp32", "steps": 10}


def _spec(folder: Path, name: str, **fields: object) -> None:
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, "model": "tiny-sd15", **TINY, **fields}))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Every bad file the table refers to, made once."""
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "garbage.safetensors").write_bytes(os.urandom(4096))
    (root / "model.ckpt").write_bytes(b"pickle")
    (root / "not-yaml.yaml").write_text("name: [unclosed\n")
    (root / "a-list.yaml").write_text("- 1\n- 2\n")
    _spec(root, "odd-height", height=250)
    _spec(root, "unknown-key", colour="red")
    _spec(root, "unknown-schedule", schedule="fastest")
    _spec(root, "no-such-folder", model="/no/such/folder")
    _spec(root, "garbage-file", model=str(root / "garbage.safetensors"))
    _spec(root, "pickle", model=str(root / "model.ckpt"))
    _spec(root, "bad-pattern", schedule={"stages": [{"name": "main", "until": 1.0, "blocks": {"down_blocks.9.*": 0.5}}]})
    _spec(root, "bad-role", schedule={"stages": [{"name": "main", "until": 1.0, "blocks": {"@nowhere": 0.5}}]})
    _spec(root, "cross-attn1", pruning={"importance": "cross", "prune_point": "attn1"})
    _spec(root, "zero-steps", steps=0)
    # a diffusers folder whose weights file is not safetensors
    broken = root / "broken-weights"
    build_unet(BUILTIN_CONFIGS["tiny-sd15"]).save_pretrained(broken / "unet")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(2048))
    _spec(root, "broken-weights", model=str(broken))
    # a folder with no config, and one whose config is not JSON
    (root / "no-config").mkdir()
    _spec(root, "no-config", model=str(root / "no-config"))
    (root / "bad-config" / "unet").mkdir(parents=True)
    (root / "bad-config" / "unet" / "config.json").write_text("{not json")
    _spec(root, "bad-config", model=str(root / "bad-config"))
    # UNets the method cannot serve
    plain = {**BUILTIN_CONFIGS["tiny-sd15"], "down_block_types": ["DownBlock2D"] * 4, "up_block_types": ["UpBlock2D"] * 4,
             "mid_block_type": "UNetMidBlock2D"}
    (root / "no-attention" / "unet").mkdir(parents=True)
    (root / "no-attention" / "unet" / "config.json").write_text(json.dumps(plain))
    save_file({}, str(root / "no-attention" / "unet" / "diffusion_pytorch_model.safetensors"))
    _spec(root, "no-attention", model=str(root / "no-attention"))
    (root / "image-cond" / "unet").mkdir(parents=True)
    (root / "image-cond" / "unet" / "config.json").write_text(
        json.dumps({**BUILTIN_CONFIGS["tiny-sdxl"], "addition_embed_type": "image"}))
    _spec(root, "image-cond", model=str(root / "image-cond"))
    # build folders that cannot be trusted
    (root / "bad-manifest").mkdir()
    (root / "bad-manifest" / "manifest.json").write_text("{")
    (root / "old-manifest").mkdir()
    (root / "old-manifest" / "manifest.json").write_text(json.dumps({"format": "atedm-export.manifest/1"}))
    (root / "existing").mkdir()
    (root / "not-an-image.png").write_bytes(b"text")
    (root / "bad-record").mkdir()
    (root / "bad-record" / "atedm-deploy.json").write_text("{")
    return root


def _manifest_only(build: Path, root: Path) -> Path:
    """A copy of the build's manifest alone: every file it lists is missing."""
    folder = root / "manifest-only"
    if not folder.exists():
        folder.mkdir()
        (folder / "manifest.json").write_text((build / "manifest.json").read_text())
    return folder


CASES = [
    # build
    ("build nosuch", "spec 'nosuch' not found"),
    ("build {in}/not-yaml.yaml", "not valid YAML"),
    ("build {in}/a-list.yaml", "expected a mapping of spec fields"),
    ("build {in}/odd-height.yaml", "must be a multiple of 8"),
    ("build {in}/unknown-key.yaml", "unknown key 'colour'"),
    ("build {in}/unknown-schedule.yaml", "unknown schedule 'fastest'"),
    ("build {in}/zero-steps.yaml", "steps"),
    ("build {in}/no-such-folder.yaml --out {out}/b", "model path /no/such/folder does not exist"),
    ("build {in}/garbage-file.yaml --out {out}/b", "is not a readable safetensors file"),
    ("build {in}/pickle.yaml --out {out}/b", "pickle checkpoints are never loaded"),
    ("build {in}/broken-weights.yaml --out {out}/b --backend onnx", "cannot load the UNet in"),
    ("build {in}/no-config.yaml --out {out}/b", "has no config.json or unet/config.json"),
    ("build {in}/bad-config.yaml --out {out}/b", "is not valid JSON"),
    ("build {in}/no-attention.yaml --out {out}/b", "no Transformer2DModel attention blocks"),
    ("build {in}/image-cond.yaml --out {out}/b", "addition_embed_type='image'"),
    ("build {in}/bad-pattern.yaml --out {out}/b", "matches no attention block"),
    ("build {in}/bad-role.yaml --out {out}/b", "unknown block role '@nowhere'"),
    ("build {in}/cross-attn1.yaml --out {out}/b", "importance 'cross' needs prune_point 'layer'"),
    ("build tiny-sd15 --backend tensorrt --out {out}/b", "pip install 'atedm-export[tensorrt]'"),
    ("build tiny-sd15 --target sm1 --out {out}/b", "unknown target 'sm1'"),
    ("build tiny-sd15 --stages nope --out {out}/b", "unknown stage 'nope'"),
    ("build tiny-sd15 --out {in}/existing", "already exists; pass --force"),
    ("build tiny-sd15 --out {out}/no/such/b", "parent folder"),
    # inspect, verify
    ("inspect {out}/nothing", "is not a build folder"),
    ("inspect {in}/bad-manifest", "is not valid JSON"),
    ("inspect {in}/old-manifest", "has format 'atedm-export.manifest/1'"),
    ("inspect {manifest_only}", "is missing"),
    ("verify {out}/nothing", "is not a build folder"),
    ("verify {manifest_only}", "is missing"),
    # flops
    ("flops nosuch", "spec 'nosuch' not found"),
    ("flops tiny-sd15 --schedule fastest", "unknown schedule 'fastest'"),
    ("flops {in}/cross-attn1.yaml", "importance 'cross' needs prune_point 'layer'"),
    ("flops {in}/no-such-folder.yaml", "does not exist"),
    # generate
    ("generate -p x -o {out}/x.png", "give either BUILD_DIR"),
    ("generate {build} -p x -o {out}/x.jpg", "must be a .png file"),
    ("generate {build} -p x -o {out}/no/dir/x.png", "does not exist"),
    ("generate {build} -p x --image {in}/not-an-image.png -o {out}/x.png", "--image is for SDXL refiner builds"),
    ("generate {build} -p x --backend tensorrt-rtx -o {out}/x.png", "needs a CUDA GPU"),
    ("generate --triton ftp://host:1 -p x -o {out}/x.png", "must look like http://HOST:PORT"),
    ("generate --triton http://127.0.0.1:1 -p x -o {out}/x.png", "cannot reach Triton at http://127.0.0.1:1"),
    ("generate {out}/nothing -p x -o {out}/x.png", "is not a build folder"),
    ("generate {build} -p x --cuda-graphs -o {out}/x.png", "apply to the engine backends (tensorrt, tensorrt-rtx), not onnxruntime"),
    # bench
    ("bench {build} --backends fastest", "unknown backend 'fastest'"),
    ("bench {out}/nothing", "is not a build folder"),
    ("bench {build} --json {out}/no/dir/r.json", "folder"),
    ("bench {build} --engine-weights cycled", "apply to the engine backends (tensorrt, tensorrt-rtx), not eager,onnxruntime"),
    # deploy, serve, load-test
    ("deploy {out}/nothing --triton {out}/repo", "is not a build folder"),
    ("deploy {build} --triton {in}/existing", "already exists"),
    ("deploy {build} --triton {out}/repo --name bad.name", "must be letters, digits"),
    ("serve {out}/nothing", "is not an atedm-export repository"),
    ("serve {in}/bad-record", "is not valid JSON"),
    ("load-test ftp://host:1", "must look like http://HOST:PORT"),
    ("load-test http://127.0.0.1:1 --requests 1", "cannot reach Triton at http://127.0.0.1:1"),
    ("load-test http://127.0.0.1:1 --json {out}/no/dir/r.json", "does not exist"),
]


def _listing(*folders: Path) -> list[str]:
    return sorted(str(p) for folder in folders for p in folder.rglob("*"))


@pytest.mark.parametrize(("command", "expected"), CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_error_line_and_leaves_nothing(command, expected, inputs, tiny_build, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    args = command.format(build=tiny_build, out=out, manifest_only=_manifest_only(tiny_build, inputs), **{"in": inputs})
    before = _listing(inputs, tiny_build, out)
    result = CliRunner().invoke(main, args.split())
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and expected in errors[0], result.output
    assert "Traceback" not in result.output
    assert _listing(inputs, tiny_build, out) == before


def test_the_table_covers_every_command():
    commands = {c.split()[0] for c, _ in CASES}
    assert commands == {"build", "inspect", "verify", "flops", "generate", "bench", "deploy", "serve", "load-test"}
    assert len(CASES) >= 40
