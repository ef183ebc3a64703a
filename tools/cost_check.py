"""The cost model beside what was measured on an H200 (2026-11-30, docs/benchmarks.md): what its launch cost is fitted on.

    python tools/cost_check.py [--device h200] [--launch-us 0 4 11.5]
    python tools/cost_check.py --forms [--device h200]      # the kernels' map vs mapless form, by block size

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
from atedm_export.kernels import ops as kernel_ops  # noqa: E402
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


#: (label, tokens, channels, heads) of the blocks the two forms are priced at: SDXL's finest blocks at 1024², 1536²
#: and 2048² (10 heads of 64) and SD 1.5's at 1024² (8 heads of 40), at batch 2 and 37% kept.
FORM_BLOCKS = [("SDXL 1024², 64×64", 4096, 640, 10), ("SDXL 1536², 96×96", 9216, 640, 10),
               ("SDXL 2048², 128×128", 16384, 640, 10), ("SD 1.5 1024², 128×128", 16384, 320, 8)]


def forms_table(dev, batch: int = 2) -> Table:  # noqa: ANN001 - costmodel.Device
    """The map layer on its kernels in both forms (the head-mean map written once, or none: G-WPR as attention with
    swapped roles), priced at each of ``FORM_BLOCKS``, with the map's memory: where each form wins."""
    from diffusers.models.attention_processor import Attention

    from atedm_export.pruning.options import AtedmOptions

    opts = AtedmOptions(map_impl="kernels")
    table = Table(title=f"the map layer's kernels on {dev.name}, batch {batch}, fp16, 37% kept: ms per block")
    for column in ("block", "tokens", "map (fp32)", "map form", "mapless form", "the kernels take"):
        table.add_column(column, justify="left" if column == "block" else "right")
    limit = kernel_ops.MAP_BYTES_LIMIT
    for label, tokens, channels, heads in FORM_BLOCKS:
        with torch.device("meta"):
            attn = Attention(channels, heads=heads, dim_head=channels // heads).half()
        x = torch.empty(batch, tokens, channels, dtype=torch.float16, device="meta")
        side, keep = int(tokens**0.5), round(0.37 * tokens)
        times = []
        for bound in (1 << 62, 0):  # map form, then mapless
            kernel_ops.MAP_BYTES_LIMIT = bound
            try:
                times.append(predict(record_ops(lambda: map_layer(attn, x, keep, opts, (side, side))), dev).seconds * 1e3)
            finally:
                kernel_ops.MAP_BYTES_LIMIT = limit
        taken = "map" if kernel_ops.materializes(batch, tokens, tokens) else "mapless"
        table.add_row(label, f"{tokens}", f"{4 * batch * tokens * tokens / 2**30:.2f} GiB", f"{times[0]:.2f}",
                      f"{times[1]:.2f}", taken)
    table.caption = (f"the kernels write the map while it is at most {limit / 2**30:g} GiB (kernels/ops.py "
                     "MAP_BYTES_LIMIT); past it, no map")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="sdxl-base-1024")
    parser.add_argument("--device", default="h200")
    parser.add_argument("--launch-us", type=float, nargs="*", default=[GPU_LAUNCH_US])
    parser.add_argument("--forms", action="store_true", help="the kernels' map and mapless forms, by block size")
    args = parser.parse_args()
    if args.forms:
        Console(width=150).print(forms_table(device(args.device)))
        return
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
