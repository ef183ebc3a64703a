"""FLOPs counted on the patched module: the issue's acceptance figures, and the CLI around them."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from atedm_export.cli import _prediction_table, main
from atedm_export.costmodel import DEVICES, OpCost, Prediction, predict, record_ops
from atedm_export.dsap import stage_plan
from atedm_export.flops import DevicePrediction, graph_ops, spec_blocks, with_map_impl
from atedm_export.kernels.costs import KERNEL_COSTS
from atedm_export.models import build_unet, unet_config
from atedm_export.spec import load_spec

KERNEL_OPS = set(KERNEL_COSTS)


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


def test_json_has_each_map_impl_beside_the_exported_graphs_speedup():
    report = _flops("tiny-sd15", "--schedule", "uniform-63", "--device", "h100")
    h100 = report["predictions"]["h100"]
    (stage,) = h100["stages"]
    assert stage["map_impls"]["explicit"] == stage["predicted_speedup"]
    assert stage["map_impls"]["kernels"] == pytest.approx(h100["baseline_ms"] / stage["kernels"]["ms"])
    assert h100["map_impls"] == {"explicit": h100["predicted_speedup"], "kernels": pytest.approx(stage["map_impls"]["kernels"])}
    assert stage["kernels"]["launches"] < stage["launches"]  # the map layer's ops: fewer, larger
    assert h100["launch_us"] == DEVICES["h100"].launch_us > 0 and h100["fp32_tflops"] == 67.0


def _prediction(kernels: bool) -> DevicePrediction:
    """A prediction by hand: a 10 ms baseline, one 8 ms stage, 5 ms with the map layer on its kernels."""
    stage = {"main": Prediction(8e-3, 4e-3, 0, 0, {"memory": 8e-3}, 300)}
    return DevicePrediction(DEVICES["h200"], Prediction(10e-3, 0.0, 0, 0, {"memory": 10e-3}, 200), stage, {"main": 20},
                            {"main": Prediction(5e-3, 1e-3, 0, 0, {"memory": 5e-3}, 250)} if kernels else {})


def test_a_method_without_a_map_layer_has_no_map_impls():
    assert with_map_impl(load_spec("tiny-sdxl-tome").pruning, "kernels") is None
    assert with_map_impl(load_spec("tiny-sdxl").pruning.model_copy(update={"heads": "max"}), "kernels") is None
    data = _prediction(kernels=False).to_json()
    assert "map_impls" not in data and "map_impls" not in data["stages"][0]
    assert _prediction(kernels=True).to_json()["map_impls"] == {"explicit": 1.25, "kernels": 2.0}


def test_the_table_shows_the_kernels_speedup():
    with_kernels = Console(width=200, record=True)
    with_kernels.print(_prediction_table(_prediction(kernels=True), 2, "fp16"))
    text = with_kernels.export_text()
    assert "map kernels" in text and "11.5 µs a kernel" in text and "2.00×" in text and "1.25×" in text
    without = Console(width=200, record=True)
    without.print(_prediction_table(_prediction(kernels=False), 2, "fp16"))
    assert "map kernels" not in without.export_text()


def test_launch_costs_are_counted_per_kernel():
    h100 = DEVICES["h100"]
    empty = OpCost("add", "memory", 0, 0, False, launches=3)
    assert empty.seconds(h100) == pytest.approx(3 * h100.launch_us * 1e-6)
    a = torch.empty(256, 256, device="meta")
    ops = record_ops(lambda: [a + a for _ in range(100)])  # 100 small kernels: launch-bound, not bandwidth-bound
    bare = predict(ops, dataclasses.replace(h100, launch_us=0.0))
    priced = predict(ops, h100)
    assert priced.launches == 100
    assert priced.seconds - bare.seconds == pytest.approx(100 * h100.launch_us * 1e-6)
    assert priced.seconds > 10 * bare.seconds


def test_fp32_matmuls_run_off_the_tensor_cores():
    h100 = DEVICES["h100"]
    half, single = (torch.empty(2, 512, 512, dtype=dtype, device="meta") for dtype in (torch.float16, torch.float32))
    (fp16,), (fp32,) = record_ops(lambda: half @ half), record_ops(lambda: single @ single)
    assert (fp16.fp32, fp32.fp32, fp16.flops) == (False, True, fp32.flops)
    launch = h100.launch_us * 1e-6
    assert fp32.seconds(h100) - launch == pytest.approx(fp32.flops / 67.0e12)
    assert fp16.seconds(h100) - launch == pytest.approx(max(fp16.flops / 989.4e12, fp16.bytes / 3350e9))


def test_the_map_layers_kernels_are_priced_by_their_formulas():
    batch, tokens, heads, dim, keep = 2, 256, 4, 32, 95
    q, k, v = (torch.empty(batch, tokens, heads, dim, dtype=torch.float16, device="meta") for _ in range(3))
    scores = torch.empty(batch, tokens, device="meta")

    def layer() -> None:
        _, lse = torch.ops.atedm.attention_lse(q, k, v, 0.125)
        attn_map, _ = torch.ops.atedm.head_mean_map(q, k, lse, 0.125)
        kept, slot_of = torch.ops.atedm.select_kept(scores, keep)
        torch.ops.atedm.recovery_sources(attn_map, kept, slot_of)

    attention, head_mean, selection, recovery = record_ops(layer)
    assert [(o.op, o.kind, o.map_layer) for o in (attention, head_mean, selection, recovery)] == [
        ("attention_lse", "attention", True), ("head_mean_map", "matmul", True), ("select_kept", "memory", True),
        ("recovery_sources", "memory", True)]
    qkv, lse, attn_map = 3 * q.numel() * 2, batch * heads * tokens * 4, batch * tokens * tokens * 4
    assert (attention.flops, attention.bytes) == (4 * batch * heads * tokens * tokens * dim, qkv + q.numel() * 2 + lse)
    products = batch * heads * tokens * tokens
    assert head_mean.flops == 2 * products * dim + products and head_mean.launches == 1
    assert head_mean.bytes == 2 * q.numel() * 2 + lse + attn_map + batch * 2 * tokens * 4  # 2 row tiles' column sums
    assert selection.flops == 0 and selection.launches == 1  # one pass, the k-th largest found in it (no topk)
    assert selection.bytes == batch * tokens * 4 + batch * keep * 8 + batch * tokens * 8
    sectors = 1 - (1 - keep / tokens) ** 8  # 32-byte sectors of which at least one column is kept
    assert recovery.launches == 1  # a kept row's own slot is written by the same kernel
    assert recovery.bytes == int(attn_map * sectors) + batch * keep * 8 + 2 * batch * tokens * 8


def test_sdxl_main_stage_on_its_kernels_is_predicted_faster_than_explicit():
    spec = load_spec("sdxl-base-1024")
    unet = build_unet(unet_config(spec.model), dtype=spec.dtype, device="meta")
    contract = spec.contract(dict(unet.config))
    main_stage = next(s for s in spec.dsap.stages if s.name == "main")
    h100 = DEVICES["h100"]
    explicit, kernels = (stage_plan(main_stage, spec_blocks(spec, unet), with_map_impl(spec.pruning, impl))
                         for impl in ("explicit", "kernels"))
    explicit, kernels = graph_ops(unet, contract, explicit), graph_ops(unet, contract, kernels)
    assert not {o.op for o in explicit} & KERNEL_OPS
    assert sum(o.op in KERNEL_OPS for o in kernels) == 4 * 11  # four kernel ops in each of the 11 pruned blocks
    assert all(o.map_layer for o in kernels if o.op in KERNEL_OPS)
    explicit_time, kernels_time = predict(explicit, h100), predict(kernels, h100)
    assert kernels_time.seconds < 0.7 * explicit_time.seconds
    assert kernels_time.map_seconds < 0.25 * explicit_time.map_seconds


def test_the_mapless_kernels_pay_a_product_per_step_and_no_map():
    batch, tokens, heads, dim, keep = 2, 512, 4, 32, 190
    q, k = (torch.empty(batch, tokens, heads, dim, dtype=torch.float16, device="meta") for _ in range(2))
    lse = torch.empty(batch, heads, tokens, device="meta")
    scores, kept = torch.empty(batch, tokens, device="meta"), torch.empty(batch, keep, dtype=torch.int64, device="meta")
    slot_of = torch.empty(batch, tokens, dtype=torch.int64, device="meta")
    step, recovery = record_ops(lambda: (torch.ops.atedm.gwpr_step(q, k, lse, scores, 0.125),
                                         torch.ops.atedm.recovery_mapless(q, k, lse, kept, slot_of, 0.125)))
    products = batch * heads * tokens * tokens
    assert (step.op, step.flops, step.launches, step.map_layer) == ("gwpr_step", 2 * products * dim + 3 * products, 1, True)
    assert step.bytes < products  # no [B, N, N] map goes through memory
    kept_products = batch * heads * tokens * keep
    assert recovery.flops == 2 * kept_products * dim + kept_products and recovery.launches == 1
