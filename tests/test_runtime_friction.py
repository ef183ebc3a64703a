"""Friction on the way to an image (issue 18): what the runtime checks on load, what it tells and keeps quiet.

- Loading for a backend checks the build files that backend opens, and only those.
- A prompt past the text encoders' tokens is counted where the pipeline cuts it, with its own tokenizers.
- The libraries' loading bars, notices and warnings stay out of ``generate``'s output.
- The PNG gets the mode any new file gets; a non-finite input is refused with the input's name.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from atedm_export.cli import main
from atedm_export.buildfolder import MANIFEST, ManifestError, file_entry, first_view, pipeline_info, read_manifest
from atedm_export.runtime import StagedUNet
from atedm_export.runtime.backends import RuntimeInputError
from atedm_export.runtime.pipeline import write_png, dropped_tokens, generate, tiny_pipeline, tiny_tokenizer
from atedm_export.staging import check_output_file

from .conftest import corrupted_copy

LONG_PROMPT = "x " * 100  # the tiny tokenizer: one token per letter, + start and end: 102 of 77, 25 cut
LONG_NEGATIVE = "y " * 80  # 82 of 77: 5 cut


def _rewrite_manifest(folder: Path, change) -> None:  # noqa: ANN001 - a function of the manifest's JSON
    path = folder / MANIFEST
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def _build_missing_a_plan(tiny_build: Path, copy: Path) -> Path:
    """A copy of the tiny build whose manifest lists engine plans, one of which is missing.

    Where TensorRT-RTX built the tiny build's plans, one is deleted; elsewhere the manifest is given plans
    that were never written (what a build copied without its ``engines/`` folder looks like)."""
    shutil.copytree(tiny_build, copy)
    if read_manifest(copy, verify=False).engine.skipped:
        def with_plans(data: dict) -> None:
            data["engine"] = {"library": "tensorrt-rtx", "module": "tensorrt_rtx_bindings", "version": "1.0",
                              "targets": ["sm89"]}
            for entry in [data["shapes"][0]["baseline"], *data["shapes"][0]["stages"]]:
                plan = copy / "engines" / f"{entry['name']}.plan"
                plan.parent.mkdir(exist_ok=True)
                plan.write_bytes(b"a plan")
                entry["engine"] = file_entry(copy, plan).model_dump()

        _rewrite_manifest(copy, with_plans)
    (copy / first_view(read_manifest(copy, verify=False)).graph("main").engine.path).unlink()
    return copy


# --------------------------------------------------------------------------- 1. what loading checks


def test_a_missing_engine_plan_refuses_only_the_engine_backends(tiny_build, tmp_path):
    copy = _build_missing_a_plan(tiny_build, tmp_path / "build")
    onnx = StagedUNet.load(copy, backend="onnxruntime")
    feed = first_view(onnx.manifest).contract.example_feed()
    assert torch.isfinite(onnx.backend.run("main", feed)).all()  # the graphs it opens are all there
    StagedUNet.load(copy, backend="eager")  # reads no file of the build: the UNet comes from the spec's model
    with pytest.raises(ManifestError, match=r"^main: .*main\..*plan is missing \(the build is incomplete") as info:
        StagedUNet.load(copy, backend="tensorrt-rtx")
    assert "\n" not in str(info.value)
    result = CliRunner().invoke(main, ["generate", str(copy), "-p", "a red fox", "--steps", "1", "-o",
                                       str(tmp_path / "fox.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fox.png").is_file()


def test_graph_backends_still_check_the_graphs_they_open(tiny_build, tmp_path):
    copy = corrupted_copy(tiny_build, tmp_path / "build", "early")
    with pytest.raises(ManifestError, match="early: .* does not match its checksum"):
        StagedUNet.load(copy, backend="onnxruntime")
    if not read_manifest(copy, verify=False).engine.skipped:  # engine backends open the graphs too (refit)
        with pytest.raises(ManifestError, match="early: .* does not match its checksum"):
            StagedUNet.load(copy, backend="tensorrt-rtx")
    StagedUNet.load(copy, backend="eager")


# --------------------------------------------------------------------------- 2. a prompt that is cut


def test_dropped_tokens_counts_what_the_tokenizer_cuts(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path)
    pipe = SimpleNamespace(tokenizer=tokenizer)
    assert [dropped_tokens(pipe, "x " * n) for n in (0, 1, 75, 76, 100)] == [0, 0, 0, 1, 25]
    assert dropped_tokens(pipe, None) == 0
    text = "x " * 90
    kept = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids
    full = tokenizer(text).input_ids
    assert len(full) - len(kept) == dropped_tokens(pipe, text) == 15  # exactly what the pipeline's call cuts
    assert kept == [*full[:76], full[-1]]  # ...from the end of the text: the end token stays


def test_dropped_tokens_takes_the_most_over_both_tokenizers(tmp_path):
    first, second = tiny_tokenizer(tmp_path), tiny_tokenizer(tmp_path)
    second.model_max_length = 60  # SDXL encodes the text with both: the shorter one cuts more
    assert dropped_tokens(SimpleNamespace(tokenizer=first, tokenizer_2=second), "x " * 70) == 12
    assert dropped_tokens(SimpleNamespace(tokenizer=None, tokenizer_2=second), "x " * 70) == 12  # the refiner's one
    assert dropped_tokens(SimpleNamespace(tokenizer=first, tokenizer_2=None), "x " * 70) == 0


def test_generate_counts_the_tokens_of_each_prompt_that_were_cut(tiny_build, tmp_path):
    staged = StagedUNet.load(tiny_build, backend="onnxruntime")
    long = generate(staged, LONG_PROMPT, tmp_path / "long.png", negative_prompt=LONG_NEGATIVE, steps=1)
    assert (long.truncated_tokens, long.negative_truncated_tokens, long.token_limit) == (25, 5, 77)
    short = generate(staged, "a red fox", tmp_path / "short.png", negative_prompt="blurry", steps=1)
    assert (short.truncated_tokens, short.negative_truncated_tokens) == (0, 0)
    unguided = generate(staged, "a red fox", tmp_path / "unguided.png", negative_prompt=LONG_NEGATIVE, steps=1,
                        guidance=1.0)
    assert unguided.negative_truncated_tokens == 0  # without guidance the pipeline never encodes it


# --------------------------------------------------------------------------- 3. only our own output


@pytest.fixture(scope="module")
def folder_build(tiny_build, tmp_path_factory):
    """The tiny build as if built from a diffusers pipeline folder: the same graphs, and a pipeline around them
    that ``generate`` loads with ``from_pretrained`` (where diffusers and transformers draw their bars)."""
    root = tmp_path_factory.mktemp("folder-build")
    tiny_pipeline("tiny-sdxl", seed=0).save_pretrained(root / "pipeline", safe_serialization=True)
    shutil.copytree(tiny_build, root / "build")
    _rewrite_manifest(root / "build", lambda data: data["spec"].update(model=str(root / "pipeline")))
    return root / "build"


def _library_state() -> tuple:
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import utils as hub
    from transformers.utils import logging as transformers_logging

    return (list(warnings.filters), diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled(),
            transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled(),
            hub.are_progress_bars_disabled())


def test_generate_prints_nothing_of_the_libraries(folder_build, tmp_path, capfd):
    before = _library_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # (pytest records warnings instead of printing them: count them here)
        staged = StagedUNet.load(folder_build, backend="onnxruntime")
        done = generate(staged, LONG_PROMPT, tmp_path / "fox.png", negative_prompt=LONG_NEGATIVE, steps=2)
    printed = capfd.readouterr()
    assert (printed.out, printed.err) == ("", ""), printed.err[-2000:]
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert done.truncated_tokens == 25  # said in the result, for the caller to word, instead of a library's notice
    assert _library_state() == before  # the caller's logging, warning filters and progress bars are as they were


def test_the_cli_prints_only_its_own_lines(folder_build, tmp_path):
    """The whole command in a process of its own, as a user runs it: every stream, every library's handler."""
    done = subprocess.run([sys.executable, "-c", "from atedm_export.cli import main; main()", "generate",
                           str(folder_build), "-p", LONG_PROMPT, "--negative-prompt", LONG_NEGATIVE, "--steps", "2",
                           "-o", str(tmp_path / "fox.png")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    printed = done.stdout + done.stderr
    for noise in ("it/s", "%|", "Loading", "Warning", "warn(", "deprecat", "torchvision", "truncated because"):
        assert noise not in printed, printed


def test_a_pipelines_unet_folder_finds_its_pipeline_and_its_files_are_fingerprinted(folder_build, tmp_path):
    """``model: pipe/unet`` builds and generates: the pipeline is its parent; a component edited after the
    build is named by ``generate`` (the image uses the files as they are)."""
    from atedm_export.models import pipeline_folder

    pipe = folder_build.parent / "pipeline"
    (pipe / "unet").mkdir(exist_ok=True)
    (pipe / "unet" / "config.json").write_text("{}")
    assert pipeline_folder(str(pipe)) == pipeline_folder(str(pipe / "unet")) == pipe.resolve()
    assert pipeline_folder(str(tmp_path)) is None and pipeline_folder("tiny-sdxl") is None
    copy = tmp_path / "build"
    shutil.copytree(folder_build, copy)
    info = pipeline_info(pipe.resolve())
    assert {"model_index.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"} <= {f.path for f in info.files}
    assert not any(f.path.startswith("unet/") for f in info.files)
    _rewrite_manifest(copy, lambda data: data.update(pipeline=info.model_dump(mode="json")) or
                      data["spec"].update(model=str(pipe / "unet")))
    first = CliRunner().invoke(main, ["generate", str(copy), "-p", "a fox", "--steps", "2", "-o", str(tmp_path / "a.png")])
    assert first.exit_code == 0 and "changed since the build" not in first.output, first.output
    config = pipe / "vae" / "config.json"
    original = config.read_text()
    try:
        config.write_text(original + "\n")  # the same config, another file: its size and hash differ
        second = CliRunner().invoke(main, ["generate", str(copy), "-p", "a fox", "--steps", "2", "-o", str(tmp_path / "b.png")])
    finally:
        config.write_text(original)
    assert second.exit_code == 0, second.output
    assert "1 file(s) of the pipeline changed since the build (vae/config.json)" in " ".join(second.output.split())


# --------------------------------------------------------------------------- 4. the PNG's mode


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002], ids=lambda m: f"umask-{m:03o}")
def test_png_gets_the_mode_of_a_new_file(tmp_path, umask):
    previous = os.umask(umask)
    try:
        output = tmp_path / "image.png"
        write_png(Image.new("RGB", (4, 4)), output)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(output.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]  # no temporary file left beside it


def test_png_write_fits_the_longest_name_allowed_and_leaves_nothing_on_failure(tmp_path):
    name = "x" * (os.pathconf(tmp_path, "PC_NAME_MAX") - len(".tmp") - 8 - len(".png")) + ".png"
    output = tmp_path / name
    check_output_file(output)  # the longest name the CLI lets through
    write_png(Image.new("RGB", (4, 4)), output)  # its temporary sibling's name fits the file system too
    assert output.is_file()

    class Broken:
        def save(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_png(Broken(), tmp_path / "broken.png")
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_generated_png_is_readable_by_others(tiny_build, tmp_path):
    previous = os.umask(0o022)
    try:
        generate(StagedUNet.load(tiny_build, backend="onnxruntime"), "a red fox", tmp_path / "fox.png", steps=1)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "fox.png").stat().st_mode) == 0o644


# --------------------------------------------------------------------------- 6. non-finite input


def _call(staged: StagedUNet, feed: dict[str, torch.Tensor]) -> torch.Tensor:
    return staged(feed["sample"], feed["timestep"][0], feed["encoder_hidden_states"],
                  added_cond_kwargs={"text_embeds": feed["text_embeds"], "time_ids": feed["time_ids"]}).sample


@pytest.mark.parametrize("backend", ["onnxruntime", "eager"])
def test_a_non_finite_input_is_refused_naming_it(tiny_build, backend):
    staged = StagedUNet.load(tiny_build, backend=backend)
    feed = first_view(staged.manifest).contract.example_feed()
    staged.set_timesteps([float(feed["timestep"][0])])
    assert torch.isfinite(_call(staged, feed)).all()
    sample = feed["sample"].clone()
    sample[0, 0, 0, :3] = float("nan")
    with pytest.raises(RuntimeInputError, match=rf"^input 'sample' has 3 of {sample.numel()} values NaN or infinite; "
                                                r"expected finite values") as info:
        _call(staged, {**feed, "sample": sample})
    assert "\n" not in str(info.value)
    text = feed["encoder_hidden_states"].clone()
    text[1, -1, -1] = float("-inf")
    with pytest.raises(RuntimeInputError, match="^input 'encoder_hidden_states' has 1 of"):
        _call(staged, {**feed, "encoder_hidden_states": text})
    assert staged.stats["main"].calls == 1  # the refused calls ran nothing
