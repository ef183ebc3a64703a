"""The cost model beside what was measured on an H200 (2026-11-30, docs/benchmarks.md): what its launch cost is fitted on.

    python tools/cost_check.py [--device h200] [--launch-us 0 4 11.5]

SDXL base at 1024², batch 2, fp16 (``sdxl-base-1024``, ``paper`` schedule): the stock UNet and each DSAP stage
(measured replayed from a CUDA graph), and the map layer alone at each pruned block shape beside the stock
self-attention it replaces (measured eagerly: ``tools/gpu_bench.py`` times those two without a CUDA graph, so
where their ops are small the CPU's dispatch sets the pace, not the GPU). Each is recorded on the ``meta``
device and priced with each ``--launch-us`` (the model's own, ``costmodel.GPU_LAUNCH_US``, where none is
given); the kernels form of the map layer (``map_impl: kernels``), never measured, stands beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atedm_export.costmodel import GPU_LAUNCH_US, OpCost, device, predict, record_ops  # noqa: E402
from atedm_export.dsap import stage_plan  # noqa: E402
from atedm_export.flops import graph_ops, spec_blocks, with_map_impl  # noqa: E402
from atedm_export.models import build_unet, unet_config  # noqa: E402
from atedm_export.pruning.atedm import map_layer  # noqa: E402
from atedm_export.spec import load_spec  # noqa: E402

#: ms per call on the H200, tools/gpu_bench.py of 2026-11-30 (docs/benchmarks.md, "H200, eager PyTorch").
MEASURED = {"stock UNet": 41.6, "early stage": 55.0, "main stage": 64.3,
            "map layer, 4096 tokens": 6.1, "SDPA self-attention, 4096 tokens": 0.4,
            "map layer, 1024 tokens": 2.5, "SDPA self-attention, 1024 tokens": 0.2}


def recorded(spec) -> dict[str, tuple[list[OpCost], list[OpCost] | None]]:  # noqa: ANN001 - spec.GraphSpec
    """Each measured figure's ops: (as measured, i.e. the map layer explicit; with the map layer on its kernels)."""
    unet = build_unet(unet_config(spec.model), dtype=spec.dtype, device="meta")
    contract = spec.contract(dict(unet.config))
    blocks = spec_blocks(spec, unet)
    explicit, kernels = (with_map_impl(spec.pruning, impl) for impl in ("explicit", "kernels"))
    ops = {"stock UNet": (graph_ops(unet, contract, None), None)}
    for stage in spec.dsap.stages:
        ops[f"{stage.name} stage"] = tuple(graph_ops(unet, contract, stage_plan(stage, blocks, o)) for o in (explicit, kernels))
    main = stage_plan(next(s for s in spec.dsap.stages if s.name == "main"), blocks, explicit)
    shapes = {(b.tokens, main.keep[b.name]): b for b in blocks if b.name in main.keep}
    for (tokens, keep), block in sorted(shapes.items(), reverse=True):
        attn = unet.get_submodule(block.name).transformer_blocks[0].attn1
        x = torch.empty(spec.batch, tokens, attn.to_q.in_features, dtype=spec.dtype, device="meta")
        side = int(tokens**0.5)
        ops[f"map layer, {tokens} tokens"] = tuple(record_ops(lambda o=o: map_layer(attn, x, keep, o, (side, side)))
                                                   for o in (explicit, kernels))
        ops[f"SDPA self-attention, {tokens} tokens"] = (record_ops(lambda: attn(x)), None)
    return ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="sdxl-base-1024")
    parser.add_argument("--device", default="h200")
    parser.add_argument("--launch-us", type=float, nargs="*", default=[GPU_LAUNCH_US])
    args = parser.parse_args()
    spec = load_spec(args.spec)
    ops = recorded(spec)
    base = device(args.device)
    table = Table(title=f"{spec.name} on {base.name}: predicted vs measured, ms per call")
    for column in ("what", "ops", "measured", *(f"{us:g} µs" for us in args.launch_us), "map kernels"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for what, (measured_ops, kernel_ops) in ops.items():
        devices = [dataclasses.replace(base, launch_us=us) for us in args.launch_us]
        kernels = f"{predict(kernel_ops, devices[-1]).seconds * 1e3:.2f}" if kernel_ops else "-"
        table.add_row(what, f"{len(measured_ops)}", f"{MEASURED.get(what, float('nan')):.1f}",
                      *(f"{predict(measured_ops, d).seconds * 1e3:.2f}" for d in devices), kernels)
    table.caption = "ops: recorded as measured (a launch each; the map layer's kernels 1-3); µs: the launch cost " \
                    "priced with; map kernels: map_impl 'kernels' at the last launch cost (never measured)"
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
