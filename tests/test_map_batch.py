"""``map_batch``: the explicit map layer's per-head maps one head at a time (``head``) or in one batched product
(``all``), the portable form's two shapes.

Both must be the same method: the same map, output, kept tokens and recovery sources, in eager PyTorch and in
the exported graph onnxruntime runs. The layer's query and key projections are scaled by ``PEAK`` so the maps are
peaked (row entropy asserted under 0.6 of ``log N``) and the ranking matters.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from click.testing import CliRunner

from atedm_export.cli import main
from atedm_export.pruning import AtedmOptions, StagePlan, apply_pruning
from atedm_export.pruning import attention
from atedm_export.pruning.attention import attention_with_map
from atedm_export.pruning.gwpr import gwpr_scores
from atedm_export.pruning.recover import recovery_sources
from atedm_export.pruning.select import select_tokens
from atedm_export.spec import load_spec

from .conftest import peaked_block, run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from kernel_agreement import peaked_attention  # noqa: E402 - the same peaked layer the kernels are compared on

PEAK = 6.0


@pytest.mark.parametrize("heads_at_once", ["all", 3])
@pytest.mark.parametrize(("tokens", "channels", "heads"), [(1024, 1280, 20)])
def test_all_heads_at_once_keep_the_one_head_at_a_time_tokens_and_sources(tokens, channels, heads, heads_at_once,
                                                                          monkeypatch):
    """SDXL's 32×32 blocks (20 heads, where the two differ most): the map and output equal to rounding (the mean
    and the batched product sum in another order: 2.8e-07 relative at most, measured), the same kept tokens and
    sources, every variant; also where the maps pass ``MAP_BATCH_BYTES`` and go in groups (here of 3 heads). The
    other block shapes take seconds each: ``python tools/map_agreement.py`` compares them (docs/build.md)."""
    if heads_at_once != "all":
        monkeypatch.setattr(attention, "MAP_BATCH_BYTES", heads_at_once * tokens * tokens * 4)
    attn = peaked_attention(channels, heads, PEAK)
    x = torch.randn(1, tokens, channels, generator=torch.Generator().manual_seed(1))
    keep = round(0.37 * tokens)
    with torch.no_grad():
        for reduce in ("mean", "max"):
            for output in ("reuse", "fused"):
                want_out, want_map = attention_with_map(attn, x, heads=reduce, map_output=output, batch="head")
                out, got_map = attention_with_map(attn, x, heads=reduce, map_output=output, batch="all")
                torch.testing.assert_close(got_map, want_map, atol=1e-9, rtol=1e-6)
                torch.testing.assert_close(out, want_out, atol=2e-6, rtol=1e-5)
        entropy = -(want_map * want_map.clamp_min(1e-30).log()).sum(-1).mean().item() / math.log(tokens)
        assert entropy < 0.6, f"maps not peaked enough: row entropy {entropy:.2f} of log N"
        kept = select_tokens(gwpr_scores(got_map), keep)
        assert torch.equal(kept, select_tokens(gwpr_scores(want_map), keep))
        assert torch.equal(recovery_sources(got_map, kept), recovery_sources(want_map, kept))


def test_the_pruned_unet_gives_the_same_output_either_way(tiny_unet, tiny_blocks, tiny_inputs):
    keep = {b.name: round(0.37 * b.tokens) for b in tiny_blocks}
    want = run(apply_pruning(tiny_unet, StagePlan(keep, AtedmOptions(map_impl="explicit"))), tiny_inputs)
    got = run(apply_pruning(tiny_unet, StagePlan(keep, AtedmOptions(map_impl="explicit", map_batch="all"))),
              tiny_inputs)
    assert torch.equal(got, want)


def _exported(unet: torch.nn.Module, batch: str, path: Path) -> tuple[onnx.ModelProto, torch.Tensor, list]:
    """``conftest.peaked_block`` with ``map_batch`` ``batch`` exported as the build exports (TorchScript); with its
    eager output and its inputs."""
    graph, height, width = peaked_block(unet, AtedmOptions(map_impl="explicit", map_batch=batch), PEAK)
    gen = torch.Generator().manual_seed(0)
    feed = [torch.randn(2, graph.block.in_channels, height, width, generator=gen), torch.randn(2, 77, 64, generator=gen)]
    with torch.no_grad():
        eager = graph(*feed)
        torch.onnx.export(graph, tuple(feed), str(path), dynamo=False, input_names=["hidden", "context"],
                          output_names=["out"], opset_version=18)
    return onnx.load(str(path)), eager, feed


def test_the_exported_batched_form_has_fewer_nodes_and_runs_as_eager(tiny_dir, tmp_path):
    from atedm_export.models import load_unet

    counts, outputs = {}, {}
    for batch in ("head", "all"):
        model, eager, feed = _exported(load_unet(str(tiny_dir)), batch, tmp_path / f"{batch}.onnx")
        counts[batch] = len(model.graph.node)
        session = onnxruntime.InferenceSession(str(tmp_path / f"{batch}.onnx"), providers=["CPUExecutionProvider"])
        outputs[batch] = session.run(None, {"hidden": feed[0].numpy(), "context": feed[1].numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(outputs[batch]), eager, atol=1e-5, rtol=1e-4)
    assert counts["all"] < counts["head"], counts
    torch.testing.assert_close(torch.from_numpy(outputs["all"]), torch.from_numpy(outputs["head"]),
                               atol=1e-5, rtol=1e-4)


def test_map_batch_is_a_command_line_override_of_the_spec():
    assert load_spec("tiny-sdxl").with_map_batch("all").pruning.map_batch == "all"
    assert load_spec("tiny-sdxl").with_map_batch(None).pruning.map_batch == "head"
    runner = CliRunner()
    refused = runner.invoke(main, ["flops", "tiny-sdxl-tome", "--map-batch", "all"])
    assert refused.exit_code != 0 and "--map-batch is an AT-EDM option" in refused.output
    assert AtedmOptions(map_batch="all").model_dump()["map_batch"] == "all"  # what a manifest records
    with pytest.raises(ValueError):
        AtedmOptions(map_batch="some")
