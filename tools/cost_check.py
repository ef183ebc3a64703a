"""The cost model beside what was measured on an H200 (2026-11-30, docs/benchmarks.md): what its launch cost is fitted on.

    python tools/cost_check.py [--device h200] [--launch-us 0 4 11.5]
    python tools/cost_check.py --forms [--device h200]      # the kernels' map vs mapless form, by block size
    python tools/cost_check.py --fit [--measured gpu-check-out/gpu-bench.json]   # what the measurements pin down

SDXL base at 1024², batch 2, fp16 (``sdxl-base-1024``, ``paper`` schedule): the stock UNet and each DSAP stage
(measured replayed from a CUDA graph), and the map layer alone at each pruned block shape beside the stock
self-attention it replaces (measured eagerly: ``tools/gpu_bench.py`` times those two without a CUDA graph, so
where their ops are small the CPU's dispatch sets the pace, not the GPU). Each is recorded on the ``meta``
device and priced with each ``--launch-us`` (the model's own, ``costmodel.GPU_LAUNCH_US``, where none is
given); the kernels form of the map layer (``map_impl: kernels``), never measured, stands beside it.

``--fit`` asks how much of what the roofline misses is per kernel and how much per FLOP or byte: each UNet call
measured replayed is priced as ``a · roofline + b · kernels`` for roofline factors ``a`` from 1 up (``b`` fitted on
the stock UNet, as the model's own 11.5 µs is at ``a = 1``), and by least squares on every measured call (``a`` ≥ 1,
``b`` ≥ 0). Each row gives its error on every measured call and what it predicts for the kernels' main stage and
schedule. ``--measured`` reads a ``tools/gpu_bench.py`` report instead of the 2026-11-30 figures: its ``stages``
part, where the kernels' own stages pin ``a`` down.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atedm_export.costmodel import GPU_LAUNCH_US, OpCost, device, entry_for, predict, record_ops  # noqa: E402
from atedm_export.kernels import ops as kernel_ops  # noqa: E402
from atedm_export.dsap import stage_plan  # noqa: E402
from atedm_export.errors import AtedmError  # noqa: E402
from atedm_export.flops import graph_ops, spec_blocks, with_map_impl  # noqa: E402
from atedm_export.models import build_unet, unet_config  # noqa: E402
from atedm_export.pruning.atedm import map_layer  # noqa: E402
from atedm_export.spec import load_spec  # noqa: E402

#: ms per call on the H200, tools/gpu_bench.py of 2026-11-30 (docs/benchmarks.md, "H200, eager PyTorch").
MEASURED = {"stock UNet": 41.6, "early stage": 55.0, "main stage": 64.3,
            "map layer, 4096 tokens": 6.1, "SDPA self-attention, 4096 tokens": 0.4,
            "map layer, 1024 tokens": 2.5, "SDPA self-attention, 1024 tokens": 0.2}


class MetaUNet:
    """A spec's UNet on the ``meta`` device: the ops of the stock call and of any schedule's stage in either form."""

    def __init__(self, spec) -> None:  # noqa: ANN001 - spec.GraphSpec
        self.spec = spec
        self.unet = build_unet(unet_config(spec.model), dtype=spec.dtype, device="meta")
        self.contract = spec.contract(dict(self.unet.config))
        self.blocks = spec_blocks(spec, self.unet)

    def stock(self) -> list[OpCost]:
        return graph_ops(self.unet, self.contract, None)

    def stage(self, stage, impl: str) -> list[OpCost]:  # noqa: ANN001 - dsap.Stage
        """``stage`` (of any schedule of this spec) with the map layer run as ``impl`` (explicit, kernels)."""
        options = with_map_impl(self.spec.pruning, impl)
        if options is None:
            raise SystemExit(f"cost_check: {self.spec.name} has no map layer the kernels compute; expected an AT-EDM "
                             "spec with heads 'mean' and no map pooling")
        return graph_ops(self.unet, self.contract, stage_plan(stage, self.blocks, options))

    def map_layer_free(self, stage) -> list[OpCost]:  # noqa: ANN001 - dsap.Stage
        """``stage`` as if its map layer cost nothing beyond the stock self-attention it replaces: the kernels form
        without the map layer's ops, plus each pruned block's stock self-attention (SDPA, with its projections).
        No map-layer implementation can be priced below it."""
        ops = [op for op in self.stage(stage, "kernels") if not op.map_layer]
        plan = stage_plan(stage, self.blocks, self.spec.pruning)
        for block in self.blocks:
            if block.name in plan.keep:
                attn = self.unet.get_submodule(block.name).transformer_blocks[0].attn1
                x = torch.empty(self.spec.batch, block.tokens, attn.to_q.in_features, dtype=self.spec.dtype,
                                device="meta")
                ops += record_ops(lambda attn=attn, x=x: attn(x))
        return ops


def recorded(spec) -> dict[str, tuple[list[OpCost], list[OpCost] | None]]:  # noqa: ANN001 - spec.GraphSpec
    """Each measured figure's ops: (as measured, i.e. the map layer explicit; with the map layer on its kernels)."""
    meta = MetaUNet(spec)
    unet, blocks = meta.unet, meta.blocks
    explicit, kernels = (with_map_impl(spec.pruning, impl) for impl in ("explicit", "kernels"))
    ops = {"stock UNet": (meta.stock(), None)}
    for stage in spec.dsap.stages:
        ops[f"{stage.name} stage"] = (meta.stage(stage, "explicit"), meta.stage(stage, "kernels"))
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


# ---- --fit: per kernel or per FLOP -------------------------------------------------------------------------------

#: The schedule whose kernels' main stage and whole schedule each fit predicts (the issue's 1.5× and 1.4× targets).
FIT_SCHEDULE = "paper"
#: The roofline factors of the fit's rows: 1 is the model as it stands (all that the roofline misses is per kernel).
FACTORS = (1.0, 1.25, 1.5, 1.75, 2.0)


@dataclasses.dataclass(frozen=True)
class Call:
    """One UNet call as the model prices it (its roofline time and its kernels), and what it took where measured."""

    what: str
    roofline_ms: float
    kernels: int
    measured_ms: float | None = None

    def ms(self, a: float, b_us: float) -> float:
        """``a`` × the roofline plus ``b_us`` per kernel."""
        return a * self.roofline_ms + b_us * 1e-3 * self.kernels


def priced(what: str, ops: list[OpCost], dev, measured_ms: float | None = None) -> Call:  # noqa: ANN001
    bare = predict(ops, dataclasses.replace(dev, launch_us=0.0))
    return Call(what, bare.seconds * 1e3, bare.launches, measured_ms)


def schedule_stages(spec, name: str) -> list[tuple[object, int]]:  # noqa: ANN001
    """Each stage of schedule ``name`` with its steps at the spec's step count."""
    schedule = spec.with_schedule(name).dsap
    return list(zip(schedule.stages, (len(r) for r in schedule.step_ranges(spec.steps)), strict=True))


def measured_calls(meta: MetaUNet, dev, bench: dict | None) -> list[Call]:  # noqa: ANN001
    """The calls measured replayed: a ``tools/gpu_bench.py`` report's ``stages`` part, else the H200's of
    2026-11-30 (the stock UNet and ``paper``'s two stages, the map layer explicit). The stock UNet first."""
    if bench is None:
        calls = [priced("stock UNet", meta.stock(), dev, MEASURED["stock UNet"])]
        for stage, _ in schedule_stages(meta.spec, FIT_SCHEDULE):
            calls.append(priced(f"{stage.name} stage, explicit", meta.stage(stage, "explicit"), dev,
                                MEASURED[f"{stage.name} stage"]))
        return calls
    figures = [f for f in bench.get("figures", []) if f.get("part") == "stages"]
    stock = next((f for f in figures if f["what"] == "stock UNet"), None)
    if stock is None:
        raise SystemExit("cost_check: --measured holds no 'stock UNet' in its stages part; expected a "
                         "tools/gpu_bench.py report (gpu-bench.json) whose stages part ran")
    calls = [priced("stock UNet", meta.stock(), dev, stock["median_ms"])]
    for fig in figures:  # a plan timed once is listed under each schedule that shares it: price it once
        if fig is stock or fig.get("note", "").startswith(("the plan of", "prunes nothing")):
            continue
        stage = next((s for s, _ in schedule_stages(meta.spec, fig.get("schedule")) if s.name == fig.get("stage")), None)
        if stage is None or fig.get("impl") not in ("explicit", "kernels"):
            raise SystemExit(f"cost_check: --measured's '{fig.get('what')}' names no stage and map_impl of "
                             f"{meta.spec.name}; expected a schedule's stage and explicit or kernels, as gpu_bench writes")
        calls.append(priced(fig["what"], meta.stage(stage, fig["impl"]), dev, fig["median_ms"]))
    return calls


def fit_device(asked: str | None, bench: dict | None, parser: argparse.ArgumentParser) -> str:
    """The GPU the fitted calls ran on: the H200 for the built-in figures, the report's own where it names one;
    ``--device`` only for a report that names none (a GPU the cost model has no entry for)."""
    ran_on = device_key(bench) if bench else "h200"
    if ran_on and asked and asked.lower() != ran_on:
        parser.error(f"--device {asked}: --fit prices each call on the GPU that ran it, {ran_on}")
    if not (ran_on or asked):
        parser.error("--measured ran on a GPU the cost model has no entry for (its cost_device and gpu); pass "
                     "--device, the entry to price it with")
    return ran_on or asked


def device_key(bench: dict) -> str | None:
    """The cost model's entry for the GPU a report ran on: its predictions' device, else the GPU's own name; None
    for one the model has no entry for."""
    return next((key for label in (bench.get("cost_device"), bench.get("gpu")) if label and (key := entry_for(label))),
                None)


def read_bench(path: Path) -> dict:
    """A ``tools/gpu_bench.py`` report, or a one-line exit naming what is wrong with it."""
    try:
        bench = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cost_check: --measured {path}: {exc}; expected a gpu-bench.json from tools/gpu_bench.py")
    if not isinstance(bench, dict) or not {"spec", "batch", "precision"} <= set(bench):
        raise SystemExit(f"cost_check: --measured {path}: no spec, batch and precision; expected a gpu-bench.json "
                         "from tools/gpu_bench.py")
    return bench


def least_squares(calls: list[Call]) -> tuple[float, float]:
    """``(a, b)`` with ``a`` ≥ 1 (the roofline is a floor) and ``b`` ≥ 0 that minimise the squared relative errors
    over ``calls``: the unbounded solution where it is inside the bounds, else the best on a bound."""
    x = np.array([[c.roofline_ms / c.measured_ms, c.kernels * 1e-3 / c.measured_ms] for c in calls])
    ones = np.ones(len(calls))
    candidates = [np.linalg.lstsq(x, ones, rcond=None)[0],
                  np.array([1.0, max(0.0, x[:, 1] @ (ones - x[:, 0]) / (x[:, 1] @ x[:, 1]))]),  # on a = 1
                  np.array([max(1.0, x[:, 0] @ ones / (x[:, 0] @ x[:, 0])), 0.0])]  # on b = 0
    inside = [c for c in candidates if c[0] >= 1.0 and c[1] >= 0.0]
    best = min(inside, key=lambda c: float(np.sum((x @ c - ones) ** 2)))
    return float(best[0]), float(best[1])


def fit_rows(calls: list[Call]) -> list[tuple[str, float, float]]:
    """``(row, a, b)``: each of ``FACTORS`` with ``b`` fitted on the stock UNet (``calls[0]``), the factor at which
    ``b`` reaches 0, and the least-squares fit over every measured call where there are two or more."""
    stock = calls[0]
    rows = []
    for a in (*FACTORS, stock.measured_ms / stock.roofline_ms):
        b = (stock.measured_ms - a * stock.roofline_ms) / (stock.kernels * 1e-3)
        if b < -1e-9:
            continue
        rows.append(("the stock UNet" if a in FACTORS else "the stock UNet, b = 0", a, max(b, 0.0)))
    if len(calls) > 1:
        rows.append(("least squares, every call", *least_squares(calls)))
    return rows


def fit_table(spec, dev, bench: dict | None) -> Table:  # noqa: ANN001
    """The ``--fit`` table: a column per fit; per measured call its predicted / measured, then each fit's worst
    error and what it predicts for the kernels' main stage and whole schedule of ``FIT_SCHEDULE``."""
    meta = MetaUNet(spec)
    calls = measured_calls(meta, dev, bench)
    schedule = schedule_stages(spec, FIT_SCHEDULE)
    stages = [(priced(stage.name, meta.stage(stage, "kernels"), dev), steps) for stage, steps in schedule]
    main_stage = next((stage for stage, _ in schedule if stage.name == "main"), schedule[-1][0])
    main = next(c for c, _ in stages if c.what == main_stage.name)
    free = priced("map layer free", meta.map_layer_free(main_stage), dev)
    fits = fit_rows(calls)
    source = "the report's stages part" if bench else "the H200 of 2026-11-30"
    table = Table(title=f"{spec.name} on {dev.name}: a × roofline + b per kernel, fitted on {source}")
    table.add_column("measured call (ms, kernels)")
    for label, a, b in fits:
        table.add_column(f"{'least squares' if label.startswith('least') else 'stock UNet'}\na {a:.2f}, b {b:.2f} µs",
                         justify="right")
    for call in calls:
        table.add_row(f"{call.what} ({call.measured_ms:.1f}, {call.kernels:,})", *(f"{call.ms(a, b) / call.measured_ms:.3f}" for _, a, b in fits))
    worst = [max(abs(c.ms(a, b) / c.measured_ms - 1) for c in calls) for _, a, b in fits]
    table.add_row("worst error", *(f"{w:.1%}" for w in worst), end_section=True)
    steps = sum(n for _, n in stages)
    table.add_row(f"predicted: {FIT_SCHEDULE} main stage, kernels ({main.kernels:,})",
                  *(f"{calls[0].ms(a, b) / main.ms(a, b):.2f}×" for _, a, b in fits))
    table.add_row(f"predicted: {FIT_SCHEDULE} schedule, kernels",
                  *(f"{calls[0].ms(a, b) * steps / sum(c.ms(a, b) * n for c, n in stages):.2f}×" for _, a, b in fits))
    table.add_row(f"predicted: {FIT_SCHEDULE} main stage, map layer free ({free.kernels:,})",
                  *(f"{calls[0].ms(a, b) / free.ms(a, b):.2f}×" for _, a, b in fits))
    table.caption = ("each column prices a call at a × its roofline + b per kernel: a = 1 is the model as it is "
                     "(costmodel.GPU_LAUNCH_US charges per kernel all that the roofline misses), a > 1 charges part of "
                     "it per FLOP and byte; 'stock UNet' columns fit it exactly, 'least squares' every call (a ≥ 1, "
                     "b ≥ 0). Rows: predicted / measured; the last three: predicted speedup against the stock UNet ('map layer "
                     "free': the kernels' stage with its map layer priced as the stock self-attention it replaces, the "
                     "most any map-layer implementation can give)")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="sdxl-base-1024")
    parser.add_argument("--device", help="the cost model's device [default: h200, or --measured's]")
    parser.add_argument("--launch-us", type=float, nargs="*", default=[GPU_LAUNCH_US])
    parser.add_argument("--forms", action="store_true", help="the kernels' map and mapless forms, by block size")
    parser.add_argument("--fit", action="store_true", help="roofline factor and per-kernel cost, fitted on the measured")
    parser.add_argument("--measured", type=Path, help="--fit on a tools/gpu_bench.py report (gpu-bench.json)")
    args = parser.parse_args()
    if args.forms:
        Console(width=150).print(forms_table(device(args.device or "h200")))
        return
    if args.measured and not args.fit:
        parser.error("--measured is read by --fit; add --fit")
    if args.fit:
        bench = read_bench(args.measured) if args.measured else None
        spec = load_spec(args.spec)
        if bench:
            spec = load_spec(bench["spec"]).model_copy(update={"batch": bench["batch"], "precision": bench["precision"]})
        try:
            table = fit_table(spec, device(fit_device(args.device, bench, parser)), bench)
        except AtedmError as exc:  # a spec, schedule or device the report names that is not here
            raise SystemExit(f"cost_check: --measured {args.measured}: {exc}") from None
        Console(width=200).print(table)
        return
    spec = load_spec(args.spec)
    ops = recorded(spec)
    base = device(args.device or "h200")
    table = Table(title=f"{spec.name} on {base.name}: predicted vs measured, ms per call")
    for column in ("what", "ops", "measured", *(f"{us:g} µs" for us in args.launch_us), "map kernels"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for what, (measured_ops, on_kernels) in ops.items():
        devices = [dataclasses.replace(base, launch_us=us) for us in args.launch_us]
        kernels = f"{predict(on_kernels, devices[-1]).seconds * 1e3:.2f}" if on_kernels else "-"
        table.add_row(what, f"{len(measured_ops)}", f"{MEASURED.get(what, float('nan')):.1f}",
                      *(f"{predict(measured_ops, d).seconds * 1e3:.2f}" for d in devices), kernels)
    table.caption = "ops: recorded as measured (a launch each; the map layer's kernels 1-3); µs: the launch cost " \
                    "priced with; map kernels: map_impl 'kernels' at the last launch cost (never measured)"
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
