from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from atedm_export.errors import SpecError
from atedm_export.spec import builtin_spec_names, load_spec

GOOD = {"name": "t", "model": "tiny-sdxl", "height": 256, "width": 256, "precision": "fp32", "steps": 20}


def _write(tmp_path, data) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_builtin_specs_load():
    assert {"tiny-sdxl", "sdxl-base-1024"} <= set(builtin_spec_names())
    tiny = load_spec("tiny-sdxl")
    assert (tiny.height, tiny.batch, tiny.text_length, tiny.dsap.name) == (256, 2, 77, "paper")
    base = load_spec("graphs/sdxl-base-1024.yaml")
    assert (base.height, base.precision, base.steps) == (1024, "fp16", 50)


def test_inline_schedule_and_options(tmp_path):
    data = {**GOOD, "schedule": {"stages": [{"name": "only", "until": 1.0, "keep": 0.5}]}, "pruning": {"iterations": 3}}
    spec = load_spec(_write(tmp_path, data))
    assert spec.dsap.stages[0].keep == 0.5
    assert spec.pruning.iterations == 3
    assert spec.with_schedule("none").dsap.name == "none"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"height": 250}, "height: must be a multiple of 8 .* \\(got 250\\)"),
        ({"width": 1001}, "width: must be a multiple of 8"),
        ({"precision": "fp8"}, "precision: Input should be 'fp32', 'fp16' or 'bf16' \\(got 'fp8'\\)"),
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"pruning": {"iteratons": 5}}, "unknown key 'pruning.iteratons'"),
        ({"schedule": "fast"}, "unknown schedule 'fast'"),
        ({"schedule": {"stages": [{"name": "a", "until": 1.0, "keep": 1.2}]}}, "schedule.*keep"),
        ({"batch": 0}, "batch: Input should be greater than or equal to 1"),
        ({"pruning": {"recovery": "nearest"}}, "pruning.recovery: Input should be 'copy' or 'skip'"),
    ],
)
def test_bad_specs_fail_with_one_line_naming_the_field(tmp_path, change, message):
    with pytest.raises(SpecError, match=message) as info:
        load_spec(_write(tmp_path, {**GOOD, **change}))
    assert "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SpecError, match="not found; expected a YAML file or one of: .*tiny-sdxl"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("height: [1, 2\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(bad)


def test_relative_paths_are_the_spec_folders_and_recorded_absolute(tmp_path, monkeypatch):
    """A spec builds the same from any working directory: ``model`` and a schedule file are read from its folder."""
    import yaml

    from atedm_export.models import load_unet

    specs = tmp_path / "specs"
    (specs / "models").mkdir(parents=True)
    load_unet("tiny-sd15").save_pretrained(specs / "models" / "pipe" / "unet")
    (specs / "fast.yaml").write_text(yaml.safe_dump({"stages": [{"name": "all", "until": 1.0, "keep": 0.5}]}))
    (specs / "mine.yaml").write_text(yaml.safe_dump({"model": "models/pipe", "height": 256, "width": 256,
                                                     "schedule": "fast.yaml"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = load_spec(str(specs / "mine.yaml"))
    assert spec.model == str((specs / "models" / "pipe").resolve())
    assert spec.dsap.name == "fast" and spec.dsap.stages[0].keep == 0.5
    (specs / "missing.yaml").write_text(yaml.safe_dump({"model": "./nowhere"}))
    assert load_spec(str(specs / "missing.yaml")).model == str((specs / "nowhere").resolve())
    assert load_spec("tiny-sd15").model == "tiny-sd15"  # built-in names are never paths


def test_schedules_by_preset_name_with_or_without_yaml_or_by_file(tmp_path):
    from atedm_export.dsap import load_preset, load_schedule

    assert load_schedule("paper") == load_schedule("paper.yaml") == load_preset("paper")
    custom = tmp_path / "custom.yaml"
    custom.write_text("stages:\n  - {name: all, until: 1.0, keep: 0.4}\n")
    assert load_schedule(str(custom)).name == "custom" and load_spec("tiny-sd15").with_schedule(str(custom)).dsap.stages[0].keep == 0.4
    assert load_spec("tiny-sd15").with_schedule("dagger.yaml").schedule == "dagger"


def test_a_spec_and_prompts_from_a_pipe_load(tmp_path):
    """``build <(cat spec.yaml)`` and ``--prompts <(echo "a fox")``: a pipe is a file to read, not "not found"."""
    import os
    import threading

    from atedm_export.evaluate.prompts import prompts_from_file

    def piped(name: str, text: str) -> str:
        path = tmp_path / name
        os.mkfifo(path)
        threading.Thread(target=lambda: path.write_text(text), daemon=True).start()
        return str(path)

    spec = load_spec(piped("spec", "name: piped\nmodel: tiny-sd15\nheight: 256\nwidth: 256\n"))
    assert (spec.name, spec.height) == ("piped", 256)
    assert prompts_from_file(Path(piped("prompts", "a fox\n\na red barn\n"))) == ["a fox", "a red barn"]
