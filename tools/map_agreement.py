"""How far the approximate map layers stray from exact G-WPR: kept-set overlap and recovered-output error.

    python tools/map_agreement.py [--peak 6] [--keep 0.37] [--inputs random|smooth]

At each block shape of SDXL at 1024² and SD 1.5 at 512², one real ``Attention`` (random weights, seed 0)
with its query and key projections scaled by ``--peak`` so the maps are peaked (random weights give
near-uniform maps, on which any ranking looks alike; the row entropy of each map is printed as a
fraction of the uniform row's ``log N``). Each variant's kept set is compared with exact G-WPR's
(overlap = shared tokens / k), and the layer's output after selection and copy recovery with the exact
one's (relative L2 error). ``--inputs smooth`` feeds spatially correlated tokens (a random 1/8-resolution
grid, bilinearly upsampled, plus 30% noise), closer to a UNet's features than i.i.d. tokens, where any
two tokens are unrelated and a copy from another source is as far off as a random one. ``exact, heads
batched`` is ``map_batch: all`` (every head's map in one product), the same method in another order of sums. The cost model's predicted schedule speedup on an H100 (sdxl-base-1024,
``paper``) stands beside each variant.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atedm_export.costmodel import DEVICES  # noqa: E402
from atedm_export.flops import flops_report  # noqa: E402
from atedm_export.pruning.attention import attention_with_map  # noqa: E402
from atedm_export.pruning.gwpr import gwpr_scores, pooled_gwpr_scores  # noqa: E402
from atedm_export.pruning.atedm import _map_rows  # noqa: E402
from atedm_export.pruning.recover import copy_recover, recovery_sources  # noqa: E402
from atedm_export.pruning.select import gather_tokens, select_tokens  # noqa: E402
from atedm_export.spec import load_spec  # noqa: E402

# (grid side, channels, heads): SDXL 1024² (64×64, 32×32), SD 1.5 512² (64×64, 32×32)
SHAPES = [("SDXL 64x64", 64, 640, 10), ("SDXL 32x32", 32, 1280, 20), ("SD1.5 64x64", 64, 320, 8),
          ("SD1.5 32x32", 32, 640, 8)]
#: Each variant as (map_pool, map_output, map_batch).
VARIANTS = {"exact (reuse)": (1, "reuse", "head"), "exact (fused)": (1, "fused", "head"),
            "exact, heads batched": (1, "reuse", "all"), "exact (fused), heads batched": (1, "fused", "all"),
            "pooled 2x2": (2, "fused", "head"),
            "pooled 4x4": (4, "fused", "head")}


def run_layer(attn: Attention, x: torch.Tensor, side: int, keep: int, pool: int, output: str,  # noqa: ANN201
              batch: str = "head"):
    grid = (side, side)
    out, amap = attention_with_map(attn, x, map_output=output, pool=pool, grid=grid, batch=batch)
    scores = gwpr_scores(amap) if pool == 1 else pooled_gwpr_scores(amap, grid, pool)
    kept = select_tokens(scores, keep)
    recovered = copy_recover(gather_tokens(out, kept), recovery_sources(amap, kept, _map_rows(grid, pool, x.device)))
    return amap, kept, recovered


def tokens_for(side: int, channels: int, inputs: str) -> torch.Tensor:
    """``[1, side², channels]`` tokens: i.i.d. normal, or a smooth field plus noise (module docstring)."""
    gen = torch.Generator().manual_seed(1)
    if inputs == "random":
        return torch.randn(1, side * side, channels, generator=gen)
    coarse = torch.randn(1, channels, side // 8, side // 8, generator=gen)
    field = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
    field = field / field.std() + 0.3 * torch.randn(1, channels, side, side, generator=gen)
    return field.flatten(2).transpose(1, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peak", type=float, default=6.0)
    parser.add_argument("--keep", type=float, default=0.37)
    parser.add_argument("--inputs", choices=("random", "smooth"), default="random")
    args = parser.parse_args()
    spec = load_spec("sdxl-base-1024")
    table = Table(title=f"approximate map layers vs exact G-WPR ({args.inputs} tokens, queries/keys x{args.peak}, "
                        f"keep {args.keep:.0%})")
    for column in ("block", "row entropy", "variant", "kept overlap", "output rel. error", "H100 schedule (paper)"):
        table.add_column(column, justify="left" if column in ("block", "variant") else "right")
    predicted = {}
    for name, (pool, output, batch) in VARIANTS.items():
        pruning = spec.pruning.model_copy(update={"map_pool": pool, "map_output": output, "map_batch": batch})
        report = flops_report(spec.model_copy(update={"pruning": pruning}), (DEVICES["h100"],))
        predicted[name] = report.predictions[0].schedule_speedup
    for label, side, channels, heads in SHAPES:
        torch.manual_seed(0)
        attn = Attention(channels, heads=heads, dim_head=channels // heads).eval()
        with torch.no_grad():
            attn.to_q.weight.mul_(args.peak)
            attn.to_k.weight.mul_(args.peak)
            x = tokens_for(side, channels, args.inputs)
            keep = round(args.keep * side * side)
            exact_map, exact_kept, exact_out = run_layer(attn, x, side, keep, 1, "reuse")
            entropy = -(exact_map * exact_map.clamp_min(1e-30).log()).sum(-1).mean().item() / math.log(side * side)
            want = set(exact_kept[0].tolist())
            for name, (pool, output, batch) in VARIANTS.items():
                _, kept, out = run_layer(attn, x, side, keep, pool, output, batch)
                overlap = len(want & set(kept[0].tolist())) / keep
                error = ((out - exact_out).norm() / exact_out.norm()).item()
                table.add_row(label, f"{entropy:.2f}", name, f"{overlap:.1%}", f"{error:.2e}", f"{predicted[name]:.2f}×")
        table.add_section()
    Console(width=140).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
