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
    shape = {"batch": 2, "height": 128, "width": 128}
    (root / "bool-batch.yaml").write_text(yaml.safe_dump({"name": "boolean", "model": "tiny-sd15", "shapes": [
        {"batch": True, "height": 128, "width": 128}, {"batch": 2, "height": 128, "width": 192}]}))
    _spec(root, "bool-steps", steps=True)
    (root / "path-as-set.yaml").write_text(yaml.safe_dump({"name": "path", "model": "tiny-sd15",
                                                           "shapes": "../schedules/paper"}))
    (root / "twice-listed-shape.yaml").write_text(yaml.safe_dump({"name": "twice", "model": "tiny-sd15",
                                                                  "shapes": [shape, shape]}))
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
    (root / "mine").mkdir()  # a folder of the user's own: no manifest, a file of theirs
    (root / "mine" / "notes.txt").write_text("my notes\n")
    (root / "not-an-image.png").write_bytes(b"text")
    (root / "bad-record").mkdir()
    (root / "bad-record" / "atedm-deploy.json").write_text("{")
    (root / "taken" / "atedm_unet").mkdir(parents=True)  # someone else's model under our router's name
    (root / "deployed").mkdir()
    (root / "deployed" / "atedm-deploy.json").write_text(json.dumps({"router": "atedm_unet", "models": {}}))
    # files that are not what their names say: UTF-16 and binary text, duplicated keys, non-finite numbers
    spec_text = yaml.safe_dump({"name": "x", "model": "tiny-sd15", **TINY})
    (root / "utf16.yaml").write_bytes(spec_text.encode("utf-16"))
    (root / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" + os.urandom(64))
    (root / "dup-key.yaml").write_text("name: dup\nmodel: tiny-sd15\nheight: 256\nwidth: 256\nheight: 512\n")
    (root / "dup-nested.yaml").write_text("name: dup\nmodel: tiny-sd15\npruning:\n  damping: 0.9\n  damping: 0.5\n")
    _spec(root, "nan-damping", pruning={"damping": float("nan")})
    _spec(root, "inf-keep", schedule={"stages": [{"name": "main", "until": 1.0, "keep": float("inf")}]})
    (root / "u16-schedule.yaml").write_bytes(yaml.safe_dump({"stages": [{"name": "a", "until": 1.0}]}).encode("utf-16"))
    _spec(root, "schedule-file-missing", schedule="no-such-schedule.yaml")
    _spec(root, "relative-missing", model="./no-such-pipeline")
    for folder in ("utf16-manifest", "binary-manifest", "nan-manifest"):
        (root / folder).mkdir()
    (root / "utf16-manifest" / "manifest.json").write_bytes(json.dumps({"format": "x"}).encode("utf-16"))
    (root / "binary-manifest" / "manifest.json").write_bytes(os.urandom(512).replace(b"\xff", b"\xfe") + b"\xff")
    (root / "nan-manifest" / "manifest.json").write_text('{"format": NaN}')
    return root


def _edited_build(build: Path, root: Path, name: str, edit, garbage: str | None = None) -> Path:  # noqa: ANN001
    """A copy of the build (files hard-linked, the manifest rewritten by ``edit``); ``garbage``: that graph's
    file replaced by bytes that are no ONNX model, its checksum updated so only the decoder can tell."""
    from atedm_export.buildfolder import sha256

    folder = root / name
    if folder.exists():
        return folder
    for file in build.rglob("*"):
        if file.is_file() and file.name != "manifest.json":
            (folder / file.relative_to(build)).parent.mkdir(parents=True, exist_ok=True)
            os.link(file, folder / file.relative_to(build))
    data = json.loads((build / "manifest.json").read_text())
    if garbage:
        shape = data["shapes"][0]
        entry = shape["baseline"] if garbage == "baseline" else next(s for s in shape["stages"] if s["name"] == garbage)
        target = folder / entry["onnx"]["path"]
        target.unlink()
        target.write_bytes(b"\x0a\xff\xff\xff\xff\x0f" + b"not a protobuf" * 8)
        entry["onnx"].update(sha256=sha256(target), bytes=target.stat().st_size)
    edit(data)
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


def _height_512(data: dict) -> None:
    data["spec"]["height"] = 512


def _overlapping_stages(data: dict) -> None:
    data["shapes"][0]["stages"][-1]["steps"] = [0, data["spec"]["steps"]]


def _renamed_stage(data: dict) -> None:
    data["shapes"][0]["stages"][-1]["name"] = "fastest"


def _keep_over_tokens(data: dict) -> None:
    shape = data["shapes"][0]
    block = next(iter(shape["tokens"]))
    shape["stages"][-1]["keep"][block] = shape["tokens"][block] + 1


def _fp16_inputs(data: dict) -> None:
    data["shapes"][0]["inputs"][0]["dtype"] = "float16"


def _unchanged(data: dict) -> None:
    del data


def _weights_outside(data: dict) -> None:
    data["weights"]["path"] = "../../etc/weights.onnx.data"


EDITS = {"weights-outside": _weights_outside, "edited-height": _height_512, "overlapping-stages": _overlapping_stages, "renamed-stage": _renamed_stage,
         "keep-over-tokens": _keep_over_tokens, "fp16-inputs": _fp16_inputs}


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
    ("build tiny-sd15 --precision fp16 --ort-fusion --backend onnx --out {out}/b", "--ort-fusion takes fp32 graphs"),
    ("build {in}/twice-listed-shape.yaml --out {out}/b", "shapes: 128x128-b2 is listed twice"),
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
    ("build {in}/path-as-set.yaml --out {out}/b", "shapes: unknown set '../schedules/paper'"),
    ("flops {in}/path-as-set.yaml", "shapes: unknown set '../schedules/paper'"),
    ("build {in}/bool-batch.yaml --out {out}/b", "batch"),
    ("build {in}/bool-steps.yaml --out {out}/b", "steps"),
    # --force replaces only what this tool wrote, and no output is, holds or lies in an input
    ("build tiny-sd15 --out {in}/mine --force", "was not written by atedm-export (it holds no manifest.json)"),
    ("build {in}/broken-weights.yaml --out {in}/broken-weights/out", "and model {in}/broken-weights overlap"),
    ("build {in}/broken-weights.yaml --out {in} --force", "and model {in}/broken-weights overlap"),
    ("deploy {build} --triton {manifest_only}", "is a build folder (it holds manifest.json)"),
    ("deploy {weights-outside} --triton {out}/repo", "leads outside the build folder"),
    ("inspect {weights-outside}", "weights.path: '../../etc/weights.onnx.data' leads outside the build folder"),
    ("bench {build} {build}", "is given twice"),
    ("build tiny-sd15 --out {in}/not-an-image.png/b", "is a file, not a folder"),
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
    ("generate {build} -p x --backend tensorrt-rtx -o {out}/x.png", "has no engines"),
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
    ("deploy {build} --triton {build} --force", "overlap"),
    ("deploy {build} --triton {build}/repo", "overlap"),
    ("deploy {build} --triton {in}/bad-record --force", "is not valid JSON"),
    ("deploy {build} --triton {in}/taken", "already exists and atedm-export deploy did not write it"),
    ("deploy {build} --triton {in}/deployed", "already holds an atedm-export deployment"),
    ("load-test http://127.0.0.1:notaport", "has port 'notaport'; expected a number from 1 to 65535"),
    ("load-test grpc://127.0.0.1:99999", "expected a number from 1 to 65535"),
    ("generate --triton http://127.0.0.1:0 -p x -o {out}/x.png", "has port '0'"),
    ("load-test http://localhost", "must look like http://HOST:PORT"),
    ("deploy {build} --triton {out}/repo --name bad.name", "must be letters, digits"),
    ("serve {out}/nothing", "is not an atedm-export repository"),
    ("serve {in}/bad-record", "is not valid JSON"),
    ("load-test ftp://host:1", "must look like http://HOST:PORT"),
    ("load-test http://127.0.0.1:1 http://127.0.0.1:1", "URL http://127.0.0.1:1 is given twice; expected each server once"),
    ("load-test http://127.0.0.1:1 ftp://host:2", "must look like http://HOST:PORT"),
    ("load-test http://127.0.0.1:1 --requests 1", "cannot reach Triton at http://127.0.0.1:1"),
    ("load-test http://127.0.0.1:1 --json {out}/no/dir/r.json", "does not exist"),

    # class 1: what click refuses is one line too, with the --help hint
    ("bench {build} --repeats 0", "Invalid value for '--repeats': 0 is not in the range x>=1"),
    ("bench {build} --warmup -1", "Invalid value for '--warmup'"),
    ("build tiny-sd15 --opt-level 9 --out {out}/b", "Invalid value for '--opt-level'"),
    ("build tiny-sd15 --precision fp8 --out {out}/b", "Invalid value for '--precision'"),
    ("build tiny-sd15 --workspace 0 --out {out}/b", "Invalid value for '--workspace'"),
    ("build tiny-sd15 --bogus", "No such option '--bogus'"),
    ("generate {build} -p x --steps 0 -o {out}/x.png", "Invalid value for '--steps'"),
    ("generate {build} -p x --strength 0 -o {out}/x.png", "Invalid value for '--strength'"),
    ("generate {build} -o {out}/x.png", "Missing option '--prompt'"),
    ("flops tiny-sd15 --prune-point middle", "Invalid value for '--prune-point'"),
    ("flops tiny-sd15 --device v100", "Invalid value for '--device'"),
    ("verify", "Missing argument 'BUILD_DIR'"),
    ("inspect {build} --device banana", "Invalid value for '--device'"),
    ("bench {build} --engine-weights banana", "Invalid value for '--engine-weights'"),
    ("deploy {build} --triton {out}/repo --instances 0", "Invalid value for '--instances'"),
    ("deploy {build} --triton {out}/repo --backend banana", "Invalid value for '--variant' / '--backend'"),
    ("deploy {build} --triton {out}/repo --gpus one", "--gpus 'one': expected GPU indices separated by commas"),
    ("deploy {build} --triton {out}/repo --gpus 0,0", "--gpus 0,0: expected distinct GPU indices"),
    ("deploy {build} --triton {out}/repo --gpus 0", "--gpus places the tensorrt variant's plans on GPUs; this deployment "
                                                    "is the onnxruntime variant"),
    ("deploy {build} --triton {out}/repo --kubernetes {out}/k --storage-uri http://host/repo",
     "--storage-uri http://host/repo: expected one of s3://, gs://, as://"),
    ("deploy {build} --triton {out}/repo --kubernetes {out}/repo/k8s", "overlap; expected an output folder outside"),
    ("deploy {build} --triton {out}/repo --load-seconds 30", "describe the cluster of --kubernetes DIR; add it"),
    ("deploy {build} --triton {out}/repo --kubernetes {in}/mine --force", "was not written by atedm-export"),
    ("serve {out}/repo --http-port 70000", "Invalid value for '--http-port'"),
    ("load-test http://127.0.0.1:1 --concurrency 0", "Invalid value for '--concurrency'"),
    ("nosuch", "No such command 'nosuch'"),
    ("--bogus", "No such option '--bogus'"),

    # class 2: odd files, numbers, devices and outputs, each checked before the work starts
    ("build {in}/utf16.yaml --out {out}/b", "is not UTF-8 text (byte 0xff at offset 0); expected a graph spec"),
    ("build {in}/binary.yaml --out {out}/b", "is not UTF-8 text"),
    ("flops {in}/utf16.yaml", "is not UTF-8 text"),
    ("flops tiny-sd15 --schedule {in}/u16-schedule.yaml", "is not UTF-8 text"),
    ("inspect {in}/utf16-manifest", "is not UTF-8 text"),
    ("verify {in}/binary-manifest", "is not UTF-8 text"),
    ("bench {in}/binary-manifest", "is not UTF-8 text"),
    ("generate {in}/utf16-manifest -p x -o {out}/x.png", "is not UTF-8 text"),
    ("deploy {in}/binary-manifest --triton {out}/repo", "is not UTF-8 text"),
    ("inspect {in}/nan-manifest", "NaN is not a number JSON allows"),
    ("inspect {garbage_onnx}", "is not an ONNX model"),
    ("verify {garbage_onnx}", "is not an ONNX model"),
    ("build tiny-sd15 --out {out}/" + "b" * 300, "bytes; expected at most"),
    ("generate {build} -p x -o {out}/" + "x" * 300 + ".png", "bytes; expected at most"),
    ("generate {build} -p x --seed 99999999999999999999999 -o {out}/x.png", "Invalid value for '--seed'"),
    ("generate {build} -p x --seed -1 -o {out}/x.png", "Invalid value for '--seed'"),
    ("verify {build} --seed 99999999999999999999999", "Invalid value for '--seed'"),
    ("generate {build} -p x --device banana -o {out}/x.png", "'banana' is not a torch device"),
    ("bench {build} --device banana", "'banana' is not a torch device"),
    ("bench {build} --device meta", "run on cpu or cuda"),
    ("bench {build} --plot {out}/plot.txt", "must be a .png file"),
    ("bench {build} --json {out}", "it is a folder"),
    ("verify {edited-height}", "shapes: 256x256-b2 are recorded, but its spec lists 256x512-b2"),
    ("inspect {fp16-inputs}", "implies 'sample'"),

    # class 3: what used to be accepted silently
    ("build {in}/dup-key.yaml --out {out}/b", "key 'height' is given twice (first on line 3)"),
    ("flops {in}/dup-key.yaml", "is given twice"),
    ("flops {in}/dup-nested.yaml", "key 'damping' is given twice"),
    ("flops {in}/nan-damping.yaml", "pruning.damping"),
    ("flops {in}/inf-keep.yaml", "keep"),
    ("generate {build} -p x --guidance nan -o {out}/x.png", "'nan' is not a finite number"),
    ("generate {build} -p x --guidance inf -o {out}/x.png", "'inf' is not a finite number"),
    ("inspect {overlapping-stages}", "its schedule gives"),
    ("verify {overlapping-stages}", "its schedule gives"),
    ("inspect {renamed-stage}", "are not stages of its schedule"),
    ("inspect {keep-over-tokens}", "keep counts"),

    # class 4 and friction: nothing created before the checks (not even ./build/), the whole spec checked first
    ("build tiny-sd15 --stages nope", "unknown stage 'nope'"),
    ("build {in}/bad-role.yaml", "unknown block role '@nowhere'"),
    ("build {in}/bad-pattern.yaml", "matches no attention block"),
    ("build tiny-sd15 --backend tensorrt", "pip install 'atedm-export[tensorrt]'"),
    ("build tiny-sd15 --schedule fastest", "unknown schedule 'fastest'"),
    ("build tiny-sd15 --schedule {in}/missing.yaml", "schedule file"),
    ("build {in}/schedule-file-missing.yaml", "no-such-schedule.yaml not found"),
    ("build {in}/relative-missing.yaml", "model path {in}/no-such-pipeline does not exist"),
    ("build tiny-sd15 --prune-point middle", "Invalid value for '--prune-point'"),
]

#: Rows that write into a folder that refuses writes even to root (where this machine has one).
READ_ONLY = Path("/sys")
READ_ONLY_CASES = [
    ("generate {build} -p x -o {ro}/x.png", "is not writable"),
    ("bench {build} --json {ro}/r.json", "is not writable"),
    ("bench {build} --plot {ro}/p.png", "is not writable"),
    ("serve {out}/nothing --log {ro}/server.log", "is not writable"),
    ("build tiny-sd15 --out {ro}/b", "is not writable"),
    ("deploy {build} --triton {ro}/repo", "is not writable"),
    ("load-test http://127.0.0.1:1 --json {ro}/r.json", "is not writable"),
    ("eval {build} --out {ro}/e", "is not writable"),
]


def _listing(*folders: Path) -> list[str]:
    return sorted(str(p) for folder in folders for p in folder.rglob("*"))


def _read_only_folder() -> Path | None:
    """A folder no one may create files in, root included (``/sys`` on Linux), else None."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=READ_ONLY):
            return None
    except OSError:
        return READ_ONLY


def _run(command: str, inputs: Path, build: Path, tmp_path: Path, monkeypatch) -> tuple:  # noqa: ANN001
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    folders = {name: _edited_build(build, inputs, name, edit) for name, edit in EDITS.items()}
    args = command.format(build=build, out=out, manifest_only=_manifest_only(build, inputs), ro=_read_only_folder(),
                          garbage_onnx=_edited_build(build, inputs, "garbage-onnx", _unchanged, garbage="baseline"),
                          **folders, **{"in": inputs})
    before = _listing(inputs, build, out)
    result = CliRunner().invoke(main, args.split())
    return result, before, lambda: _listing(inputs, build, out)


@pytest.mark.parametrize(("command", "expected"), CASES, ids=[c[:60] for c, _ in CASES])
def test_bad_input_is_one_error_line_and_leaves_nothing(command, expected, inputs, tiny_build, tmp_path, monkeypatch):
    result, before, after = _run(command, inputs, tiny_build, tmp_path, monkeypatch)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and expected.format(**{"in": inputs}) in errors[0], result.output
    assert "Traceback" not in result.output and "Usage:" not in result.output
    assert after() == before


@pytest.mark.parametrize(("command", "expected"), READ_ONLY_CASES, ids=[c for c, _ in READ_ONLY_CASES])
def test_a_read_only_output_folder_is_refused_before_the_work(command, expected, inputs, tiny_build, tmp_path,
                                                               monkeypatch):
    if _read_only_folder() is None:
        pytest.skip(f"{READ_ONLY} takes new files here; no read-only folder to test with")
    result, before, after = _run(command, inputs, tiny_build, tmp_path, monkeypatch)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and expected in errors[0], result.output
    assert after() == before


def test_the_table_covers_every_command():
    commands = {c.split()[0] for c, _ in CASES if not c.startswith("-")}
    assert {"build", "inspect", "verify", "flops", "generate", "bench", "deploy", "serve", "load-test"} <= commands
    assert len(CASES) + len(READ_ONLY_CASES) >= 100


def test_sigterm_mid_export_leaves_no_lock_and_no_partial_folder(tmp_path):
    """``kill``, ``timeout`` and CI runners send SIGTERM: it cleans up as Ctrl-C does (exit 128 + 15)."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from .conftest import small_spec

    spec = small_spec(tmp_path)
    out = tmp_path / "b"
    cli = shutil.which("atedm-export", path=str(Path(sys.executable).parent))
    build = subprocess.Popen([cli, "build", spec, "--out", str(out), "--backend", "onnx"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list(tmp_path.glob(".b.partial-*/onnx/.raw-baseline")) and build.poll() is None:
        assert time.monotonic() < deadline, "the export never started"
        time.sleep(0.1)
    assert list(tmp_path.glob(".b.lock")), "the build holds its lock while it exports"
    build.send_signal(signal.SIGTERM)
    _, stderr = build.communicate(timeout=120)
    assert build.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted: SIGTERM received; nothing was left behind" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.yaml"]
