"""The GPU figures of one machine, each pair measured side by side in one run: what ``tools/gpu-check.sh`` runs.

    python tools/gpu_bench.py --out gpu-check-out            # SDXL 1024², batch 2, fp16, random weights

It prints the previous figures first (``BEFORE``: the H200 run of 2026-11-30 in docs/benchmarks.md), then
measures, in this order (``--parts``; the default is what fits a few minutes of a lent GPU, scarcest first):

1. ``parity``: on this device, before any timing, the map layer's two PyTorch forms (``map_impl`` explicit and
   kernels) at each pruned block shape of the main stage: how many kept tokens and recovery sources differ,
   and the whole pruned UNet's output (main stage) kernels vs explicit, its max abs difference beside an fp16
   tolerance;
2. ``map-layer``: the map layer alone (the first layer's self-attention with its map, G-WPR, selection,
   recovery: ``pruning.atedm.map_layer``) in each form beside the stock self-attention (SDPA) at each pruned
   block shape, with its time as a multiple of SDPA's (targets for the kernels: ≤ 2× at 64×64, ≤ 1.5× at 32×32);
   then ``kernels``: each of the map layer's kernels alone at each shape (where its time goes; the Triton flash
   kernel beside PyTorch's), and the map kernel at each of ``MAP_TILES`` (its tiles were chosen with no GPU);
3. ``stages``: every DSAP stage of each ``--schedules`` schedule (``paper``, ``dagger``, ``uniform-63``) in each
   form against the stock UNet, and each whole schedule: the step-weighted sum over its stages (each stage's ms
   × its steps at the spec's step count) against the stock UNet × the steps;
4. ``compile``: the stock UNet and the main stage in each form under ``torch.compile`` (``--compile-mode``),
   each compiled in its own process (in parallel; timed one at a time), skipped with the reason where it does
   not compile within ``--compile-limit-s``;
5. ``eager`` (stock vs each stage, and the ``--compare`` specs' methods: ToMe at the same FLOPs, tomesd
   itself), ``onnxruntime`` (CUDA provider, fused and plain graphs) and ``engines`` (TensorRT-RTX, where the GPU
   is one of its targets): the earlier parts, on request or where the budget leaves room.

Every GPU figure of parts 2-4 is replayed from a CUDA graph (eager dispatch on a fast GPU measures the CPU, not
the method); ``--device cpu`` is a smoke run of the same code paths (no graphs, no figures worth reading).
Beside each measured speedup stands the cost model's prediction for this GPU (``flops.flops_report``; per
``map_impl`` where the report gives one, else ``-``).

Each figure is the median of ``--repeats`` timed calls (CUDA events) after ``--warmup`` calls; its peak is the
device-wide peak of used GPU memory while it runs, above what was in use before the UNet was loaded
(``cudaMemGetInfo`` sampled every 5 ms, so onnxruntime's and TensorRT's allocations count too; the compile
part's, each in its own process beside the others, is torch's own peak reserved memory). A part that cannot run
here is skipped with the reason; one that would overrun ``--budget-s`` too. Writes ``gpu-bench.json`` and
``gpu-bench.md`` (the table for docs/benchmarks.md) under ``--out`` after every part.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from multiprocessing import get_context
from multiprocessing.connection import Connection
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atedm_export.bench import percentile, time_calls, time_ms  # noqa: E402
from atedm_export.costmodel import entry_for  # noqa: E402
from atedm_export.dsap import stage_plan  # noqa: E402
from atedm_export.models import attention_blocks, load_unet  # noqa: E402
from atedm_export.pruning import parse_options, set_plan  # noqa: E402
from atedm_export.pruning.methods import label_of  # noqa: E402
from atedm_export.spec import load_spec  # noqa: E402

MiB = 2**20
IMPLS = ("explicit", "kernels")
NEW_PARTS = ("parity", "map-layer", "kernels", "stages", "compile")
ALL_PARTS = (*NEW_PARTS, "eager", "onnxruntime", "engines")
DEFAULT_PARTS = "parity,map-layer,kernels,stages,compile,eager"
#: About how long each part takes at SDXL 1024² on an H200 (model loaded, kernels compiled): a part starts only
#: where this much of the budget is left. ``compile`` is given its own limit on top (``--compile-limit-s``).
NEEDS_S = {"parity": 20, "map-layer": 15, "kernels": 20, "stages": 45, "compile": 60, "eager": 45, "onnxruntime": 1, "engines": 1}
#: The map kernel's tiles the kernels part also times (block_m, block_n, num_warps, num_stages): the launchers' own
#: choice was made by registers alone, on no GPU (kernels/triton_kernels.py TILES).
MAP_TILES = [(64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 4, 3), (64, 128, 4, 2), (128, 128, 8, 2)]
#: The kernels' targets: the map layer's time as a multiple of SDPA's at the same shape (issue 26).
TARGET_X_SDPA = {4096: 2.0, 1024: 1.5}

#: Today's figures, printed first: the H200 run of 2026-11-30 (docs/benchmarks.md), map layer as graph ops.
BEFORE = {
    "source": "docs/benchmarks.md, 2026-11-30: H200 (sm90), torch 2.11.0+cu130, sdxl-base-1024 (random weights), "
              "1024², batch 2, fp16; the map layer as graph ops (before the kernels)",
    "spec": "sdxl-base-1024", "batch": 2, "precision": "fp16",
    "rows": [
        {"what": "stock UNet, CUDA graph", "ms": "41.6", "ratio": "1.00×"},
        {"what": "AT-EDM main stage, CUDA graph", "ms": "64.3", "ratio": "0.65× the stock UNet"},
        {"what": "map layer alone vs SDPA, 4096 tokens (64×64), keeps 1516", "ms": "6.1 vs 0.4",
         "ratio": "15× SDPA's time (eager calls, not replayed)"},
        {"what": "map layer alone vs SDPA, 1024 tokens (32×32), keeps 379", "ms": "2.5 vs 0.2",
         "ratio": "12.5× SDPA's time (eager calls, not replayed)"},
    ],
}


@dataclass
class Figure:
    part: str  # parity-free parts: map-layer | stages | schedule | compile | eager | onnxruntime-cuda | tensorrt-rtx
    what: str  # stock UNet, paper main stage, kernels...
    median_ms: float
    p10_ms: float
    p90_ms: float
    peak_gpu_mib: float
    speedup: float | None = None  # against the part's reference (stock UNet; SDPA for the map layer)
    predicted_speedup: float | None = None  # the cost model's, for the same pair on this GPU
    impl: str | None = None  # map_impl: explicit | kernels
    schedule: str | None = None
    stage: str | None = None
    steps: int | None = None  # the stage's steps at the spec's step count
    x_sdpa: float | None = None  # map layer: its time as a multiple of SDPA's at the same shape
    target_x_sdpa: float | None = None
    compile_s: float | None = None
    note: str = ""


@dataclass
class Report:
    spec: str
    batch: int
    resolution: list[int]
    precision: str
    gpu: str
    capability: str
    torch: str
    replay: str = "CUDA graph"
    impls: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    parity: dict = field(default_factory=dict)
    predictions: dict = field(default_factory=dict)  # schedule → its stages' and its own predicted speedups
    predicted: dict[str, float] = field(default_factory=dict)  # main schedule's stage → speedup (the eager part)
    cost_device: str | None = None
    before: dict = field(default_factory=lambda: BEFORE)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class PeakMemory:
    """Device-wide used memory sampled in a thread: sees every allocator in the process, not only torch's."""

    def __init__(self, every_s: float = 0.005) -> None:
        self.every_s = every_s
        self.base = self._used()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _used(self) -> int:
        if not torch.cuda.is_available():
            return 0  # --device cpu: a smoke run of this script, no GPU memory to read
        free, total = torch.cuda.mem_get_info()
        return total - free

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used())
            time.sleep(self.every_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._used())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / MiB


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def figure(part: str, what: str, samples: list[float], peak: PeakMemory | float, **extra: object) -> Figure:
    mib = peak if isinstance(peak, (int, float)) else peak.mib
    return Figure(part, what, statistics.median(samples), percentile(samples, 0.1), percentile(samples, 0.9), mib,
                  **extra)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


@contextmanager
def part(report: Report, name: str, out: Path) -> Iterator[None]:
    """Time a part and save after it; a part that fails is recorded and the next one still runs."""
    tick = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - one broken part must not cost the others' figures
        traceback.print_exc()
        report.failed[name] = first_line(exc)
    finally:
        report.seconds[name] = round(time.perf_counter() - tick, 1)
        free_memory()
        save(report, out)
        print(f"[{time.strftime('%H:%M:%S')}] {name} done in {report.seconds[name]} s", flush=True)


# ---- what every part shares: one UNet, its inputs, the options of each map implementation ---------------------


class Bench:
    """The spec, the loaded UNet (once, for every part of this process) and the AT-EDM options of each ``map_impl``."""

    def __init__(self, spec, args: argparse.Namespace) -> None:  # noqa: ANN001
        self.spec = spec
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.base = PeakMemory()._used()  # before the weights: every figure's peak counts them

    @cached_property
    def unet(self):  # noqa: ANN201
        with torch.no_grad():
            return load_unet(self.spec.model, dtype=self.spec.dtype, device=self.args.device, seed=self.spec.seed).eval()

    @cached_property
    def contract(self):  # noqa: ANN201
        return self.spec.contract(dict(self.unet.config))

    @cached_property
    def feed(self) -> dict[str, torch.Tensor]:
        return self.contract.example_feed(seed=1, device=self.args.device)

    @cached_property
    def graph(self) -> torch.nn.Module:
        return self.contract.module(self.unet)

    @cached_property
    def blocks(self) -> list:
        return attention_blocks(self.unet, self.spec.height, self.spec.width)

    def call(self) -> torch.Tensor:
        return self.graph(*self.graph.args(self.feed))

    def options(self, impl: str):  # noqa: ANN201
        """The spec's AT-EDM options with ``map_impl`` set (validated: the kernels need heads 'mean', no pooling)."""
        if self.spec.method != "atedm":
            raise ValueError(f"--spec {self.spec.name} prunes with {self.spec.method}; the map layer is AT-EDM's")
        return parse_options({**self.spec.pruning.model_dump(), "map_impl": impl})

    @property
    def main_stage(self):  # noqa: ANN201
        stages = self.spec.dsap.stages
        return next((s for s in stages if s.name == "main"), stages[-1])

    def shapes(self) -> list[tuple[str, int, int, tuple[int, int]]]:
        """``(block, tokens, keep, grid)`` of each distinct pruned block shape of the main stage, finest first."""
        plan = stage_plan(self.main_stage, self.blocks, self.spec.pruning)
        seen: dict[tuple[int, int], tuple[str, int, int, tuple[int, int]]] = {}
        for block in self.blocks:
            if block.name in plan.keep:
                seen.setdefault((block.tokens, plan.keep[block.name]),
                                (block.name, block.tokens, plan.keep[block.name], (block.height, block.width)))
        return sorted(seen.values(), key=lambda s: -s[1])

    def first_attn(self, block: str):  # noqa: ANN201
        return self.unet.get_submodule(block).transformer_blocks[0].attn1

    def tokens_input(self, block: str, tokens: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
        """Seeded ``[B, N, C]`` unit-variance input of a block's first self-attention (what its LayerNorm gives)."""
        attn = self.first_attn(block)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(self.spec.batch, tokens, attn.to_q.in_features, generator=gen) * scale
        return x.to(device=self.device, dtype=self.spec.dtype)


def kernels_reason(device: str) -> str | None:
    """Why the map layer's kernels cannot run here, or None where they can."""
    try:
        from atedm_export.kernels import why_not
        from atedm_export.pruning.atedm import map_layer  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure is the reason
        return f"the kernels cannot be imported ({first_line(exc)})"
    return why_not(torch.device(device))


def measure(bench: Bench, call: Callable[[], object], what: str, report: Report,
            weights: bool = True) -> tuple[list[float], PeakMemory, str]:
    """``call`` timed from its CUDA-graph replay (on a GPU with ``--cuda-graphs``), else called as it is. A capture
    that fails is recorded and the call timed eagerly, the figure saying so. Its peak counts the weights (above
    the memory in use before the UNet was loaded), or with ``weights=False`` only what the call itself adds."""
    args, note = bench.args, ""
    with PeakMemory() as peak:
        samples = None
        if bench.cuda and args.cuda_graphs:
            try:
                replay = cuda_graph(call)
                samples = time_ms(replay, bench.device, args.warmup, args.repeats)
                del replay
            except Exception as exc:  # noqa: BLE001
                report.failed[f"{what}: CUDA-graph capture"] = first_line(exc)
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize()
                note = "eager calls: its CUDA-graph capture failed"
        if samples is None:
            samples = time_ms(call, bench.device, args.warmup, args.repeats)
    if weights:
        peak.base = bench.base
    free_memory()
    return samples, peak, note


def cuda_graph(call):  # noqa: ANN001, ANN201
    """``call`` captured once (after warm-up on a side stream, as torch's documentation asks); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    captured = torch.cuda.CUDAGraph()
    with torch.cuda.graph(captured):
        call()
    return captured.replay


# ---- 1. parity: kernels vs explicit on this device, before any timing -----------------------------------------


def parity(report: Report, bench: Bench, impls: list[str]) -> None:
    """At each pruned block shape, kept tokens and recovery sources of the two forms compared (on the input the
    UNet gives its blocks, and on a peaked one where the ranking is clear); then the main stage's UNet output."""
    if "kernels" not in impls or "explicit" not in impls:
        report.skipped["parity"] = "needs both map_impl explicit and kernels"
        return
    from atedm_export.pruning.atedm import map_layer

    tolerance = bench.args.parity_atol, bench.args.parity_rtol
    blocks = []
    with torch.no_grad():
        for block, tokens, keep, grid in bench.shapes():
            attn = bench.first_attn(block)
            for label, scale in (("unit input", 1.0), (f"peaked (input ×{bench.args.peak_scale:g})", bench.args.peak_scale)):
                x = bench.tokens_input(block, tokens, seed=3, scale=scale)
                runs = {impl: map_layer(attn, x, keep, bench.options(impl), grid) for impl in ("explicit", "kernels")}
                (out_e, kept_e, src_e), (out_k, kept_k, src_k) = runs["explicit"], runs["kernels"]
                kept_e, kept_k = kept_e.long(), kept_k.long()
                missing = sum(int((~torch.isin(kept_e[b], kept_k[b])).sum()) for b in range(kept_e.shape[0]))
                # a source is a slot of its batch item's kept list: compare the tokens the slots name
                tok_e, tok_k = kept_e.gather(1, src_e.long()), kept_k.gather(1, src_k.long())
                blocks.append({
                    "block": block, "tokens": tokens, "grid": list(grid), "keep": keep, "input": label,
                    "kept_differ": missing, "kept_total": kept_e.numel(),
                    "sources_differ": int((tok_e != tok_k).sum()), "sources_total": src_e.numel(),
                    "out_max_abs_diff": float((out_e.float() - out_k.float()).abs().max()),
                })
        outs = {}
        for impl in ("explicit", "kernels"):
            set_plan(bench.unet, stage_plan(bench.main_stage, bench.blocks, bench.options(impl)))
            outs[impl] = bench.call().float()
        set_plan(bench.unet, None)
    ref, diff = outs["explicit"], (outs["kernels"] - outs["explicit"]).abs()
    bound = tolerance[0] + tolerance[1] * float(ref.abs().max())
    report.parity = {
        "blocks": blocks,
        "unet": {"stage": bench.main_stage.name, "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                 "explicit_max_abs": float(ref.abs().max()), "tolerance": bound,
                 "tolerance_rule": f"atol {tolerance[0]:g} + rtol {tolerance[1]:g} × max|explicit|",
                 "beyond_tolerance": int((diff > bound).sum()), "elements": diff.numel(),
                 "within": bool(float(diff.max()) <= bound)},
    }
    for entry in blocks:
        print(f"    parity {entry['tokens']} tokens, {entry['input']}: kept differ {entry['kept_differ']}/"
              f"{entry['kept_total']}, sources differ {entry['sources_differ']}/{entry['sources_total']}, "
              f"out max |Δ| {entry['out_max_abs_diff']:.3g}", flush=True)
    unet = report.parity["unet"]
    print(f"    parity UNet ({unet['stage']} stage): max |Δ| {unet['max_abs_diff']:.3g} "
          f"(tolerance {unet['tolerance']:.3g}: {'within' if unet['within'] else 'OUTSIDE'})", flush=True)


# ---- 2. the map layer alone beside SDPA ------------------------------------------------------------------------


def map_layer_part(report: Report, bench: Bench, impls: list[str]) -> None:
    """SDPA (the stock self-attention: projections, fused attention, output projection) and the map layer in each
    form (the same projections, plus its map, G-WPR, top-k and recovery) at each pruned block shape."""
    from atedm_export.pruning.atedm import map_layer

    with torch.no_grad():
        for block, tokens, keep, (height, width) in bench.shapes():
            attn, x = bench.first_attn(block), bench.tokens_input(block, tokens)
            shape = f"{tokens} tokens ({height}×{width})"
            samples, peak, note = measure(bench, lambda: attn(x), f"SDPA self-attention, {shape}", report, weights=False)
            sdpa = figure("map-layer", f"SDPA self-attention, {shape}", samples, peak, speedup=1.0, x_sdpa=1.0, note=note)
            report.figures.append(sdpa)
            for impl in impls:
                opts = bench.options(impl)
                what = f"map layer {impl}, {shape}, keeps {keep}"
                samples, peak, note = measure(bench, lambda: map_layer(attn, x, keep, opts, (height, width)), what, report,
                                              weights=False)
                fig = figure("map-layer", what, samples, peak, impl=impl, note=note,
                             target_x_sdpa=TARGET_X_SDPA.get(tokens) if impl == "kernels" else None)
                fig.speedup, fig.x_sdpa = sdpa.median_ms / fig.median_ms, fig.median_ms / sdpa.median_ms
                report.figures.append(fig)


# ---- 2b. each kernel alone, and the map kernel's tiles -------------------------------------------------------------


def kernels_part(report: Report, bench: Bench) -> None:
    """At each pruned block shape, each of the map layer's kernels alone, replayed (where the map layer's time goes),
    the Triton flash kernel beside PyTorch's, and the map kernel at each of ``MAP_TILES`` (the next choice of tiles)."""
    from dataclasses import replace as with_tiles

    from atedm_export.kernels import triton_kernels as tk

    with torch.no_grad():
        for block, tokens, keep, _grid in bench.shapes():
            attn, x = bench.first_attn(block), bench.tokens_input(block, tokens, seed=3)
            split = (x.shape[0], tokens, attn.heads, -1)
            q, k, v = attn.to_q(x).view(split), attn.to_k(x).view(split), attn.to_v(x).view(split)
            out, lse = torch.ops.atedm.attention_lse(q, k, v, attn.scale)
            attn_map, column_sums = torch.ops.atedm.head_mean_map(q, k, lse, attn.scale)
            first = column_sums.sum(dim=1)
            kept, slot_of = torch.ops.atedm.select_kept(first, keep)
            calls = {
                "attention_lse (on CUDA: PyTorch's flash)": lambda: torch.ops.atedm.attention_lse(q, k, v, attn.scale),
                "attention_lse, the Triton flash kernel": lambda: tk.run("attention_lse", q, k, v, attn.scale),
                "head_mean_map": lambda: torch.ops.atedm.head_mean_map(q, k, lse, attn.scale),
                "one G-WPR step (bmm over the map)": lambda: first.unsqueeze(1) @ attn_map,
                "select_kept (the k-th largest found in the kernel)": lambda: torch.ops.atedm.select_kept(first, keep),
                "recovery_sources": lambda: torch.ops.atedm.recovery_sources(attn_map, kept, slot_of),
                "gwpr_step (mapless)": lambda: torch.ops.atedm.gwpr_step(q, k, lse, first, attn.scale),
            }
            for name, call in calls.items():
                what = f"{name}, {tokens} tokens"
                samples, peak, note = measure(bench, call, what, report, weights=False)
                report.figures.append(figure("kernels", what, samples, peak, note=note))
            chosen = tk.TILES["head_mean_map"]
            try:
                for block_m, block_n, warps, stages in MAP_TILES:
                    tk.TILES["head_mean_map"] = with_tiles(chosen, block_m=block_m, block_n=block_n, num_warps=warps,
                                                           num_stages=stages)
                    what = f"head_mean_map at {block_m}×{block_n}, {warps} warps, {stages} stages, {tokens} tokens"
                    samples, peak, note = measure(bench, lambda: tk.run("head_mean_map", q, k, lse, attn.scale,
                                                                         tiles=tk.TILES["head_mean_map"]), what, report,
                                                  weights=False)
                    report.figures.append(figure("kernels", what, samples, peak, note=note))
            finally:
                tk.TILES["head_mean_map"] = chosen
            del out, attn_map
            free_memory()


# ---- 3. every stage and every schedule against the stock UNet ---------------------------------------------------


def stages_part(report: Report, bench: Bench, impls: list[str], schedules: list[str]) -> None:
    """The stock UNet, then each schedule's stages in each form (a plan timed once where schedules share it), each
    replayed; then each schedule as the step-weighted sum of its stages against the stock UNet × the steps."""
    with torch.no_grad():
        set_plan(bench.unet, None)
        samples, peak, note = measure(bench, bench.call, "stock UNet", report)
        stock = figure("stages", "stock UNet", samples, peak, speedup=1.0, note=note)
        report.figures.append(stock)
        timed: dict[tuple, Figure] = {}
        for name in schedules:
            spec = bench.spec.with_schedule(name)
            ranges = spec.dsap.step_ranges(spec.steps)
            per_impl: dict[str, list[Figure]] = {impl: [] for impl in impls}
            for stage, steps in zip(spec.dsap.stages, ranges):
                for impl in impls:
                    plan = stage_plan(stage, bench.blocks, bench.options(impl))
                    what = f"{name} {stage.name} stage, {impl}"
                    key = (tuple(sorted(plan.keep.items())), impl)
                    if key in timed:
                        fig = replace(timed[key], what=what, note=f"the plan of '{timed[key].what}': timed once")
                    elif not plan.keep:
                        fig = replace(stock, what=what, impl=impl, note="prunes nothing: the stock UNet")
                    else:
                        set_plan(bench.unet, plan)
                        samples, peak, note = measure(bench, bench.call, what, report)
                        set_plan(bench.unet, None)
                        fig = figure("stages", what, samples, peak, note=note)
                        timed[key] = fig
                    fig = replace(fig, impl=impl, schedule=name, stage=stage.name, steps=len(steps),
                                  speedup=stock.median_ms / fig.median_ms)
                    report.figures.append(fig)
                    per_impl[impl].append(fig)
                save(report, bench.args.out)
            steps = spec.steps
            if not any(f.part == "schedule" and f.what.startswith("stock UNet") for f in report.figures):
                report.figures.append(Figure("schedule", f"stock UNet × {steps} steps", stock.median_ms * steps,
                                             stock.p10_ms * steps, stock.p90_ms * steps, stock.peak_gpu_mib, 1.0,
                                             steps=steps))
            for impl, figs in per_impl.items():
                total = sum(f.median_ms * f.steps for f in figs)
                split = " + ".join(f"{f.stage} {f.steps}" for f in figs)
                report.figures.append(Figure(
                    "schedule", f"{name} schedule, {impl} ({steps} steps: {split})", total,
                    sum(f.p10_ms * f.steps for f in figs), sum(f.p90_ms * f.steps for f in figs),
                    max(f.peak_gpu_mib for f in figs), stock.median_ms * steps / total, impl=impl, schedule=name,
                    steps=steps))


# ---- 4. torch.compile, each form in its own process --------------------------------------------------------------


def compile_items(impls: list[str]) -> list[str]:
    return ["stock", *impls]


def compile_what(item: str, schedule: str, stage: str) -> str:
    return "stock UNet, torch.compile" if item == "stock" else f"{schedule} {stage} stage, {item}, torch.compile"


def compile_part(report: Report, bench: Bench, impls: list[str], limit_s: float) -> None:
    """The stock UNet and the main stage in each form compiled, each in a process of its own, all at once (the
    compilers use the CPUs; the timings take the GPU one at a time, under a lock). What has not compiled and been
    timed within ``limit_s`` is stopped and skipped with the reason."""
    args, stage, schedule = bench.args, bench.main_stage.name, bench.spec.dsap.name
    folder = args.out / "compile"
    folder.mkdir(parents=True, exist_ok=True)
    children = {}
    for item in compile_items(impls):
        (folder / f"{item}.json").unlink(missing_ok=True)
        command = [sys.executable, str(Path(__file__).resolve()), "--compile-child", item, "--spec", args.spec,
                   "--schedules", args.schedules, "--batch", str(args.batch), "--precision", args.precision,
                   "--device", args.device, "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                   "--compile-mode", args.compile_mode, "--compile-backend", args.compile_backend,
                   "--out", str(args.out), "--cuda-graphs" if args.cuda_graphs else "--no-cuda-graphs"]
        log = (folder / f"{item}.log").open("w")
        # the children compile at once: the CPUs shared between their compile workers, not each taking all
        threads = str(max(1, (os.cpu_count() or 1) // len(compile_items(impls))))
        env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", threads)}
        children[item] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                           start_new_session=True), log)
    deadline = time.perf_counter() + limit_s
    stopped = set()
    try:
        while time.perf_counter() < deadline and any(p.poll() is None for p, _ in children.values()):
            time.sleep(0.5)
    finally:  # past the limit, or this process told to stop: no compiler left running
        for item, (proc, log) in children.items():
            if proc.poll() is None:  # its own session: the compiler's worker processes go with it
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                stopped.add(item)
            log.close()
    stock = None
    for item in compile_items(impls):
        what = compile_what(item, schedule, stage)
        result = folder / f"{item}.json"
        if result.is_file():
            data = json.loads(result.read_text())
            fig = Figure(**data)
            if item == "stock":
                stock = fig
            fig.speedup = stock.median_ms / fig.median_ms if stock else None
            report.figures.append(fig)
        elif item in stopped:
            how = f"mode {args.compile_mode}" if args.compile_backend == "inductor" else f"backend {args.compile_backend}"
            report.skipped[what] = (f"did not compile and time within the {limit_s:.0f} s limit "
                                    f"(torch.compile {how}; log: compile/{item}.log)")
        else:
            report.failed[what] = f"exit {children[item][0].returncode}: {_last_line(folder / f'{item}.log')}"
        print(f"    {what}: " + (f"{fig.median_ms:.2f} ms, compiled in {fig.compile_s:.0f} s" if result.is_file()
                                 else report.skipped.get(what) or report.failed.get(what)), flush=True)


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    return lines[-1][:300] if lines else "no output"


@contextmanager
def gpu_lock(path: Path) -> Iterator[None]:
    """One compile child at a time on the GPU: the others may still be compiling (CPU) meanwhile."""
    import fcntl

    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def compile_child(args: argparse.Namespace) -> int:
    """One item of the compile part (``--compile-child stock|explicit|kernels``): compile, time, write its figure."""
    spec = main_spec(args)
    bench = Bench(spec, args)
    item, stage = args.compile_child, bench.main_stage
    plan = None if item == "stock" else stage_plan(stage, bench.blocks, bench.options(item))
    what = compile_what(item, spec.dsap.name, stage.name)
    set_plan(bench.unet, plan)
    options = {"mode": args.compile_mode} if args.compile_backend == "inductor" else {}
    compiled = torch.compile(bench.graph, backend=args.compile_backend, dynamic=False, **options)
    inputs = bench.graph.args(bench.feed)
    call = lambda: compiled(*inputs)  # noqa: E731
    with torch.no_grad():
        tick = time.perf_counter()
        call()
        if bench.cuda:
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - tick
        print(f"{what}: compiled in {compile_s:.1f} s", flush=True)
        with gpu_lock(args.out / "compile" / "gpu.lock"):
            if bench.cuda:
                torch.cuda.reset_peak_memory_stats()
            samples, _, note = measure(bench, call, what, Report("", 0, [], "", "", "", ""))
            peak = torch.cuda.max_memory_reserved() / MiB if bench.cuda else 0.0
    fig = figure("compile", what, samples, peak, impl=None if item == "stock" else item,
                 schedule=spec.dsap.name if plan else None, stage=stage.name if plan else None,
                 compile_s=round(compile_s, 1), note=note or f"torch.compile {args.compile_backend}"
                 + (f" mode {args.compile_mode}" if args.compile_backend == "inductor" else ""))
    (args.out / "compile" / f"{item}.json").write_text(json.dumps(asdict(fig)))
    print(f"{what}: {fig.median_ms:.2f} ms", flush=True)
    return 0


# ---- the cost model, in a process of its own beside the measurements ---------------------------------------------


def predict_schedules(spec_name: str, batch: int, precision: str, schedules: list[str], device_name: str) -> dict:
    """Each schedule's predicted speedups on ``device_name``: per stage, the cost model's (``generic``) and, where
    the report gives them (``map_impls``), per map implementation; and the whole schedule's."""
    from atedm_export.costmodel import device
    from atedm_export.flops import flops_report

    dev = device(device_name)
    spec = load_spec(spec_name).model_copy(update={"batch": batch, "precision": precision})
    result = {}
    for name in schedules:
        report = flops_report(spec.with_schedule(name), (dev,))
        data = report.to_json()["predictions"]
        entry = data.get(dev.key) if isinstance(data, dict) else None
        entry = entry if isinstance(entry, dict) else (next(iter(data.values()), {}) if isinstance(data, dict) else {})
        steps = {s.name: s.num_steps for s in report.stages}
        stages = {}
        for stage in entry.get("stages", []):
            if not isinstance(stage, dict) or "name" not in stage:
                continue
            stages[stage["name"]] = {"generic": _number(stage.get("predicted_speedup")),
                                     **{impl: _impl_speedup(stage, impl, entry.get("baseline_ms")) for impl in IMPLS}}
        whole = {"generic": _number(entry.get("predicted_speedup"))}
        for impl in IMPLS:
            whole[impl] = _impl_speedup(entry, impl, None) or _schedule_from_stages(stages, steps, impl)
        result[name] = {"device": dev.name, "stages": stages, "schedule": whole, "steps": steps}
    return result


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def _impl_speedup(entry: dict, impl: str, baseline_ms: object) -> float | None:
    """``entry['map_impls'][impl]``, read defensively: a speedup, or a mapping with one (or with ``ms``)."""
    impls = entry.get("map_impls") if isinstance(entry, dict) else None
    value = impls.get(impl) if isinstance(impls, dict) else None
    if isinstance(value, dict):
        for key in ("predicted_speedup", "speedup"):
            if _number(value.get(key)):
                return _number(value.get(key))
        ms, base = _number(value.get("ms")), _number(baseline_ms)
        return base / ms if ms and base else None
    return _number(value)


def _schedule_from_stages(stages: dict, steps: dict[str, int], impl: str) -> float | None:
    """The schedule's speedup from its stages' (each ``baseline / stage``): ``Σ steps / Σ (steps_i / speedup_i)``."""
    speedups = {name: (stages.get(name) or {}).get(impl) for name in steps}
    if not steps or not all(speedups.values()):
        return None
    return sum(steps.values()) / sum(n / speedups[name] for name, n in steps.items())


def _predict_entry(conn: Connection, *args: object) -> None:
    """The predictions process: ``predict_schedules`` sent back through ``conn`` (or the error, in one line)."""
    try:
        conn.send(("ok", predict_schedules(*args)))
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        conn.send(("error", first_line(exc)))
    finally:
        conn.close()


class Predictions:
    """``predict_schedules`` in a spawned process beside the measurements (flops_report counts each schedule on
    the meta device: seconds of CPU each); stopped where it has not answered in time."""

    def __init__(self, *args: object) -> None:
        context = get_context("spawn")
        self.conn, child = context.Pipe(duplex=False)
        self.process = context.Process(target=_predict_entry, args=(child, *args), daemon=True)
        self.process.start()
        child.close()

    def result(self, wait_s: float) -> tuple[str, object]:
        try:
            if not self.conn.poll(wait_s):
                return "timeout", None
            return self.conn.recv()
        except EOFError:
            return "error", f"the predictions process ended without an answer (exit {self.process.exitcode})"
        finally:
            if self.process.is_alive():
                self.process.terminate()
            self.process.join(5)


def collect_predictions(report: Report, pending: Predictions | None, main_schedule: str, wait_s: float,
                        eager_impl: str = "explicit") -> None:
    """The predictions, once ready; the eager part's (``map_impl`` auto) are those of ``eager_impl``, what auto
    resolved to on this device."""
    if pending is None:
        return
    tick = time.perf_counter()
    status, result = pending.result(max(1.0, wait_s))
    report.seconds["predictions (waited for)"] = round(time.perf_counter() - tick, 1)
    if status == "timeout":
        report.skipped["predictions"] = f"the cost model had not finished {wait_s:.0f} s after the measurements"
        return
    if status != "ok":
        report.failed["predictions"] = str(result)
        return
    report.predictions = result
    report.cost_device = next((p["device"] for p in result.values()), None)
    report.predicted = {name: s.get(eager_impl) or s["generic"]
                        for name, s in result.get(main_schedule, {}).get("stages", {}).items()}


# ---- 5. the earlier parts: eager with ToMe beside it, onnxruntime, engines ---------------------------------------


def eager(report: Report, bench: Bench, args: argparse.Namespace) -> None:
    """Stock vs AT-EDM (the spec's options: ``map_impl`` auto) and the ``--compare`` specs' methods (ToMe at the same
    FLOPs by default) in PyTorch: one UNet, each plan swapped in and out (``set_plan``) between timings."""
    spec, unet = bench.spec, bench.unet
    plans = {"stock UNet": None}
    for each in [spec, *args.compare_specs]:
        for stage in each.dsap.stages:
            plan = stage_plan(stage, bench.blocks, each.pruning)
            if plan is not None and plan.keep:
                plans[f"{label_of(each.method)} {stage.name} stage"] = plan
    with torch.no_grad():
        for what, plan in plans.items():
            set_plan(unet, plan)
            timed(report, what, bench.call, args, bench.base)
        set_plan(unet, None)
        for other in args.compare_specs:
            tomesd_reference(report, other, unet, bench.call, args, bench.base)


def timed(report: Report, what: str, call, args: argparse.Namespace, base: int) -> None:  # noqa: ANN001
    """One eager figure, and on a GPU (``--cuda-graphs``) the same call captured in a CUDA graph and replayed:
    eager PyTorch pays the CPU's dispatch per kernel, which a method of many small ops (ToMe's matching)
    feels most; a replayed graph, like an engine, does not."""
    with PeakMemory() as peak:
        samples = time_ms(call, torch.device(args.device), args.warmup, args.repeats)
    peak.base = base  # the weights count, as they do in the parts that load inside the figure
    report.figures.append(figure("eager", what, samples, peak))
    if not (args.cuda_graphs and args.device == "cuda"):
        return
    with PeakMemory() as peak:
        replay = cuda_graph(call)
        samples = time_ms(replay, torch.device(args.device), args.warmup, args.repeats)
    peak.base = base
    report.figures.append(figure("eager", f"{what}, CUDA graph", samples, peak))
    del replay
    free_memory()


def tomesd_reference(report: Report, spec, unet, call, args: argparse.Namespace, base: int) -> None:  # noqa: ANN001
    """tomesd's own ToMe (0.1.3, randomness off) at the ToMe spec's uniform ratio, timed like ours: what our
    static form costs beside the implementation it equals (tests/test_tome.py)."""
    stages = spec.dsap.stages
    if spec.method != "tome" or len(stages) != 1 or stages[0].blocks:
        return
    try:
        import tomesd
    except ImportError:
        report.skipped["tomesd reference"] = "tomesd is not installed"
        return
    opts = spec.pruning
    tomesd.apply_patch(unet, ratio=1 - stages[0].keep, max_downsample=8, sx=opts.stride, sy=opts.stride,
                       use_rand=False, merge_attn=opts.merge_attn, merge_crossattn=opts.merge_crossattn,
                       merge_mlp=opts.merge_mlp)
    try:
        timed(report, f"ToMe {stages[0].name} stage, tomesd {tomesd_version()} itself", call, args, base)
    finally:
        tomesd.remove_patch(unet)


def tomesd_version() -> str:
    from importlib.metadata import version

    return version("tomesd")


def build(spec, out: Path, backend: str, targets: tuple[str, ...]) -> Path:  # noqa: ANN001
    from atedm_export.build import BuildRequest
    from atedm_export.build import build as run_build

    folder = out / f"build-{backend}"
    # plans keep their weights: 'cycled' reloads them from the plan (stripped plans are refitted from the ONNX)
    run_build(BuildRequest(spec, folder, library=backend, targets=targets, stages=("main",), force=True,
                           strip_weights=False, ort_fusion=backend == "onnx"),
              progress=lambda name, text, seconds: print(f"    {name}: {text}", flush=True))
    return folder


def timed_graphs(folder: Path, backend_name: str, args: argparse.Namespace, graphs: list[str] | None = None,
                 alternate: bool = False, **options: object) -> dict[str, list[float]]:
    """Load a backend for the build, time the graphs; the backend is gone when this returns. With
    ``alternate``, also every graph once in turn per sample (what a stage switch costs: key "alternating")."""
    from atedm_export.buildfolder import first_view, read_manifest
    from atedm_export.runtime.backends import load_backend

    manifest = read_manifest(folder)
    view = first_view(manifest)
    backend = load_backend(backend_name, folder, manifest, args.device, **options)
    feed = view.contract.example_feed(seed=1, device=args.device)
    samples = {}
    for name in graphs or [entry.name for entry in view.graphs()]:
        samples[name] = time_calls(backend, name, feed, args.warmup, args.repeats)
        backend.release()
    if alternate:
        names = list(samples)
        samples["alternating"] = time_ms(lambda: [backend.run(name, feed) for name in names], backend.device,
                                         args.warmup, args.repeats)
    return samples


def onnxruntime_cuda(report: Report, folder: Path, args: argparse.Namespace) -> None:
    """One graph per session, so each peak is that graph's own; every graph in its fused and its plain form."""
    from atedm_export.buildfolder import first_view, read_manifest

    for fused in (True, False):
        for entry in first_view(read_manifest(folder)).graphs():
            with PeakMemory() as peak:
                samples = timed_graphs(folder, "onnxruntime", args, [entry.name], fused=fused)[entry.name]
            what = f"{_what(entry.name)} ({'fused' if fused else 'unfused'} attention)"
            report.figures.append(figure(f"onnxruntime-{args.device}", what, samples, peak))
            free_memory()


def engines(report: Report, folder: Path, args: argparse.Namespace) -> None:
    """Every stage engine loaded at once (as a pipeline runs them); the peak is the whole set's."""
    for cuda_graphs, weights in [(False, "resident"), (True, "resident"), (False, "cycled")]:
        mode = f"{'CUDA graphs' if cuda_graphs else 'no CUDA graphs'}, weights {weights}"
        with PeakMemory() as peak:
            samples = timed_graphs(folder, "engine", args, alternate=not cuda_graphs, cuda_graphs=cuda_graphs,
                                   weights=weights)
        for name, values in samples.items():
            report.figures.append(figure("tensorrt-rtx", f"{_what(name)} ({mode})", values, peak))
        free_memory()


def _what(graph: str) -> str:
    if graph == "alternating":
        return "every graph once in turn (a stage switch per call)"
    return "unpruned graph" if graph == "baseline" else f"AT-EDM {graph} stage graph"


def _stage_of(what: str) -> str | None:
    """The DSAP stage a figure of the earlier parts times (for its predicted speedup), or None."""
    for prefix in ("AT-EDM ",):  # the predictions are the main spec's (AT-EDM) stages
        if what.startswith(prefix):
            return what[len(prefix):].split(" ")[0]
    return None


# ---- the report ------------------------------------------------------------------------------------------------


def predicted_for(report: Report, fig: Figure) -> float | None:
    """The cost model's speedup for a figure of the new parts: per map implementation where the report has it."""
    if fig.part not in ("stages", "schedule", "compile") or fig.impl is None:
        return None
    entry = report.predictions.get(fig.schedule or "", {})
    if fig.part == "schedule":
        return (entry.get("schedule") or {}).get(fig.impl)
    return ((entry.get("stages") or {}).get(fig.stage or "") or {}).get(fig.impl)


def speedups(report: Report) -> None:
    """The earlier parts: each figure against the fastest unpruned figure of its part (any form or mode) measured
    in the same run. The new parts set theirs as they measure; the predictions arrive when they are ready."""
    for fig in report.figures:
        if fig.part in ("map-layer", "stages", "schedule", "compile"):
            fig.predicted_speedup = predicted_for(report, fig)
            continue
        if fig.what.startswith("every graph"):
            continue  # a sum of different graphs: nothing to divide by
        bases = [f.median_ms for f in report.figures if f.part == fig.part and f.what.startswith(("stock UNet", "unpruned"))]
        fig.speedup = min(bases) / fig.median_ms if bases else None
        stage = _stage_of(fig.what)
        fig.predicted_speedup = report.predicted.get(stage) if stage else None


def save(report: Report, out: Path) -> None:
    """Write what is measured so far: a part cut short by the time limit keeps the parts before it."""
    speedups(report)
    (out / "gpu-bench.json").write_text(json.dumps({**asdict(report), "machine": platform.node()}, indent=2))
    (out / "gpu-bench.md").write_text(markdown(report))


def before_markdown(report: Report) -> str:
    before = report.before
    same = (report.spec, report.batch, report.precision) == (before["spec"], before["batch"], before["precision"])
    head = f"**Before** ({before['source']}{'' if same else '; another spec than this run'}):\n\n"
    rows = "".join(f"| {r['what']} | {r['ms']} | {r['ratio']} |\n" for r in before["rows"])
    return head + "| what | ms / call | ratio |\n|---|---|---|\n" + rows


def _x(value: float | None, digits: int = 2) -> str:
    return f"{value:.{digits}f}×" if value else "-"


def now_lines(report: Report) -> list[str]:
    """The figures the issue asks for, one line each: the map layer vs SDPA, the main stage and each schedule."""
    lines = []
    for fig in report.figures:
        if fig.part == "map-layer" and fig.impl:
            target = ""
            if fig.target_x_sdpa:
                target = f" (target ≤ {fig.target_x_sdpa:g}×: {'met' if fig.x_sdpa <= fig.target_x_sdpa else 'MISSED'})"
            lines.append(f"map layer {fig.impl}, {fig.what.split(', ', 1)[1]}: {fig.median_ms:.2f} ms = "
                         f"{fig.x_sdpa:.1f}× SDPA's time{target}")
        elif fig.part in ("stages", "compile") and fig.impl and fig.stage == "main" and not fig.note.startswith("the plan"):
            stock = "the stock UNet" + (", compiled" if fig.part == "compile" else "")
            lines.append(f"{fig.what}: {fig.median_ms:.1f} ms = {_x(fig.speedup)} {stock}"
                         f" (predicted {_x(fig.predicted_speedup)})")
        elif fig.part == "schedule" and fig.impl:
            lines.append(f"{fig.what.split(' (')[0]}: {_x(fig.speedup)} the stock UNet over {fig.steps} steps "
                         f"(predicted {_x(fig.predicted_speedup)})")
    return lines


def parity_markdown(parity: dict) -> str:
    if not parity:
        return ""
    rows = "".join(
        f"| {b['tokens']} ({b['grid'][0]}×{b['grid'][1]}), keeps {b['keep']} | {b['input']} | "
        f"{b['kept_differ']} of {b['kept_total']} | {b['sources_differ']} of {b['sources_total']} | "
        f"{b['out_max_abs_diff']:.3g} |\n" for b in parity.get("blocks", []))
    unet = parity.get("unet", {})
    tail = ""
    if unet:
        verdict = "**within**" if unet["within"] else f"**OUTSIDE** at {unet['beyond_tolerance']} of {unet['elements']} elements"
        tail = (f"\nWhole pruned UNet ({unet['stage']} stage), kernels vs explicit: max |Δ| {unet['max_abs_diff']:.3g}, "
                f"mean |Δ| {unet['mean_abs_diff']:.3g} (max |explicit| {unet['explicit_max_abs']:.3g}); tolerance "
                f"{unet['tolerance']:.3g} ({unet['tolerance_rule']}): {verdict}.\n")
    return ("\n**Parity on this device** (map layer, kernels vs explicit; a kept token of one form missing from the "
            "other's set, a position whose recovery source token differs):\n\n"
            "| block shape | input | kept tokens differ | sources differ | output max abs diff |\n|---|---|---|---|---|\n"
            + rows + tail)


def markdown(report: Report) -> str:
    head = (f"{report.spec}, {report.resolution[0]}×{report.resolution[1]}, batch {report.batch}, {report.precision}, "
            f"random weights; {report.gpu} ({report.capability}), torch {report.torch}; map layer, stages, schedules "
            f"and compile figures replayed: {report.replay}\n\n")
    now = now_lines(report)
    summary = ("\n**Now:**\n\n" + "".join(f"- {line}\n" for line in now)) if now else ""
    table = (f"\n| part | what | median ms / call | p10-p90 ms | speedup vs stock (map layer: vs SDPA) | predicted on "
             f"{report.cost_device or '-'} | peak GPU memory |\n"
             "|---|---|---|---|---|---|---|\n")
    rows = []
    for f in report.figures:
        speed = _x(f.speedup)
        if f.part == "map-layer" and f.impl:
            speed += f" ({f.x_sdpa:.1f}× SDPA's time" + (f"; target ≤ {f.target_x_sdpa:g}×" if f.target_x_sdpa else "") + ")"
        what = f.what + (f" [{f.note}]" if f.note and not f.note.startswith("torch.compile") else "")
        if f.compile_s is not None:
            what += f" [compiled in {f.compile_s:.0f} s]"
        rows.append(f"| {f.part} | {what} | {f.median_ms:.2f} | {f.p10_ms:.2f}-{f.p90_ms:.2f} | {speed} | "
                    f"{_x(f.predicted_speedup)} | {f.peak_gpu_mib / 1024:.2f} GiB |")
    skipped = "".join(f"\n- skipped {name}: {why}" for name, why in report.skipped.items())
    skipped += "".join(f"\n- FAILED {name}: {why}" for name, why in report.failed.items())
    return (before_markdown(report) + "\n" + head + summary + parity_markdown(report.parity) + table
            + "\n".join(rows) + "\n" + skipped + "\n")


def rtx_reason(capability: str) -> str | None:
    """Why TensorRT-RTX engines cannot run here, or None when they can."""
    from atedm_export.compile import EngineUnavailable, load_library

    try:
        library = load_library("tensorrt-rtx")
    except EngineUnavailable as exc:
        return str(exc)
    if capability not in library.targets():
        return f"TensorRT-RTX {library.version} does not target {capability} (it targets {', '.join(library.targets())})"
    return None


# ---- the run ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="sdxl-base-1024")
    parser.add_argument("--schedules", default="paper,dagger,uniform-63",
                        help="the schedules the stages part times (the first is the main one: parity, map layer, compile)")
    parser.add_argument("--impls", default="explicit,kernels", help="map_impl forms to time (explicit, kernels)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=420,
                        help="a part starts only where about its time is left of this (NEEDS_S)")
    parser.add_argument("--parts", default=DEFAULT_PARTS, help=f"comma-separated, of: {', '.join(ALL_PARTS)}")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="time figures from CUDA-graph replays (GPU only; the eager part times both)")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode (inductor): default, max-autotune-no-cudagraphs, ...")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: a smoke run)")
    parser.add_argument("--compile-limit-s", type=float, default=180,
                        help="the compile part stops what has not compiled and been timed by then")
    parser.add_argument("--parity-atol", type=float, default=1e-2)
    parser.add_argument("--parity-rtol", type=float, default=1e-2)
    parser.add_argument("--peak-scale", type=float, default=3.0,
                        help="parity's peaked input: the unit input times this (logits times its square)")
    parser.add_argument("--compare", default="sdxl-base-1024-tome",
                        help="specs (comma-separated; '' for none) whose stages the eager part times beside --spec's: "
                             "another method on the same model and resolution (ToMe at the same FLOPs by default)")
    parser.add_argument("--cost-device", help="cost model entry for the predictions [default: by the GPU's name; "
                                              "'none': no predictions]")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a smoke run of the script's code paths (tests), no GPU figures")
    parser.add_argument("--compile-child", choices=("stock", *IMPLS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.parts_list = [p for p in args.parts.split(",") if p]
    unknown = [p for p in args.parts_list if p not in ALL_PARTS]
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; expected some of: {', '.join(ALL_PARTS)}")
    args.impls_list = [i for i in args.impls.split(",") if i]
    if not args.impls_list or any(i not in IMPLS for i in args.impls_list):
        parser.error(f"--impls: expected some of {', '.join(IMPLS)}, got '{args.impls}'")
    args.schedules_list = [s for s in args.schedules.split(",") if s]
    if not args.schedules_list:
        parser.error("--schedules: expected at least one schedule")
    args.parser = parser
    return args


def main_spec(args: argparse.Namespace):  # noqa: ANN201
    spec = load_spec(args.spec).model_copy(update={"batch": args.batch, "precision": args.precision})
    return spec.with_schedule(args.schedules_list[0])


STOPPING = threading.Event()


def _stop(signum: int, _frame: object) -> None:
    """SIGTERM (``timeout`` in gpu-check.sh) as an exit: the parts' ``finally`` stop the compile children and save."""
    STOPPING.set()
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU visible to torch; nothing to measure", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.compile_child:
        return compile_child(args)
    spec = main_spec(args)
    args.compare_specs = [load_spec(c).model_copy(update={"batch": args.batch, "precision": args.precision})
                          for c in args.compare.split(",") if c] if "eager" in args.parts_list else []
    for other in args.compare_specs:
        if (other.model, other.height, other.width) != (spec.model, spec.height, spec.width):
            args.parser.error(f"--compare {other.name}: {other.model} at {other.width}x{other.height}; expected "
                              f"{spec.model} at {spec.width}x{spec.height}, as --spec")
    cuda = args.device == "cuda"
    capability = "sm{}{}".format(*torch.cuda.get_device_capability()) if cuda else "cpu"
    report = Report(spec.name, spec.batch, [spec.width, spec.height], spec.precision,
                    torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
                    capability, torch.__version__,
                    replay="CUDA graph" if cuda and args.cuda_graphs else "none (eager calls)")
    print(before_markdown(report), flush=True)  # today's figures first
    start = time.perf_counter()
    parts = args.parts_list

    def may_start(name: str, needs: float | None = None) -> bool:
        left = args.budget_s - (time.perf_counter() - start)
        needs = NEEDS_S.get(name, 1) if needs is None else needs
        if left < needs:
            report.skipped[name] = (f"time budget: {max(0.0, left):.0f} s of --budget-s {args.budget_s:.0f} left, "
                                    f"it needs about {needs:.0f} s")
            return False
        return True

    impls = list(args.impls_list)
    if "kernels" in impls and set(parts) & set(NEW_PARTS):
        reason = kernels_reason(args.device)
        if reason:
            impls.remove("kernels")
            report.skipped["map_impl kernels"] = reason
    report.impls = impls

    pending = None
    cost_device = args.cost_device or (entry_for(report.gpu) if cuda else "cpu")
    if not set(parts) & {"stages", "compile", "eager"}:
        pass  # no figure of these parts has a prediction beside it
    elif cost_device and cost_device.lower() != "none":
        # on the CPUs while the GPU measures: flops_report counts every schedule on the meta device (seconds each)
        pending = Predictions(args.spec, args.batch, args.precision, args.schedules_list, cost_device)
    elif args.cost_device is None:
        report.skipped["predictions"] = f"the cost model has no entry for {report.gpu} (pass --cost-device)"

    bench = Bench(spec, args)
    try:
        if set(parts) & {"parity", "map-layer", "kernels", "stages", "eager"}:
            with part(report, "load", args.out):
                _ = bench.unet, bench.feed
        if "parity" in parts and may_start("parity"):
            with part(report, "parity", args.out):
                parity(report, bench, impls)
        if "map-layer" in parts and may_start("map-layer"):
            with part(report, "map-layer", args.out):
                map_layer_part(report, bench, impls)
        if "kernels" in parts and "kernels" in impls and may_start("kernels"):
            with part(report, "kernels", args.out):
                kernels_part(report, bench)
        elif "kernels" in parts and "kernels" not in impls:
            report.skipped["kernels"] = "map_impl kernels cannot run here"
        if "stages" in parts and may_start("stages"):
            with part(report, "stages", args.out):
                stages_part(report, bench, impls, args.schedules_list)
        if "compile" in parts and may_start("compile"):
            left = args.budget_s - (time.perf_counter() - start) - (NEEDS_S["eager"] if "eager" in parts else 0)
            limit = min(args.compile_limit_s, max(left, NEEDS_S["compile"]))
            with part(report, "compile", args.out):
                compile_part(report, bench, impls, limit)
        if "eager" in parts and may_start("eager"):
            with part(report, "eager", args.out):
                eager(report, bench, args)
        if set(parts) & {"onnxruntime", "engines"}:
            del bench
            free_memory()
        if "onnxruntime" in parts:
            import onnxruntime as ort

            if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
                report.skipped["onnxruntime-cuda"] = ("onnxruntime here has no CUDAExecutionProvider "
                                                      f"({', '.join(ort.get_available_providers())}): install onnxruntime-gpu")
            elif may_start("onnxruntime"):
                with part(report, f"onnxruntime-{args.device}", args.out):
                    onnxruntime_cuda(report, build(spec, args.out, "onnx", ()), args)
        if "engines" in parts:
            reason = rtx_reason(capability) if cuda else "engines run on a GPU only"
            if reason:
                report.skipped["tensorrt-rtx"] = reason
            elif may_start("engines"):
                with part(report, "tensorrt-rtx", args.out):
                    engines(report, build(spec, args.out, "tensorrt-rtx", (capability,)), args)
    finally:
        wait_s = 1.0 if STOPPING.is_set() else max(30.0, args.budget_s - (time.perf_counter() - start))
        eager_impl = "kernels" if cuda and kernels_reason(args.device) is None else "explicit"  # what auto takes
        collect_predictions(report, pending, spec.dsap.name, wait_s, eager_impl)
        save(report, args.out)
    print(markdown(report))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
