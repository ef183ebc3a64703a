"""The map layer's exact variants keep what the explicit path keeps, at the real block shapes.

The explicit path is the method as written: every head's fp32 map at once (``[B, heads, N, N]``), their
mean, G-WPR, rank selection, recovery by argmax over the kept columns. The variants build the map one
head at a time, take the output from each head's map (``reuse``) or from the fused attention (``fused``),
and select by ``TopK`` or by rank. Random weights give near-uniform maps, on which any ranking looks
alike, so the first layer's query and key projections are scaled by ``PEAK`` until the maps are
peaked: at the shapes below the head-mean map's row entropy is 0.33-0.51 of the uniform row's ``log N`` (asserted
under 0.6), and the G-WPR scores are far from tied.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention

from atedm_export.pruning.attention import attention_with_map
from atedm_export.pruning.gwpr import gwpr_scores
from atedm_export.pruning.recover import recovery_sources
from atedm_export.pruning.select import TOPK_LIMIT, keep_indices, select_tokens, topk_keep_indices

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from kernel_agreement import peaked_attention  # noqa: E402 - the same peaked layer the kernels are compared on

PEAK = 6.0
# (tokens, channels, heads): SDXL at 1024² (64×64 and 32×32 blocks), SD 1.5 at 512² (its two finest levels)
SHAPES = [(4096, 640, 10), (1024, 1280, 20), (4096, 320, 8), (1024, 640, 8)]


def _explicit(attn: Attention, x: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference: all heads' maps at once, mean, G-WPR, rank selection, recovery; the stock output."""
    batch, tokens, _ = x.shape
    q = attn.to_q(x).view(batch, tokens, attn.heads, -1).transpose(1, 2)
    k = attn.to_k(x).view(batch, tokens, attn.heads, -1).transpose(1, 2)
    probs = ((q * attn.scale) @ k.transpose(-1, -2)).softmax(-1)
    mean = probs.mean(dim=1)
    kept = keep_indices(gwpr_scores(mean), keep)
    return attn(x), kept, kept.gather(1, recovery_sources(mean, kept))


@pytest.mark.parametrize(("tokens", "channels", "heads"), SHAPES)
def test_exact_variants_keep_the_explicit_paths_tokens_and_sources(tokens, channels, heads):
    attn = peaked_attention(channels, heads, PEAK)
    x = torch.randn(1, tokens, channels, generator=torch.Generator().manual_seed(1))
    keep = round(0.37 * tokens)
    with torch.no_grad():
        want_out, want_kept, want_sources = _explicit(attn, x, keep)
        for output in ("reuse", "fused"):
            out, mean = attention_with_map(attn, x, map_output=output)
            entropy = -(mean * mean.clamp_min(1e-30).log()).sum(-1).mean().item() / math.log(tokens)
            assert entropy < 0.6, f"maps not peaked enough: row entropy {entropy:.2f} of log N"
            torch.testing.assert_close(out, want_out, atol=1e-4, rtol=1e-4)
            scores = gwpr_scores(mean)
            for how in ("topk", "rank"):
                kept = select_tokens(scores, keep, how)
                assert sorted(kept[0].tolist()) == sorted(want_kept[0].tolist()), (output, how)
                sources = kept.gather(1, recovery_sources(mean, kept))
                assert torch.equal(sources, want_sources), (output, how)


def test_topk_and_rank_selection_keep_the_same_tokens_ties_included():
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        tokens = int(torch.randint(2, 300, (1,), generator=gen))
        keep = int(torch.randint(1, tokens + 1, (1,), generator=gen))
        levels = int(torch.randint(1, 6, (1,), generator=gen))  # few distinct values: ties at the boundary
        scores = torch.randint(0, levels, (3, tokens), generator=gen).float() / levels
        want = keep_indices(scores, keep).sort(dim=1).values
        got = topk_keep_indices(scores, keep)
        assert torch.equal(got, want), (trial, tokens, keep)  # and in index order


def test_auto_selection_takes_topk_up_to_tensorrts_limit():
    scores = torch.rand(1, 4096)
    assert torch.equal(select_tokens(scores, TOPK_LIMIT), topk_keep_indices(scores, TOPK_LIMIT))
    assert torch.equal(select_tokens(scores, TOPK_LIMIT + 1), keep_indices(scores, TOPK_LIMIT + 1))
    with pytest.raises(ValueError, match="3840"):
        topk_keep_indices(scores, TOPK_LIMIT + 1)


def test_pooled_walk_with_pool_one_is_gwpr():
    from atedm_export.pruning.gwpr import pooled_gwpr_scores

    attn = torch.rand(2, 64, 64).softmax(-1)
    for damping in (1.0, 0.85):
        torch.testing.assert_close(pooled_gwpr_scores(attn, (8, 8), 1, 5, damping), gwpr_scores(attn, 5, damping))


def test_pooled_map_runs_in_a_unet_and_is_refused_where_it_cannot_hold(tiny_unet, tiny_blocks, tiny_inputs):
    from atedm_export.errors import PlanError
    from atedm_export.pruning import AtedmOptions, StagePlan, apply_pruning

    from .conftest import run

    plan = StagePlan({b.name: round(0.37 * b.tokens) for b in tiny_blocks}, AtedmOptions(map_pool=2))
    assert plan.options.map_output == "fused"  # a pooled map has no row per query to take the output from
    out = run(apply_pruning(tiny_unet, plan), tiny_inputs)
    assert torch.isfinite(out).all()
    with pytest.raises(PlanError, match="map_pool > 1 needs map_output 'fused'"):
        AtedmOptions(map_pool=2, map_output="reuse")
    with pytest.raises(PlanError, match="map_pool must be 1, 2 or 4"):
        AtedmOptions(map_pool=3)
