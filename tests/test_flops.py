"""FLOPs counted on the patched module: the issue's acceptance figures, and the CLI around them."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from atedm_export.cli import main


def _flops(*args: str) -> dict:
    result = CliRunner().invoke(main, ["flops", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.slow
def test_sdxl_paper_schedule_hits_the_paper_budget_at_the_papers_prune_point():
    report = _flops("graphs/sdxl-base-1024.yaml", "--schedule", "paper", "--prune-point", "layer")
    assert report["baseline_tflops"] == pytest.approx(6.76, abs=0.01)
    assert report["schedule_saving"] == pytest.approx(0.388, abs=0.005)
    early, main_stage = report["stages"]
    assert (early["name"], early["steps"], main_stage["steps"]) == ("early", [0, 5], [5, 50])
    assert main_stage["saving"] > early["saving"] > 0.2
    assert main_stage["keep"]["down_blocks.1.attentions.0"] == 1516


@pytest.mark.slow
def test_sdxl_uniform_63_saves_40_percent_after_the_layer_and_45_after_attn1():
    layer = _flops("sdxl-base-1024", "--schedule", "uniform-63", "--prune-point", "layer")
    assert layer["schedule_saving"] == pytest.approx(0.402, abs=0.002)
    attn1 = _flops("sdxl-base-1024", "--schedule", "uniform-63")  # the default prune point
    assert attn1["schedule_saving"] == pytest.approx(0.451, abs=0.002)
    paper = _flops("sdxl-base-1024")
    assert paper["schedule_saving"] == pytest.approx(0.435, abs=0.002)  # more than the paper's 38.8%, same output


@pytest.mark.slow
def test_tiny_report_is_consistent():
    report = _flops("tiny-sdxl")
    stages = report["stages"]
    assert {"baseline_tflops", "stages", "schedule_saving"} <= set(report)
    assert sum(s["num_steps"] for s in stages) == report["steps"] == 20
    for s in stages:
        assert s["saving"] == pytest.approx(1 - s["tflops"] / report["baseline_tflops"])
    weighted = sum(s["tflops"] * s["num_steps"] for s in stages) / report["steps"]
    assert report["schedule_saving"] == pytest.approx(1 - weighted / report["baseline_tflops"])
    assert _flops("tiny-sdxl", "--schedule", "none")["schedule_saving"] == pytest.approx(0.0, abs=1e-12)


def test_flops_table_and_errors():
    runner = CliRunner()
    table = runner.invoke(main, ["flops", "tiny-sdxl"])
    assert table.exit_code == 0 and "schedule" in table.output and "up_blocks.1.attentions.2" in table.output
    missing = runner.invoke(main, ["flops", "nope.yaml"])
    assert missing.exit_code == 2 and "spec 'nope.yaml' not found" in missing.output
    bad = runner.invoke(main, ["flops", "tiny-sdxl", "--schedule", "fastest"])
    assert bad.exit_code == 2 and "unknown schedule 'fastest'" in bad.output
