"""ToMe beside AT-EDM: the static form equals tomesd, exports, verifies, builds engines and is counted from its graphs.

tomesd 0.1.3 runs with its randomness off (``use_rand=False``: destinations at the top-left of each 2x2 cell),
patching the same UNet our patch runs on; both see identical inputs, so the outputs must agree to float
rounding. The matching reads cosine similarities of the layers' inputs, not attention maps, so random
weights give distinct similarities (no near-ties to flip a match).
"""

from __future__ import annotations

import pytest
import torch

from atedm_export.buildfolder import first_view
from atedm_export.contract import GraphContract
from atedm_export.dsap import Stage, stage_plan
from atedm_export.errors import PlanError, SpecError
from atedm_export.models import attention_blocks, load_unet
from atedm_export.pruning import StagePlan, ToMeOptions, apply_pruning, parse_options, remove_pruning
from atedm_export.pruning.tome import bipartite_merge, partition
from atedm_export.spec import parse_spec

from .conftest import TOME_SPEC, run

tomesd = pytest.importorskip("tomesd", reason="tomesd (the reference ToMe) is not installed: pip install tomesd==0.1.3")

MERGES = [
    {},  # tomesd's defaults: the self-attention only
    {"merge_crossattn": True, "merge_mlp": True},  # every sublayer
]


def _tomesd_output(unet, inputs, ratio: float, merges: dict) -> torch.Tensor:
    """tomesd's own patch, randomness off, on every block (max_downsample 8)."""
    sample = inputs["sample"]
    rest = {k: v for k, v in inputs.items() if k != "sample"}
    tomesd.apply_patch(unet, ratio=ratio, max_downsample=8, sx=2, sy=2, use_rand=False, **merges)
    try:
        with torch.no_grad():
            return unet(sample, **rest).sample  # tomesd's hook reads the sample's size from the positional argument
    finally:
        tomesd.remove_patch(unet)


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
@pytest.mark.parametrize("merges", MERGES, ids=["attn", "all"])
def test_static_tome_equals_tomesd(model, merges):
    unet = load_unet(model, seed=0).eval()
    blocks = attention_blocks(unet, 256, 256)
    contract = GraphContract.from_config(dict(unet.config), 2, 256, 256)
    inputs = contract.unet_kwargs(contract.example_feed(seed=1))
    ratio = 0.5
    reference = _tomesd_output(unet, inputs, ratio, merges)
    stock = run(unet, inputs)
    # tomesd merges r = int(N · ratio) tokens per layer: the same r is N − keep here.
    plan = StagePlan({b.name: b.tokens - int(b.tokens * ratio) for b in blocks}, ToMeOptions(method="tome", **merges),
                     {b.name: b.tokens for b in blocks})
    ours = run(apply_pruning(unet, plan), inputs)
    remove_pruning(unet)
    assert (reference - stock).abs().max() > 1e-2  # tomesd did merge: the comparison is not stock against stock
    assert (ours - reference).abs().max() < 1e-5


@pytest.mark.parametrize("r", [5, 12], ids=["some", "every-source"])
def test_merge_and_unmerge_by_hand(r):
    """A 4x4 grid at stride 2: destinations are the cells' top-left tokens; a merged source takes its
    destination's value on unmerge, and the destination holds the mean of itself and its sources (with every
    source merged, only the destinations are left)."""
    dests, sources = partition((4, 4), 2)
    assert dests.tolist() == [0, 2, 8, 10]
    assert len(sources) == 12 and not set(dests.tolist()) & set(sources.tolist())
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8)
    merge = bipartite_merge(x, (4, 4), 2, r=r)
    merged = merge.reduce(x)
    assert merged.shape == (2, 16 - r, 8)
    restored = merge.restore(merged)
    for b in range(2):
        for slot, target in zip(merge.merged[b].tolist(), merge.into[b].tolist()):
            token, dest = int(sources[slot]), int(dests[target])
            assert torch.equal(restored[b, token], restored[b, dest])
            joined = [int(sources[s]) for s, t in zip(merge.merged[b].tolist(), merge.into[b].tolist()) if t == target]
            assert torch.allclose(restored[b, dest], x[b, [dest, *joined]].mean(0), atol=1e-6)
        for slot in merge.unmerged[b].tolist():
            assert torch.equal(restored[b, int(sources[slot])], x[b, int(sources[slot])])


def test_tome_options_and_plans_are_checked_before_any_work(tiny_blocks):
    assert parse_options({}).method == "atedm"
    assert parse_options({"method": "tome"}).merge_attn is True
    with pytest.raises(PlanError, match="at least one of merge_attn"):
        parse_options({"method": "tome", "merge_attn": False})
    # 16x16 blocks at stride 2 leave at least 64 destination tokens: a keep ratio of 0.2 is too few.
    with pytest.raises(PlanError, match=r"tome keeps at least 64 of down_blocks.1.attentions.0's 256 tokens"):
        stage_plan(Stage(name="main", until=1.0, keep=0.2), tiny_blocks, ToMeOptions(method="tome"))
    spec = dict(TOME_SPEC)
    assert parse_spec(spec).method == "tome" and parse_spec({**spec, "method": "atedm"}).method == "atedm"
    with pytest.raises(SpecError, match="unknown key 'pruning.iterations'"):
        parse_spec({**spec, "pruning": {"iterations": 3}})  # an AT-EDM option in a ToMe spec
    with pytest.raises(SpecError, match="method must be one of: atedm, tome"):
        parse_spec({**spec, "method": "tomesd"})
    with pytest.raises(SpecError, match="give the method once"):
        parse_spec({**spec, "pruning": {"method": "atedm"}})
    with pytest.raises(SpecError, match="--prune-point is an AT-EDM option"):
        parse_spec(spec).with_prune_point("layer")


def test_tome_build_verifies_and_counts_its_flops_from_the_graphs(tiny_tome_build):
    from atedm_export.flops import flops_report
    from atedm_export.buildfolder import read_manifest
    from atedm_export.verify import verify_build

    manifest = read_manifest(tiny_tome_build)
    assert first_view(manifest).graph_spec.method == "tome"
    checks = verify_build(tiny_tome_build)
    assert checks and all(c.passed for c in checks), [c.to_json() for c in checks]
    # The graph's MatMul/Gemm/Conv count (recorded at build) agrees with the patched module's count.
    report = flops_report(first_view(manifest).graph_spec)
    stage = first_view(manifest).stages[0]
    assert report.method == "tome"
    assert stage.graph_tflops == pytest.approx(report.stages[0].tflops, rel=0.02)
    assert stage.graph_tflops < first_view(manifest).baseline.graph_tflops
    # inspect names the method; ToMe's attentions are all stock (on merged tokens): no map layer, all fusable.
    import json

    from click.testing import CliRunner

    from atedm_export.cli import main

    shown = CliRunner().invoke(main, ["inspect", str(tiny_tome_build), "--json"])
    data = json.loads(shown.output)
    assert data["method"] == "tome" and data["spec"]["pruning"]["method"] == "tome"
    assert data["attention"]["main"]["map"] == 0
    assert data["attention"]["main"]["fusable"] == data["attention"]["baseline"]["fusable"]
    table = CliRunner().invoke(main, ["inspect", str(tiny_tome_build)])
    assert "method 'tome'" in table.output


@pytest.mark.slow
def test_tome_and_atedm_at_the_same_budget_on_sdxl_1024():
    """The built-in ToMe spec is set to the AT-EDM spec's FLOPs (the paper's comparison is at equal FLOPs)."""
    from atedm_export.flops import flops_report
    from atedm_export.spec import load_spec

    atedm, tome = (flops_report(load_spec(name)) for name in ("sdxl-base-1024", "sdxl-base-1024-tome"))
    assert tome.method == "tome" and atedm.method == "atedm"
    assert tome.schedule_tflops == pytest.approx(atedm.schedule_tflops, rel=0.01)


@pytest.mark.slow
def test_tome_graphs_build_with_tensorrt_rtx(tmp_path):
    """TensorRT-RTX's real parser and builder take the ToMe graphs (its ScatterElements takes no reduction:
    the merge is a one-hot product)."""
    from .conftest import HAS_RTX

    if not HAS_RTX:
        pytest.skip("TensorRT-RTX (tensorrt-rtx-cu13-bindings) not installed")
    from atedm_export.build import BuildRequest, build

    manifest = build(BuildRequest(parse_spec(dict(TOME_SPEC)), tmp_path / "b", library="tensorrt-rtx", targets=("sm89",)))
    assert all(g.engine is not None for g in first_view(manifest).graphs())
