"""The GPU figures of one machine, each pair measured side by side in one run: what ``tools/gpu-check.sh`` runs.

    python tools/gpu_bench.py --out gpu-check-out            # SDXL 1024², batch 2, fp16, random weights

1. eager: the stock diffusers UNet on SDPA (fused attention: the baseline users run) vs the same UNet
   with each DSAP stage's AT-EDM plan applied, on the same inputs; and the map layer alone (the first
   layer's self-attention with its map, G-WPR, selection, recovery) beside the stock self-attention, at
   each pruned block shape;
2. onnxruntime's CUDA provider: the unpruned and main-stage graphs, each with attention fused by
   onnxruntime's optimizer and plain; each against the unpruned graph of the same form;
3. engines: the same build compiled with TensorRT-RTX for this GPU, when the GPU is one of its targets
   (run with CUDA graphs off and on, weights resident and cycled).

Beside each measured speedup stands the cost model's prediction for this GPU (``costmodel.py``: H100 and
H200 by name; ``--cost-device`` for another).

Each figure is the median of ``--repeats`` timed calls (CUDA events) after ``--warmup`` calls; its peak is
the device-wide peak of used GPU memory while it loads and runs, above what was in use before
(``cudaMemGetInfo`` sampled every 5 ms, so allocations of onnxruntime and TensorRT count too). A part
that cannot run here is skipped with the reason; one that would overrun ``--budget-s`` too. Writes
``gpu-bench.json`` and ``gpu-bench.md`` (the table for docs/benchmarks.md) under ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atedm_export.bench import percentile, time_calls, time_ms  # noqa: E402
from atedm_export.dsap import stage_plan  # noqa: E402
from atedm_export.models import attention_blocks, load_unet  # noqa: E402
from atedm_export.pruning import set_plan  # noqa: E402
from atedm_export.pruning.methods import label_of  # noqa: E402
from atedm_export.spec import load_spec  # noqa: E402

MiB = 2**20


@dataclass
class Figure:
    part: str  # eager | onnxruntime-cuda | tensorrt-rtx
    what: str  # stock UNet, AT-EDM main stage...
    median_ms: float
    p10_ms: float
    p90_ms: float
    peak_gpu_mib: float
    speedup: float | None = None  # against the part's unpruned figure
    predicted_speedup: float | None = None  # the cost model's, for the same pair on this GPU


@dataclass
class Report:
    spec: str
    batch: int
    resolution: list[int]
    precision: str
    gpu: str
    capability: str
    torch: str
    figures: list[Figure] = field(default_factory=list)
    predicted: dict[str, float] = field(default_factory=dict)  # graph → cost model speedup vs fused baseline
    cost_device: str | None = None
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


def figure(part: str, what: str, samples: list[float], peak: PeakMemory) -> Figure:
    return Figure(part, what, statistics.median(samples), percentile(samples, 0.1), percentile(samples, 0.9), peak.mib)


@contextmanager
def part(report: Report, name: str, out: Path) -> Iterator[None]:
    """Time a part and save after it; a part that fails is recorded and the next one still runs."""
    tick = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - one broken part must not cost the others' figures
        traceback.print_exc()
        report.failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        report.seconds[name] = round(time.perf_counter() - tick, 1)
        free_memory()
        save(report, out)
        print(f"[{time.strftime('%H:%M:%S')}] {name} done in {report.seconds[name]} s", flush=True)


def eager(report: Report, spec, args: argparse.Namespace) -> None:  # noqa: ANN001
    """Stock vs AT-EDM (and the ``--compare`` specs' methods, ToMe at the same FLOPs by default) in PyTorch: one
    UNet, each plan swapped in and out (``set_plan``) between timings."""
    with PeakMemory() as load_peak:
        unet = load_unet(spec.model, dtype=spec.dtype, device=args.device, seed=spec.seed).eval()
    contract = spec.contract(dict(unet.config))
    feed = contract.example_feed(seed=1, device=args.device)
    graph = contract.module(unet)
    blocks = attention_blocks(unet, spec.height, spec.width)
    plans = {"stock UNet": None}
    for each in [spec, *args.compare_specs]:
        for stage in each.dsap.stages:
            plan = stage_plan(stage, blocks, each.pruning)
            if plan is not None and plan.keep:
                plans[f"{label_of(each.method)} {stage.name} stage"] = plan
    call = lambda: graph(*graph.args(feed))  # noqa: E731
    with torch.no_grad():
        for what, plan in plans.items():
            set_plan(unet, plan)
            timed(report, what, call, args, load_peak.base)
        set_plan(unet, None)
        for other in args.compare_specs:
            tomesd_reference(report, other, unet, call, args, load_peak.base)


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


def map_layer(report: Report, spec, args: argparse.Namespace) -> None:  # noqa: ANN001
    """The map layer alone vs the stock self-attention (SDPA) it replaces, at each pruned block's shape."""
    from atedm_export.pruning.attention import attention_with_map
    from atedm_export.pruning.gwpr import gwpr_scores
    from atedm_export.pruning.recover import recovery_sources
    from atedm_export.pruning.select import select_tokens

    unet = load_unet(spec.model, dtype=spec.dtype, device=args.device, seed=spec.seed).eval()
    options = spec.pruning
    main_stage = next(s for s in spec.dsap.stages if s.name == "main")
    plan = stage_plan(main_stage, attention_blocks(unet, spec.height, spec.width), options)
    shapes = {}
    for block in attention_blocks(unet, spec.height, spec.width):
        if block.name in plan.keep:
            shapes.setdefault((block.tokens, plan.keep[block.name]), block.name)
    for (tokens, keep), name in shapes.items():
        attn = unet.get_submodule(name).transformer_blocks[0].attn1
        x = torch.randn(spec.batch, tokens, attn.to_q.in_features, dtype=spec.dtype, device=args.device)

        def pays() -> None:
            _, mean = attention_with_map(attn, x, None, options.heads, options.map_output)
            kept = select_tokens(gwpr_scores(mean, options.iterations, options.damping), keep, options.selection)
            recovery_sources(mean, kept)

        with torch.no_grad():
            for what, call in ((f"stock self-attention, {tokens} tokens", lambda: attn(x)),
                               (f"map layer, {tokens} tokens (keeps {keep})", pays)):
                with PeakMemory() as peak:
                    samples = time_ms(call, torch.device(args.device), args.warmup, args.repeats)
                report.figures.append(figure("map-layer", what, samples, peak))
    del unet
    free_memory()


def predictions(report: Report, spec, name: str | None) -> None:  # noqa: ANN001
    """The cost model's speedups for this GPU (stage vs fused baseline), to stand beside the measured ones."""
    from atedm_export.costmodel import device
    from atedm_export.flops import flops_report

    if name is None:
        return
    dev = device(name)
    result = flops_report(spec, (dev,)).predictions[0]
    report.cost_device = dev.name
    report.predicted = {stage: result.speedup(stage) for stage in result.stages}


def cost_device_for(gpu: str) -> str | None:
    """The cost model's entry for the GPU torch names (H100, H200, A100, L40S, RTX 4090), else None."""
    from atedm_export.costmodel import DEVICES

    label = gpu.lower().replace(" ", "")
    return next((key for key in DEVICES if key in label), None)


def build(spec, out: Path, backend: str, targets: tuple[str, ...]) -> Path:  # noqa: ANN001
    from atedm_export.build import BuildRequest
    from atedm_export.build import build as run_build

    folder = out / f"build-{backend}"
    # plans keep their weights: 'cycled' reloads them from the plan (stripped plans are refitted from the ONNX)
    run_build(BuildRequest(spec, folder, backend=backend, targets=targets, stages=("main",), force=True,
                           strip_weights=False, ort_fusion=backend == "onnx"),
              progress=lambda name, text, seconds: print(f"    {name}: {text}", flush=True))
    return folder


def timed_graphs(folder: Path, backend_name: str, args: argparse.Namespace, graphs: list[str] | None = None,
                 alternate: bool = False, **options: object) -> dict[str, list[float]]:
    """Load a backend for the build, time the graphs; the backend is gone when this returns. With
    ``alternate``, also every graph once in turn per sample (what a stage switch costs: key "alternating")."""
    from atedm_export.manifest import Manifest
    from atedm_export.runtime.backends import load_backend

    manifest = Manifest.load(folder)
    backend = load_backend(backend_name, folder, manifest, args.device, **options)
    feed = manifest.contract.example_feed(seed=1, device=args.device)
    samples = {}
    for name in graphs or [entry.name for entry in manifest.graphs()]:
        samples[name] = time_calls(backend, name, feed, args.warmup, args.repeats)
        backend.release()
    if alternate:
        names = list(samples)
        samples["alternating"] = time_ms(lambda: [backend.run(name, feed) for name in names], backend.device,
                                         args.warmup, args.repeats)
    return samples


def onnxruntime_cuda(report: Report, folder: Path, args: argparse.Namespace) -> None:
    """One graph per session, so each peak is that graph's own; every graph in its fused and its plain form."""
    from atedm_export.manifest import Manifest

    for fused in (True, False):
        for entry in Manifest.load(folder).graphs():
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
    """The DSAP stage a figure times (for its predicted speedup), or None."""
    for prefix in ("AT-EDM ",):  # the predictions are the main spec's (AT-EDM) stages
        if what.startswith(prefix):
            return what[len(prefix):].split(" ")[0]
    return None


def speedups(report: Report) -> None:
    """Each figure against the fastest unpruned figure of its part (any form or mode), measured in the same run."""
    for fig in report.figures:
        if fig.what.startswith("every graph"):
            continue  # a sum of different graphs: nothing to divide by
        bases = [f.median_ms for f in report.figures if f.part == fig.part and f.what.startswith(("stock UNet", "unpruned"))]
        fig.speedup = min(bases) / fig.median_ms if bases else None
        stage = _stage_of(fig.what)
        fig.predicted_speedup = report.predicted.get(stage) if stage else None
    for fig in report.figures:  # the map layer against the stock self-attention of its shape
        if fig.part == "map-layer" and fig.what.startswith("map layer"):
            tokens = fig.what.split(", ")[1].split(" ")[0]
            stock = next(f for f in report.figures if f.part == "map-layer" and f.what == f"stock self-attention, {tokens} tokens")
            fig.speedup = stock.median_ms / fig.median_ms


def save(report: Report, out: Path) -> None:
    """Write what is measured so far: a part cut short by the time limit keeps the parts before it."""
    speedups(report)
    (out / "gpu-bench.json").write_text(json.dumps({**asdict(report), "machine": platform.node()}, indent=2))
    (out / "gpu-bench.md").write_text(markdown(report))


def markdown(report: Report) -> str:
    head = (f"{report.spec}, {report.resolution[0]}×{report.resolution[1]}, batch {report.batch}, {report.precision}, "
            f"random weights; {report.gpu} ({report.capability}), torch {report.torch}\n\n"
            f"| part | what | median ms / call | p10-p90 ms | speedup vs fastest unpruned | predicted on "
            f"{report.cost_device or '-'} | peak GPU memory |\n"
            "|---|---|---|---|---|---|---|\n")
    rows = [f"| {f.part} | {f.what} | {f.median_ms:.1f} | {f.p10_ms:.1f}-{f.p90_ms:.1f} | "
            f"{f'{f.speedup:.2f}×' if f.speedup else '-'} | "
            f"{f'{f.predicted_speedup:.2f}×' if f.predicted_speedup else '-'} | {f.peak_gpu_mib / 1024:.2f} GiB |"
            for f in report.figures]
    skipped = "".join(f"\n- skipped {name}: {why}" for name, why in report.skipped.items())
    skipped += "".join(f"\n- FAILED {name}: {why}" for name, why in report.failed.items())
    return head + "\n".join(rows) + "\n" + skipped + "\n"


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="sdxl-base-1024")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=480, help="skip a part that would start after this")
    parser.add_argument("--parts", default="eager,map-layer,onnxruntime,engines")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="also time each eager figure captured in a CUDA graph (GPU only)")
    parser.add_argument("--compare", default="sdxl-base-1024-tome",
                        help="specs (comma-separated; '' for none) whose stages the eager part times beside --spec's: "
                             "another method on the same model and resolution (ToMe at the same FLOPs by default)")
    parser.add_argument("--cost-device", help="cost model entry for the predictions [default: by the GPU's name]")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a smoke run of the script's code paths (tests), no GPU figures")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU visible to torch; nothing to measure", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    spec = load_spec(args.spec).model_copy(update={"batch": args.batch, "precision": args.precision})
    args.compare_specs = [load_spec(c).model_copy(update={"batch": args.batch, "precision": args.precision})
                          for c in args.compare.split(",") if c]
    for other in args.compare_specs:
        if (other.model, other.height, other.width) != (spec.model, spec.height, spec.width):
            parser.error(f"--compare {other.name}: {other.model} at {other.width}x{other.height}; expected "
                         f"{spec.model} at {spec.width}x{spec.height}, as --spec")
    cuda = args.device == "cuda"
    capability = "sm{}{}".format(*torch.cuda.get_device_capability()) if cuda else "cpu"
    report = Report(spec.name, spec.batch, [spec.width, spec.height], spec.precision,
                    torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
                    capability, torch.__version__)
    start = time.perf_counter()
    parts = args.parts.split(",")
    over = lambda: time.perf_counter() - start > args.budget_s  # noqa: E731
    with part(report, "predictions", args.out):
        predictions(report, spec, args.cost_device or (cost_device_for(report.gpu) if cuda else "cpu"))
    if "eager" in parts:
        with part(report, "eager", args.out):
            eager(report, spec, args)
    if "map-layer" in parts:
        with part(report, "map-layer", args.out):
            map_layer(report, spec, args)
    if "onnxruntime" in parts:
        import onnxruntime as ort

        if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
            report.skipped["onnxruntime-cuda"] = ("onnxruntime here has no CUDAExecutionProvider "
                                                  f"({', '.join(ort.get_available_providers())}): install onnxruntime-gpu")
        elif over():
            report.skipped["onnxruntime-cuda"] = f"time budget of {args.budget_s:.0f} s spent before it started"
        else:
            with part(report, f"onnxruntime-{args.device}", args.out):
                onnxruntime_cuda(report, build(spec, args.out, "onnx", ()), args)
    if "engines" in parts:
        reason = rtx_reason(capability) if cuda else "engines run on a GPU only"
        if reason:
            report.skipped["tensorrt-rtx"] = reason
        elif over():
            report.skipped["tensorrt-rtx"] = f"time budget of {args.budget_s:.0f} s spent before it started"
        else:
            with part(report, "tensorrt-rtx", args.out):
                engines(report, build(spec, args.out, "tensorrt-rtx", (capability,)), args)
    save(report, args.out)
    print(markdown(report))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
