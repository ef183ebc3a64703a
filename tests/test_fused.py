"""The baseline users run on each backend, and a cost model that knows which attention is fused.

One tiny SD 1.5 build with onnxruntime's fused form of every graph: the fused graphs compute what the
plain ones and eager do, every attention but the map layer's is one onnxruntime kernel, and ``bench``
takes onnxruntime's fastest baseline (fused or plain) as its reference. The cost
model's FLOPs equal the graph's, its bytes are right on ops counted by hand, and it prices the map
layer's ops apart. The fused build's tests are in the slow suite (its onnxruntime optimizer runs take a
minute); the cost model's run on the shared tiny build in the default one.
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner

from atedm_export.cli import main
from atedm_export.costmodel import DEVICES, OpCost, predict, record_ops
from atedm_export.buildfolder import first_view, read_manifest
from atedm_export.registry import COST_DEVICES


@pytest.fixture(scope="module")
def fused_build(tmp_path_factory):
    from atedm_export.build import BuildRequest, build
    from atedm_export.spec import load_spec

    out = tmp_path_factory.mktemp("fused") / "sd15"
    build(BuildRequest(load_spec("tiny-sd15"), out, library="onnx", stages=("main",), ort_fusion=True))
    return out


def _ops(path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.slow
def test_every_attention_but_the_map_layers_is_fused(fused_build):
    """In the graphs, every attention but the map layer's is in TensorRT's fused form (scale before the first
    product, the softmax read by the second only); onnxruntime's optimizer fuses exactly those."""
    manifest = read_manifest(fused_build)
    layers = 16  # tiny-sd15: one transformer layer in each of its 16 attention blocks
    report = json.loads(CliRunner().invoke(main, ["inspect", str(fused_build), "--json"]).output)["attention"]
    assert report["baseline"] == {"fusable": 2 * layers, "map": 0, "onnxruntime_fused": 2 * layers}
    base = _ops(fused_build / first_view(manifest).baseline.ort_onnx.path)
    assert (base.get("Attention"), base.get("MultiHeadAttention"), base.get("Softmax", 0)) == (layers, layers, 0)
    main_stage = first_view(manifest).graph("main")
    pruned = sum(k < first_view(manifest).tokens[b] for b, k in main_stage.keep.items())
    assert pruned > 0
    assert report["main"]["fusable"] == report["main"]["onnxruntime_fused"] == 2 * layers - pruned
    assert report["main"]["map"] > 0  # the map layers' per-head maps
    fused = _ops(fused_build / main_stage.ort_onnx.path)
    assert fused.get("Attention", 0) == layers - pruned  # each pruned block's attn1 reads its map: not fused
    assert fused["MultiHeadAttention"] == layers  # the cross-attention on the kept tokens is fused too
    assert "Softmax" in fused and "Attention" not in _ops(fused_build / main_stage.onnx.path)


@pytest.mark.slow
def test_fused_graphs_verify_against_eager(fused_build):
    result = CliRunner().invoke(main, ["verify", str(fused_build), "--json"])
    assert result.exit_code == 0, result.output
    checks = json.loads(result.output)["checks"]
    assert {(c["graph"], c["backend"]) for c in checks} == {
        (g, b) for g in ("baseline", "main") for b in ("onnxruntime", "onnxruntime-fused")}
    assert all(c["passed"] for c in checks)


@pytest.mark.slow
def test_bench_takes_the_fastest_baseline_form_as_reference(fused_build, tmp_path):
    report_path = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(fused_build), "--backends", "onnxruntime", "--warmup", "0",
                                       "--repeats", "1", "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    rows = {(r["graph"], r["form"]): r for r in report["rows"]}
    assert set(rows) == {(g, f) for g in ("baseline", "main") for f in ("fused", "unfused")}
    reference = report["references"]["onnxruntime"]
    fastest = min(("fused", "unfused"), key=lambda form: rows[("baseline", form)]["median_ms"])
    assert reference["form"] == fastest and reference["median_ms"] == rows[("baseline", fastest)]["median_ms"]
    for r in rows.values():  # every ratio against the fastest baseline, whichever form it is
        assert r["speedup_vs_unpruned"] == pytest.approx(reference["median_ms"] / r["median_ms"])
    assert "onnxruntime reference (its fastest baseline)" in result.output


def test_cost_model_flops_equal_the_graph_count(tiny_build):
    from atedm_export.flops import graph_ops
    from atedm_export.models import build_unet, unet_config

    manifest = read_manifest(tiny_build)
    spec = first_view(manifest).graph_spec
    unet = build_unet(unet_config(spec.model), device="meta")
    for entry in (first_view(manifest).baseline, first_view(manifest).graph("main")):
        ops = graph_ops(unet, first_view(manifest).contract, first_view(manifest).plan(entry))
        assert sum(o.flops for o in ops) / spec.batch / 1e12 == pytest.approx(entry.graph_tflops, rel=1e-6)


def test_cost_model_bytes_and_kinds_by_hand():
    a, b = torch.empty(64, 32, device="meta"), torch.empty(32, 16, device="meta")
    q, k, v = (torch.empty(2, 4, 128, 8, device="meta") for _ in range(3))
    ops = record_ops(lambda: (a @ b, a.t(), torch.nn.functional.scaled_dot_product_attention(q, k, v), a.softmax(-1)))
    assert [(o.op, o.kind) for o in ops] == [("mm", "matmul"), ("attention", "attention"), ("_softmax", "memory")]
    mm, attention, softmax = ops
    assert (mm.flops, mm.bytes) == (2 * 64 * 32 * 16, (64 * 32 + 32 * 16 + 64 * 16) * 4)
    assert (attention.flops, attention.bytes) == (4 * 2 * 4 * 128 * 128 * 8, 4 * (2 * 4 * 128 * 8) * 4)
    assert (softmax.flops, softmax.bytes) == (0, 2 * 64 * 32 * 4)
    h100 = DEVICES["h100"]
    one = OpCost("x", "matmul", int(989.4e12), 0, False)  # one second of compute, no bytes, one launch
    assert predict([one], h100).seconds == pytest.approx(1.0 + h100.launch_us * 1e-6)


def test_cost_model_fuses_stock_attention_and_prices_the_map_layer_apart(tiny_build):
    from atedm_export.flops import graph_ops
    from atedm_export.models import build_unet, unet_config

    manifest = read_manifest(tiny_build)
    unet = build_unet(unet_config(first_view(manifest).graph_spec.model), device="meta")
    attentions = 2 * sum(len(b.transformer_blocks) for b in unet.modules() if hasattr(b, "transformer_blocks"))
    baseline = graph_ops(unet, first_view(manifest).contract, None)
    assert sum(o.kind == "attention" for o in baseline) == attentions and not any(o.map_layer for o in baseline)
    main_stage = first_view(manifest).graph("main")
    pruned = sum(k < first_view(manifest).tokens[b] for b, k in main_stage.keep.items())
    staged = graph_ops(unet, first_view(manifest).contract, first_view(manifest).plan(main_stage))
    assert sum(o.kind == "attention" for o in staged) == attentions - pruned  # map layers: explicit ops
    assert not any(o.kind == "attention" and o.map_layer for o in staged)
    assert {o.op for o in staged if o.map_layer} >= {"bmm", "_softmax", "topk"}


@pytest.mark.slow
def test_flops_and_inspect_predict_per_device(tiny_build):
    assert set(COST_DEVICES) == {*DEVICES, "cpu"}
    result = CliRunner().invoke(main, ["flops", "tiny-sdxl", "--device", "h100", "--device", "rtx4090", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    h100 = report["predictions"]["h100"]
    assert {s["name"] for s in h100["stages"]} == {s["name"] for s in report["stages"]}
    for stage in h100["stages"]:
        assert stage["predicted_speedup"] == pytest.approx(h100["baseline_ms"] / stage["ms"])
        assert 0 < stage["map_share"] < 1
    assert h100["predicted_speedup"] > 0 and "3.35 TB/s" in h100["source"]
    table = CliRunner().invoke(main, ["inspect", str(tiny_build), "--device", "h100"])
    assert table.exit_code == 0, table.output
    assert "predicted on H100 SXM" in table.output and "vs fused baseline" in table.output and "map share" in table.output
    bad = CliRunner().invoke(main, ["flops", "tiny-sdxl", "--device", "v100"])
    assert bad.exit_code == 2
