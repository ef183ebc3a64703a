"""``atedm-export eval``: the metrics on cases whose answer is known, CLIP through the ``--clip`` loader, the
command end to end on two tiny builds (outputs, sane values, a rerun that reuses every image), and bad inputs:
one ``error:`` line each, exit 2, nothing written.

The Inception and CLIP networks are tiny stand-ins made here and saved the way the real files are (a
TorchScript file taking ``(images, return_features=True)``; a transformers CLIP folder), so the same loading
code runs as for ``inception-2015-12-05.pt`` and ``laion/CLIP-ViT-g-14-laion2B-s12B-b42K``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from atedm_export.cli import main
from atedm_export.errors import AtedmError
from atedm_export.evaluate.metrics import (Distribution, Fidelity, clip_compute, clip_update, kid_subset_size,
                                           load_clip, load_inception, load_lpips)
from atedm_export.evaluate.prompts import BUILTIN_PROMPTS, choose_prompts, coco_captions
from atedm_export.evaluate.report import json_safe
from atedm_export.evaluate.state import FORMAT, STATE, EvalState

from .conftest import small_spec

#: Small and short: each image is a few UNet calls at 128 px.
TINY = {"height": 128, "width": 128, "steps": 4}
PROMPTS = ["a red fox in the snow", "a [blue] car", "three green apples"]


class StandInInception(torch.nn.Module):
    """The TorchScript Inception's call signature (floats in [0, 255], NCHW → [N, D]) with features whose
    statistics move with noise: the mean and mean square of each channel over 2×2 regions."""

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = images / 255.0
        pool = torch.nn.functional.adaptive_avg_pool2d
        return torch.cat([pool(x, 2).flatten(1), pool(x * x, 2).flatten(1)], dim=1)


class NaNInception(torch.nn.Module):
    """An Inception whose features are NaN: FID's square root of their covariance would crash in MKL."""

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return torch.full((images.shape[0], 2048), float("nan"))


@pytest.fixture(scope="module")
def inception(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "inception-stand-in.pt"
    torch.jit.save(torch.jit.script(StandInInception()), str(path))
    return path


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A random tiny CLIP saved with ``save_pretrained``: what ``--clip PATH`` reads from a real checkpoint."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from atedm_export.runtime.pipeline import tiny_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = tiny_tokenizer(folder)
    layers = {"intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 32}
    config = CLIPConfig(
        text_config={**layers, "vocab_size": len(tokenizer), "max_position_embeddings": 77,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={**layers, "image_size": 32, "patch_size": 8}, projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _smooth_images(count: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """``uint8`` images with structure (random 8×8 colours, upsampled): SSIM has something to compare."""
    generator = torch.Generator().manual_seed(seed)
    small = torch.rand(count, 3, 8, 8, generator=generator) * 200 + 28
    return torch.nn.functional.interpolate(small, size=size, mode="bilinear").round().to(torch.uint8)


def _noisy(images: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * sigma
    return (images.float() + noise).clamp(0, 255).round().to(torch.uint8)


# --- metrics on known cases -------------------------------------------------------------------------------------------


def test_identical_sets_give_infinite_psnr_ssim_one_and_zero_fid(inception):
    images = _smooth_images(24)
    fidelity = Fidelity()
    fidelity.update(images, images.clone())
    values = fidelity.compute()
    assert values["psnr"] == float("inf") and values["ssim"] == pytest.approx(1.0, abs=1e-6)
    distribution = Distribution.create(load_inception(inception), kid_subset_size(24, 24))
    distribution.update(images, real=True)
    distribution.update(images, real=False)
    scores = distribution.compute()
    assert abs(scores["fid"]) < 1e-6
    assert abs(scores["kid"]) < 1e-2  # KID's estimator is unbiased: zero in expectation, not exactly, for one set
    # JSON holds no infinity: null, and the metric named in "infinite"
    safe = json_safe({"label": "b", **values})
    assert safe["psnr"] is None and safe["infinite"] == ["psnr"]
    json.dumps(safe, allow_nan=False)


def test_more_noise_is_worse_on_every_metric(inception):
    images = _smooth_images(32)
    features = load_inception(inception)
    psnr, ssim, fid, kid = [], [], [], []
    for sigma in (4, 16, 48):
        noisy = _noisy(images, sigma)
        fidelity = Fidelity()
        fidelity.update(noisy, images)
        values = fidelity.compute()
        psnr.append(values["psnr"])
        ssim.append(values["ssim"])
        distribution = Distribution.create(features, kid_subset_size(32, 32))
        distribution.update(images, real=True)
        distribution.update(noisy, real=False)
        scores = distribution.compute()
        fid.append(scores["fid"])
        kid.append(scores["kid"])
    assert psnr[0] > psnr[1] > psnr[2] > 0
    assert 1 > ssim[0] > ssim[1] > ssim[2]
    assert 0 < fid[0] < fid[1] < fid[2]
    assert kid[0] < kid[1] < kid[2]


def test_kid_subset_is_the_default_or_the_smallest_set():
    assert kid_subset_size(3, 5000) == 3
    assert kid_subset_size(30000, 5000) == 1000


def test_clip_score_loads_a_transformers_folder_and_scores_in_range(clip_folder):
    clip = load_clip(clip_folder)
    clip_update(clip, _smooth_images(3), PROMPTS)
    score = clip_compute(clip)
    assert 0.0 <= score <= 100.0


def test_lpips_is_skipped_with_a_one_line_reason_where_it_cannot_load():
    lpips, note = load_lpips()
    if lpips is not None:
        pytest.skip("LPIPS loads here (torchvision and its AlexNet weights are present)")
    assert note.startswith("LPIPS skipped: ") and "\n" not in note


@pytest.mark.parametrize(("content", "expected"), [
    (b"not a zip", "not a TorchScript Inception"),
    (None, "no such file"),
])
def test_an_unreadable_inception_file_is_one_line(tmp_path, content, expected):
    path = tmp_path / "inception.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AtedmError, match=expected) as error:
        load_inception(path)
    assert "\n" not in str(error.value)


# --- prompts and the folder's record ----------------------------------------------------------------------------------


def test_prompts_from_a_file_skip_blank_lines_and_coco_takes_one_caption_per_image(tmp_path):
    (tmp_path / "p.txt").write_text("  a fox  \n\n\t\na [bold] car\n")
    assert choose_prompts(tmp_path / "p.txt", None, None) == (["a fox", "a [bold] car"], f"file {tmp_path / 'p.txt'}")
    coco = {"annotations": [{"image_id": 9, "id": 5, "caption": "nine b"},
                            {"image_id": 2, "id": 7, "caption": "two"},
                            {"image_id": 9, "id": 3, "caption": "nine  a\n"},
                            {"image_id": 4, "id": 1, "caption": "four"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert coco_captions(tmp_path / "c.json") == ["two", "four", "nine a"]
    assert choose_prompts(None, tmp_path / "c.json", 2)[0] == ["two", "four"]
    prompts, source = choose_prompts(None, None, None)
    assert source == "built-in set" and len(set(prompts)) == len(BUILTIN_PROMPTS) >= 12


def test_the_folder_record_refuses_other_folders_and_other_questions(tmp_path):
    settings = {"prompts": ["a"], "seed": 0, "steps": 4, "guidance": 7.5}
    state = EvalState.check(tmp_path / "new", settings)
    assert not (tmp_path / "new").exists()  # checking writes nothing
    state.create()
    assert EvalState.check(tmp_path / "new", settings).exists
    with pytest.raises(AtedmError, match="holds an eval of steps 4 .*use a new --out folder"):
        EvalState.check(tmp_path / "new", {**settings, "steps": 8})
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with pytest.raises(AtedmError, match="is not empty and holds no eval record"):
        EvalState.check(tmp_path / "theirs", settings)


# --- the command end to end -------------------------------------------------------------------------------------------


def _build(root: Path, name: str, **changes: object) -> Path:
    from atedm_export.build import BuildRequest, build
    from atedm_export.spec import load_spec

    folder = root / f"{name}-spec"
    folder.mkdir()
    out = root / name
    build(BuildRequest(load_spec(small_spec(folder, name=name, **TINY, **changes)), out, library="onnx"))
    return out


#: The builds the eval tests draw with: one model (tiny-sd15, seed 0), two prunings of it. The ToMe build is the
#: session's (conftest.TOME_SPEC, the same model, size and steps), shared with tests/test_tome.py.
SPECS: dict[str, dict[str, object]] = {
    "atedm": {"schedule": "uniform-63"},
    "second": {"schedule": "paper"},
}


@pytest.fixture(scope="module")
def build_of(tmp_path_factory, request):  # noqa: ANN201 - Callable[[str], Path]
    """Each build of ``SPECS`` made on first use (~20 s each on 2 cores), once per module; ``tome``: the session's."""
    root = tmp_path_factory.mktemp("eval-builds")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name == "tome":
            return request.getfixturevalue("tiny_tome_build")
        if name not in made:
            made[name] = _build(root, name, **SPECS[name])
        return made[name]

    return get


def _cli(*args: object):  # noqa: ANN202 - click Result
    return CliRunner().invoke(main, [str(a) for a in args])


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*.png"))
            if "images" in p.parts}


@pytest.mark.parametrize("names", [("atedm", "tome"), pytest.param(("atedm", "second"), marks=pytest.mark.slow)],
                         ids=["atedm-and-tome", "two-schedules"])
def test_eval_end_to_end_and_a_rerun_reuses_every_image(names, build_of, inception, clip_folder, tmp_path):
    """The command on the unpruned set and each build: every output, sane values; then the same command again,
    which draws nothing (the PNGs untouched) and takes a fraction of the time. AT-EDM and ToMe run in the default
    suite (the ToMe build is the session's); a second AT-EDM schedule, another export, in the slow one."""
    builds = [build_of(name) for name in names]
    from atedm_export.evaluate.builds import labels_for

    names = tuple(labels_for(builds))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "eval"
    command = [*builds, "--out", out, "--prompts", prompts, "--clip", clip_folder, "--inception", inception]
    start = time.perf_counter()
    first = _cli("eval", *command)
    first_seconds = time.perf_counter() - start
    assert first.exit_code == 0, first.output
    for name in ("eval.json", "eval.csv", "grid.png", "quality-speed.png", STATE):
        assert (out / name).is_file(), name
    for label in ("unpruned", *names):
        assert sorted(p.name for p in (out / "images" / label).iterdir()) == ["0.json", "0.png", "1.json", "1.png",
                                                                              "2.json", "2.png"]
    report = json.loads((out / "eval.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in eval.json"))
    assert report["settings"]["prompts"] == 3 and report["settings"]["steps"] == 4
    assert report["settings"]["kid_subset_size"] == 3
    assert report["unpruned"]["seconds_per_image"] > 0 and 0 <= report["unpruned"]["clip_score"] <= 100
    assert set(report["builds"]) == set(names)
    for row in report["builds"].values():
        assert 0 < row["psnr"] < 100 and 0 < row["ssim"] <= 1
        assert row["fid"] >= -1e-6 and abs(row["kid"]) < 1 and row["seconds_per_image"] > 0
        assert 0 <= row["clip_score"] <= 100 and row["drawn"] == 3
    assert any(note.startswith("LPIPS") for note in report["notes"]) or "lpips" in report["builds"]["atedm"]
    assert len((out / "eval.csv").read_text().splitlines()) == 2 + len(names)
    from PIL import Image

    with Image.open(out / "grid.png") as grid:  # unpruned, each build, each difference; 3 prompts, a header
        assert grid.size == ((1 + 2 * len(names)) * 128, 3 * 128 + 16)
    before = _mtimes(out)
    start = time.perf_counter()
    again = _cli("eval", *command)
    again_seconds = time.perf_counter() - start
    assert again.exit_code == 0, again.output
    assert again.output.count("reused 3 of 3 images") == 1 + len(names)
    assert _mtimes(out) == before
    rerun = json.loads((out / "eval.json").read_text())
    assert all(row["drawn"] == 0 and row["reused"] == 3 for row in rerun["builds"].values())
    assert rerun["builds"]["atedm"]["seconds_per_image"] == report["builds"]["atedm"]["seconds_per_image"]
    assert again_seconds < first_seconds / 2, (first_seconds, again_seconds)


# --- bad inputs: one line, exit 2, nothing written --------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(build_of, tmp_path_factory) -> Path:
    """Every bad input the table names, made once."""
    root = tmp_path_factory.mktemp("eval-inputs")
    (root / "empty").mkdir()
    (root / "pictures").mkdir()
    from PIL import Image

    (root / "truncated").mkdir()  # valid headers over truncated bodies: PIL opens them, decoding fails
    for index in range(2):
        Image.new("RGB", (64, 64), (index * 90, 40, 200)).save(root / "truncated" / f"{index}.png")
        whole = (root / "truncated" / f"{index}.png").read_bytes()
        (root / "truncated" / f"{index}.png").write_bytes(whole[: len(whole) // 2])
    torch.jit.save(torch.jit.script(NaNInception()), str(root / "nan-inception.pt"))
    (root / "garbage.pt").write_bytes(os.urandom(256))
    (root / "bad-clip").mkdir()
    (root / "bad-clip" / "config.json").write_text("{not json")
    (root / "blank.txt").write_text("\n  \n")
    (root / "coco.json").write_text(json.dumps({"images": []}))
    (root / "coco-twice.json").write_text('{"annotations": [], "annotations": [{"image_id": 1, "caption": "a"}]}')
    (root / "coco-bool.json").write_text(json.dumps({"annotations": [{"image_id": True, "id": 1, "caption": "a fox"}]}))
    (root / "not-empty").mkdir()
    (root / "not-empty" / "theirs.txt").write_text("keep me")
    (root / "other-eval").mkdir()
    settings = {"prompts": ["another prompt"], "seed": 0, "steps": 4, "guidance": 7.5}
    (root / "other-eval" / STATE).write_text(json.dumps({"format": FORMAT, "settings": settings}))
    _copy(build_of("atedm"), root / "other-seed", lambda data: data["spec"].update(seed=1))
    _copy(build_of("atedm"), root / "no-baseline", lambda data: None, drop="baseline")
    return root


def _copy(build: Path, folder: Path, edit, drop: str | None = None) -> None:  # noqa: ANN001
    """The build's files hard-linked into ``folder``, the manifest rewritten by ``edit``; ``drop``: that graph's
    file removed."""
    data = json.loads((build / "manifest.json").read_text())
    for file in build.rglob("*"):
        if file.is_file() and file.name != "manifest.json":
            (folder / file.relative_to(build)).parent.mkdir(parents=True, exist_ok=True)
            os.link(file, folder / file.relative_to(build))
    if drop:
        (folder / data["shapes"][0][drop]["onnx"]["path"]).unlink()
    edit(data)
    (folder / "manifest.json").write_text(json.dumps(data))


BAD = [
    ("{a} --out {out}/e --inception {inception} --reference {in}/nowhere", "--reference {in}/nowhere: no such folder"),
    ("{a} --out {out}/e --inception {inception} --reference {in}/empty", "holds 0 images"),
    ("{a} --out {out}/e --reference {in}/pictures", "they need --inception FILE"),
    ("{a} --out {out}/e --inception {inception} --reference {in}/truncated", "--reference: cannot read image"),
    ("{a} --out {out}/e --inception {in}/nan-inception.pt", "returns NaN or infinite features"),
    ("{a} --out {out}/e --clip {in}/bad-clip", "cannot load a CLIP checkpoint"),
    ("{a} --out {out}/e --clip {in}/nowhere", "--clip {in}/nowhere: no such folder"),
    ("{a} --out {out}/e --inception {in}/garbage.pt", "not a TorchScript Inception"),
    ("{a} --out {out}/e --inception {in}/nowhere.pt", "no such file"),
    ("{a} --out {out}/e --inception {inception} --limit 1", "need at least 2 images"),
    ("{a} {in}/other-seed --out {out}/e", "differ in weights seed (0 vs 1)"),
    ("{a} {in}/no-baseline --out {out}/e", "baseline:"),
    ("{a} {a} --out {out}/e", "is given twice"),
    ("{a} {out}/nothing --out {out}/e", "is not a build folder"),
    ("{a} --out {in}/not-empty", "holds no eval record"),
    ("{a} --out {in}/other-eval", "use a new --out folder"),
    ("{a} --out {out}/no/such/e", "does not exist"),
    ("{a} --out {out}/e --prompts {in}/blank.txt", "holds no prompts"),
    ("{a} --out {a}/e", "and build 1 {a} overlap"),
    ("{a} --out {in} --prompts {in}/blank.txt", "and prompts {in}/blank.txt overlap"),
    ("{a} --out {out}/e --prompts {in}/nowhere.txt", "no such file"),
    ("{a} --out {out}/e --prompts {in}/blank.txt --coco-captions {in}/coco.json", "not both"),
    ("{a} --out {out}/e --coco-captions {in}/coco.json", "has no 'annotations' list"),
    ("{a} --out {out}/e --coco-captions {in}/coco-twice.json", "key 'annotations' is given twice"),
    ("{a} --out {out}/e --coco-captions {in}/coco-bool.json", "an annotation without an integer image_id"),
]


def _listing(*folders: Path) -> list[tuple[str, int]]:
    return sorted((str(p), p.stat().st_mtime_ns) for folder in folders for p in folder.rglob("*"))


@pytest.mark.parametrize(("command", "expected"), BAD, ids=[c[:70] for c, _ in BAD])
def test_bad_input_is_one_error_line_and_writes_nothing(command, expected, build_of, inputs, inception, tmp_path):
    (tmp_path / "out").mkdir()
    build = build_of("atedm")
    names = {"a": build, "out": tmp_path / "out", "in": inputs, "inception": inception}
    before = _listing(inputs, tmp_path, build)
    result = CliRunner().invoke(main, ["eval", *command.format(**names).split()])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and expected.format(**names) in errors[0], result.output
    assert "Traceback" not in result.output
    assert _listing(inputs, tmp_path, build) == before


def test_an_unpruned_staged_unet_runs_the_baseline_at_every_step(build_of):
    from atedm_export.runtime import StagedUNet
    from atedm_export.runtime.pipeline import draw, load_pipeline

    staged = StagedUNet.load(build_of("atedm"), unpruned=True)
    image, done = draw(load_pipeline(staged), staged, "a fox", steps=3, seed=0, guidance=7.5)
    assert image.size == (128, 128) and done.seconds > 0
    assert [(r["stage"], r["steps"], r["calls"]) for r in staged.stage_report()] == [("baseline", "0-2", 3)]
    pruned = StagedUNet(staged.backend)  # the same build and backend, its stages as built
    draw(load_pipeline(pruned), pruned, "a fox", steps=3, seed=0, guidance=7.5)
    assert [r["stage"] for r in pruned.stage_report()] == ["main"]


def test_bench_puts_atedm_and_tome_side_by_side(build_of, tiny_build, tmp_path):
    """``bench`` of two builds of one model: each build's rows, then one table of their schedules; the JSON holds
    both reports and the side-by-side rows, the CSV one row per build and graph, the plot one bar per build."""
    builds = [build_of("atedm"), build_of("tome")]
    report_path, csv_path, plot_path = tmp_path / "b.json", tmp_path / "b.csv", tmp_path / "b.png"
    result = _cli("bench", *builds, "--backends", "onnxruntime", "--warmup", "0", "--repeats", "1",
                  "--json", report_path, "--csv", csv_path, "--plot", plot_path)
    assert result.exit_code == 0, result.output
    assert "side by side" in result.output
    data = json.loads(report_path.read_text())
    assert [r["method"] for r in data["builds"]] == ["atedm", "tome"]
    side = data["side_by_side"]
    assert [(r["method"], r["backend"]) for r in side] == [("atedm", "onnxruntime"), ("tome", "onnxruntime")]
    assert all(r["seconds_per_image"] > 0 and r["flops_speedup"] > 1 for r in side)
    assert len(csv_path.read_text().splitlines()) == 1 + 2 * 2  # header, two graphs of each build
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = _cli("bench", builds[0], tiny_build, "--backends", "onnxruntime")  # tiny-sdxl beside tiny-sd15
    assert other.exit_code == 2 and "differ in model (tiny-sd15 vs tiny-sdxl)" in other.output
