"""The map layer's kernels against the explicit fp32 path: same kept tokens, same recovery sources?

    TRITON_INTERPRET=1 python tools/kernel_agreement.py            # the test shapes, in Triton's interpreter
    TRITON_INTERPRET=1 python tools/kernel_agreement.py --full     # SDXL's and SD 1.5's real block shapes (minutes)
    python tools/kernel_agreement.py --full --device cuda          # on a GPU, compiled

Both sides run the product's own code (``pruning/atedm.py``'s ``self_attention_map``, G-WPR, selection and
recovery) on the same fp16 projections of one attention layer, ``map_impl`` explicit vs kernels. Random weights
give near-uniform maps, on which any ranking looks alike, so the layer's query and key projections are scaled by
``--peak``; the head-mean map's row entropy (as a fraction of the uniform row's ``log N``) is printed beside each
result. A kept token or source that differs is *explained* when the two candidates' reference values lie within
the largest relative difference between the two paths' scores (or map entries): a tie within the accumulation's
rounding. Sharp maps make real ties: a row whose heads each attend to one token has several entries of exactly
``1/heads``, and rounding alone picks among them.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atedm_export.kernels import ops as kernel_ops  # noqa: E402
from atedm_export.pruning.atedm import map_scores, map_sources, select, self_attention_map  # noqa: E402
from atedm_export.pruning.options import AtedmOptions  # noqa: E402

#: (tokens, channels, heads): SDXL at 1024² (64×64 and 32×32 blocks) and SD 1.5 at 512² (its two finest levels)
FULL_SHAPES = [(4096, 640, 10), (1024, 1280, 20), (4096, 320, 8), (1024, 640, 8)]
#: The same head counts and head dims at fewer tokens (the interpreter's minutes become seconds); 300 and 200
#: leave remainders in every kernel's tiles, as SD 1.5's 768×768 blocks (2304 tokens) would not.
TEST_SHAPES = [(512, 640, 10), (256, 1280, 20), (300, 320, 8), (200, 640, 8)]


@dataclass(frozen=True)
class Agreement:
    tokens: int
    channels: int
    heads: int
    keep: int
    dtype: str
    form: str  # the kernels' form: map (written once) or mapless
    entropy: float  # the reference map's mean row entropy / log N
    output_error: float  # max |kernels − explicit| of the layer's output
    map_error: float  # max |A_kernels − A_explicit|
    map_rel_error: float  # max |A_kernels − A_explicit| / A_explicit over entries above 1e-30
    score_error: float  # max relative |s_kernels − s_explicit|
    boundary_gap: float  # relative gap between the k-th and (k+1)-th reference scores
    kept_differ: int  # kept tokens in one set and not the other (per batch item, summed)
    kept_unexplained: int
    sources_differ: int
    sources_unexplained: int
    sources_gap: float  # the largest relative |A[i, one's source] − A[i, the other's]| where they differ (0 if none)


def peaked_attention(channels: int, heads: int, peak: float, seed: int = 0) -> Attention:
    """A self-attention layer whose query and key projections are scaled by ``peak``: peaked maps."""
    torch.manual_seed(seed)
    attn = Attention(channels, heads=heads, dim_head=channels // heads).eval()
    with torch.no_grad():
        attn.to_q.weight.mul_(peak)
        attn.to_k.weight.mul_(peak)
    return attn


def _run(attn: Attention, x: torch.Tensor, keep: int, impl: str) -> tuple[torch.Tensor, ...]:
    opts = AtedmOptions(map_impl=impl)
    grid = (1, x.shape[1])
    out, self_map = self_attention_map(attn, x, opts, grid, impl)
    scores = map_scores(self_map, opts, grid)
    kept, slot_of = select(self_map, scores, keep, opts)
    attn_map = self_map.attn_map
    if attn_map is None:  # mapless: the map its kernels compute tile by tile, written here only to compare
        q, k, lse, scale = self_map.factors
        attn_map = torch.ops.atedm.head_mean_map(q, k, lse, scale)[0]
    return out, attn_map, scores, kept, map_sources(self_map, kept, slot_of, None)


def compare(tokens: int, channels: int, heads: int, keep_ratio: float = 0.37, peak: float = 6.0, batch: int = 2,
            dtype: torch.dtype = torch.float16, device: str = "cpu", seed: int = 0, mapless: bool = False) -> Agreement:
    """One layer at one shape through both paths (module docstring); ``mapless``: the kernels' form that writes
    no map (``kernels.ops.MAP_BYTES_LIMIT`` set to 0 for the call)."""
    attn = peaked_attention(channels, heads, peak, seed).to(device=device, dtype=dtype)
    x = torch.randn(batch, tokens, channels, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    keep = round(keep_ratio * tokens)
    with torch.no_grad():
        out_e, map_e, scores_e, kept_e, src_e = _run(attn, x, keep, "explicit")
        limit = kernel_ops.MAP_BYTES_LIMIT
        kernel_ops.MAP_BYTES_LIMIT = 0 if mapless else limit
        try:
            out_k, map_k, scores_k, kept_k, src_k = _run(attn, x, keep, "kernels")
        finally:
            kernel_ops.MAP_BYTES_LIMIT = limit
    entropy = -(map_e * map_e.clamp_min(1e-30).log()).sum(-1).mean().item() / math.log(tokens)
    score_error = ((scores_k - scores_e).abs() / scores_e.abs().clamp_min(1e-30)).max().item()
    map_error = (map_k - map_e).abs().max().item()
    relative = (map_k - map_e).abs() / map_e.clamp_min(1e-30)
    map_rel_error = relative.where(map_e > 1e-30, torch.zeros((), device=relative.device)).max().item()
    ordered = scores_e.sort(dim=1, descending=True).values
    boundary_gap = ((ordered[:, keep - 1] - ordered[:, keep]) / ordered[:, keep - 1]).min().item() if keep < tokens else 1.0
    kept_differ = kept_unexplained = sources_differ = sources_unexplained = 0
    sources_gap = 0.0
    for b in range(batch):
        mine, theirs = set(kept_k[b].tolist()), set(kept_e[b].tolist())
        threshold = ordered[b, keep - 1].item()
        for token in mine ^ theirs:
            kept_differ += 1
            kept_unexplained += abs(scores_e[b, token].item() - threshold) > 2 * score_error * abs(threshold)
        if mine != theirs:
            continue  # sources index different kept sets: compared only where the sets agree
        token_k, token_e = kept_k[b][src_k[b]], kept_e[b][src_e[b]]  # the token each position copies
        for i in torch.nonzero(token_k != token_e).flatten().tolist():
            sources_differ += 1
            mine, theirs = map_e[b, i, token_k[i]].item(), map_e[b, i, token_e[i]].item()
            gap = abs(mine - theirs) / max(mine, theirs, 1e-30)
            sources_unexplained += gap > 2 * map_rel_error
            sources_gap = max(sources_gap, gap)
    return Agreement(tokens, channels, heads, keep, str(dtype).replace("torch.", ""), "mapless" if mapless else "map", entropy,
                     (out_k.float() - out_e.float()).abs().max().item(), map_error, map_rel_error, score_error, boundary_gap,
                     kept_differ, kept_unexplained, sources_differ, sources_unexplained, sources_gap)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the real block shapes (minutes in the interpreter)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--peak", type=float, default=6.0)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--mapless", action="store_true", help="the kernels' form that writes no map")
    args = parser.parse_args()
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    print("| tokens | channels | heads | keep | dtype | form | row entropy / log N | output err | map err (rel) | score rel err | "
          "boundary gap | kept differ (unexplained) | sources differ of B·N (unexplained) | their largest rel gap |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    bad = 0
    for shape in FULL_SHAPES if args.full else TEST_SHAPES:
        r = compare(*shape, peak=args.peak, batch=args.batch, dtype=dtype, device=args.device, mapless=args.mapless)
        bad += r.kept_unexplained + r.sources_unexplained
        print(f"| {r.tokens} | {r.channels} | {r.heads} | {r.keep} | {r.dtype} | {r.form} | {r.entropy:.3f} | {r.output_error:.1e} | "
              f"{r.map_error:.1e} ({r.map_rel_error:.0e}) | {r.score_error:.1e} | {r.boundary_gap:.1e} | {r.kept_differ} ({r.kept_unexplained}) | "
              f"{r.sources_differ} of {args.batch * r.tokens} ({r.sources_unexplained}) | {r.sources_gap:.1e} |", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
