"""``atedm-export build``: spec → model → stage plans → ONNX per stage → engines → manifest.

Everything is written into a hidden sibling folder and renamed into place only when the whole build
succeeded, so an error, a full disk or Ctrl-C never leaves a half build where a runtime could load it.
A model over 1 GB of weights is exported by a process of its own that loads the UNet and exits
(``isolated.py``; smaller ones export here), the cleaner here sees a weight-free skeleton, and each
engine is built by a process of its own, so the weights exist once in memory at any time and each
heavy step's peak is its own. All graphs go
into ``onnx/`` and point into one shared weights file (``weights.py``); engines go into ``engines/``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .compile import BuildOptions, EngineLibrary, EngineUnavailable, build_isolated, load_library
from .dsap import stage_plan
from .errors import AtedmError
from .contract import GraphContract
from .export import EXTERNAL_DATA_BYTES, Form, check_onnx, export_graph, finalize
from .kernels.onnxruntime_ops import plugin_nodes
from .isolated import run_isolated
from .flops import count_flops, graph_flops
from .ortfuse import fuse
from .lora import check_loras
from .buildfolder import (MANIFEST, EngineInfo, FileEntry, GraphEntry, LoraEntry, Manifest, ShapeGraphs, TensorEntry,
                          file_entry, lora_entry, pipeline_info, tool_versions, write_manifest)
from .buildfolder.layout import ENGINES_DIR, GRAPHS_DIR, WEIGHTS_FILE, engine_file, graph_file, graph_label
from .models import PIPELINE_INDEX, attention_blocks, build_unet, pipeline_folder, unet_config
from .pruning import AtedmOptions, StagePlan
from .registry import BUILD_LIBRARIES, ENGINE_LIBRARIES
from .shapes import Shape
from .spec import GraphSpec
from .staging import check_destination, staged_folder
from .userfiles import load_onnx
from .weights import WeightStore

Progress = Callable[[str, str, float | None], None]  # (graph, what happened, seconds)


@dataclass(frozen=True)
class BuildRequest:
    spec: GraphSpec
    out: Path
    library: str = "auto"  # the engine library: auto | tensorrt | tensorrt-rtx | onnx (graphs only, no engines)
    targets: tuple[str, ...] = ()
    stages: tuple[str, ...] = ()  # empty = every stage of the schedule
    force: bool = False
    optimization_level: int = 3
    workspace_gib: float | None = None
    timing_cache: Path | None = None
    strip_weights: bool | None = None  # None: strip when the weights pass 2 GB and a GPU is present
    ort_fusion: bool | None = None  # onnxruntime's fused form of each graph; None: where weights pass ISOLATE_BYTES
    refittable_engines: bool = False  # plans that take other weights (BuilderFlag.REFIT): what refit and use_weights need
    plugin_form: bool = False  # also each pruned graph's plugin form: the map layer as the kernels' atedm nodes


def _silent(graph: str, event: str, seconds: float | None) -> None:
    del graph, event, seconds


ISOLATE_BYTES = 1 << 30  # models with more weights are exported in a process of their own


def export_stage(spec: GraphSpec, plan: StagePlan | None, contract: GraphContract, raw: Path,
                 weight_bytes: int, form: Form = "portable") -> int | None:
    """Export one graph to ``raw``; returns the exporting process's peak bytes (None: exported here).

    Over ``ISOLATE_BYTES`` of weights the export runs in a process of its own (``isolated.py``), which takes
    the exporter's leftovers with it when it exits. Smaller models are exported here, where those
    leftovers are small and a child's start (torch and diffusers imports, ~8 s) would dominate.
    """
    loras = tuple(spec.loras)  # fused into the UNet before export (lora.py)
    if weight_bytes > ISOLATE_BYTES:
        return run_isolated(export_graph, spec.model, spec.seed, plan, contract, raw, loras, form,
                            what="export").peak_rss
    export_graph(spec.model, spec.seed, plan, contract, raw, loras, form)
    return None


def check_plugin_form(spec: GraphSpec) -> None:
    """Refuse ``--plugin-form`` (one line, before any work) where the kernels do not compute the spec's map layer."""
    options = spec.pruning
    if spec.method != "atedm":
        raise AtedmError(f"--plugin-form writes AT-EDM's map layer as its kernels' nodes; this spec's method is "
                         f"{spec.method}, which has no map layer")
    if options.heads != "mean" or options.map_pool != 1:
        raise AtedmError(f"--plugin-form: the kernels compute the head-mean map without pooling; this spec asks "
                         f"heads '{options.heads}', map_pool {options.map_pool}")


def resolve_engine(request: BuildRequest) -> tuple[EngineLibrary | None, EngineInfo]:
    """The engine library to build with, or None and the reason engines are skipped.

    Only ``auto`` falls back to graphs only; a library named explicitly that cannot build here is an
    error before anything is exported, not minutes of export ending in "engines skipped".
    """
    wanted = request.library
    if wanted not in BUILD_LIBRARIES:
        raise AtedmError(f"unknown engine library '{wanted}'; expected one of: {', '.join(BUILD_LIBRARIES)}")
    if wanted == "onnx":
        return None, EngineInfo(library=None, skipped="--library onnx: ONNX graphs only")
    candidates = ENGINE_LIBRARIES if wanted == "auto" else (wanted,)
    reasons = []
    for name in candidates:
        try:
            library = load_library(name)
            library.check_targets(request.targets)
        except EngineUnavailable as exc:
            if wanted != "auto":
                raise
            reasons.append(str(exc))
            continue
        info = EngineInfo(library=name, module=library.api.module, version=library.version,
                          targets=list(request.targets), optimization_level=request.optimization_level,
                          **engine_form(library, request.plugin_form))
        return library, info
    return None, EngineInfo(library=None, skipped="; ".join(reasons))


def build_inputs(spec: GraphSpec) -> dict[str, Path | None]:
    """What a build reads from the user's disk: the model (a local folder or file) and each LoRA file."""
    model = Path(spec.model).expanduser()
    inputs: dict[str, Path | None] = {"model": model if model.exists() else None}
    inputs.update({f"LoRA {index + 1}": Path(item.file) for index, item in enumerate(spec.loras)})
    return inputs


def engine_form(library: EngineLibrary, plugin_form: bool) -> dict[str, str | None]:
    """The graph form a build's engines are made from, and why it is not the plugin form where it is not."""
    if plugin_form and library.api.plugin_refusal is None:
        return {"form": "plugin", "form_reason": None}
    reason = library.api.plugin_refusal or "the build writes no plugin form (--plugin-form)"
    return {"form": "portable", "form_reason": reason}


def _cheaper_portable(spec: GraphSpec, form: str) -> str:
    """A hint where engines carry the portable form one head at a time: the batched form launches fewer kernels."""
    if form != "portable" or not isinstance(spec.pruning, AtedmOptions) or spec.pruning.map_batch != "head":
        return ""
    return "; --map-batch all exports it with every head's map in one product, fewer kernels"


def _select_stages(request: BuildRequest) -> list[int]:
    names = [s.name for s in request.spec.dsap.stages]
    unknown = [s for s in request.stages if s not in names]
    if unknown:
        raise AtedmError(f"unknown stage '{unknown[0]}'; the schedule has: {', '.join(names)}")
    return [i for i, n in enumerate(names) if not request.stages or n in request.stages]


@dataclass(frozen=True)
class _ShapePlan:
    """One static shape of the build: the spec at that shape, its attention blocks and each selected stage's plan."""

    shape: Shape
    spec: GraphSpec  # single-shape
    blocks: list
    plans: dict[int, StagePlan]  # schedule index → plan, for the selected stages



@dataclass(frozen=True)
class _Model:
    """What is known of the model before any export: its skeleton (meta device) and every shape's plans."""

    meta: torch.nn.Module
    shapes: list[_ShapePlan]
    pipeline: Path | None  # the diffusers pipeline folder generate will load around the UNet
    loras: tuple[LoraEntry, ...] = ()  # the spec's LoRAs, checked against the skeleton, with their checksums


def _prepare(request: BuildRequest, selected: list[int]) -> _Model:
    """Every check that needs the model but not its weights: the config loads, each selected stage's keys
    match blocks at every shape. A typo in a schedule fails here, in a second, not after minutes of export."""
    spec = request.spec
    meta = build_unet(unet_config(spec.model), device="meta")
    check_loras(spec.loras, meta)  # a tensor the UNet lacks or cannot take: one line, before any export
    loras = tuple(lora_entry(item.file, item.scale) for item in spec.loras)
    shapes = []
    for shape in spec.shape_list:
        at = spec.at(shape)
        blocks = attention_blocks(meta, at.height, at.width)
        try:
            plans = {i: stage_plan(spec.dsap.stages[i], blocks, at.pruning) for i in selected}
        except AtedmError as exc:
            if not spec.shapes:
                raise
            raise type(exc)(f"shape {shape.key}: {exc}") from None
        shapes.append(_ShapePlan(shape, at, blocks, plans))
    return _Model(meta, shapes, pipeline_folder(spec.model), loras)


#: onnxruntime's UNet fusion packs an fp16 attention's biases at twice their size (1.32: "Raw data size does not
#: match tensor's size", full SDXL fp16), and a CPU session casts fp16 graphs to fp32 anyway: fp32 graphs only.
ORT_FUSION_PRECISIONS = ("fp32",)


def build(request: BuildRequest, progress: Progress = _silent) -> Manifest:
    """Run the whole build; returns the manifest of the folder now at ``request.out``.

    The spec, the stages, the engine library, the model's config and every stage's plan at every shape are
    checked, and the output folder tested for writing, before anything is written.
    """
    out = request.out.resolve()
    if request.plugin_form:
        check_plugin_form(request.spec)
    if request.ort_fusion and request.spec.precision not in ORT_FUSION_PRECISIONS:
        raise AtedmError(f"--ort-fusion takes {', '.join(ORT_FUSION_PRECISIONS)} graphs; onnxruntime's UNet fusion "
                         f"mis-sizes {request.spec.precision} attention weights (pass --no-ort-fusion or --precision fp32)")
    selected = _select_stages(request)
    library, engine_info = resolve_engine(request)
    model = _prepare(request, selected)
    check_destination(out, request.force, MANIFEST, build_inputs(request.spec))
    if model.pipeline is None and Path(request.spec.model).expanduser().is_dir():
        progress("model", f"{request.spec.model} has no {PIPELINE_INDEX} in it or its parent: the graphs build, "
                          "but generate needs the pipeline's VAE and text encoders", None)
    if library is not None:
        why = f": {engine_info.form_reason}" if engine_info.form_reason else ""
        hint = _cheaper_portable(request.spec, engine_info.form)
        progress("engines", f"built from each graph's {engine_info.form} form{why}{hint} (docs/build.md)", None)
    with staged_folder(out) as work:
        return _build_into(work, request, model, library, engine_info, progress)


@dataclass
class _GraphMaker:
    """Exports, checks, fuses and compiles one graph at a time into the build folder ``work``.

    Every graph's weights go into the one ``store``; a graph whose (shape, plan) was made already is not made
    again: the entry reuses its files (``same_as``), so identical graphs are stored once.
    """

    work: Path
    request: BuildRequest
    meta: torch.nn.Module
    store: WeightStore
    library: EngineLibrary | None
    options: BuildOptions
    ort_fusion: bool
    weight_bytes: int
    progress: Progress
    multi: bool
    made: dict[tuple, GraphEntry]

    def shape_key(self, at: _ShapePlan) -> str | None:
        """The shape's key in graph ids and labels (``buildfolder.layout``): only where the build has several."""
        return at.shape.key if self.multi else None

    def graph(self, at: _ShapePlan, name: str, plan: StagePlan | None, until: float | None, steps: range) -> GraphEntry:
        tokens = {b.name: b.tokens for b in at.blocks}
        keep = {b: (plan.keep.get(b, n) if plan else n) for b, n in tokens.items()}
        key = (at.shape, tuple(sorted(keep.items())))
        label = graph_label(name, self.shape_key(at))
        if key in self.made:
            first = self.made[key]
            self.progress(label, f"same graph as {first.name}: reuses its files", None)
            return first.model_copy(update={"name": name, "until": until, "steps": [steps.start, steps.stop],
                                            "same_as": first.same_as or first.name})
        entry = self._make(at, label, name, plan, keep, until, steps)
        self.made[key] = entry
        return entry

    def _make(self, at: _ShapePlan, label: str, name: str, plan: StagePlan | None, keep: dict[str, int],
              until: float | None, steps: range) -> GraphEntry:
        spec, store, work, progress = at.spec, self.store, self.work, self.progress
        contract = spec.contract(dict(self.meta.config))
        final = graph_file(work, name, self.shape_key(at))
        tick = time.perf_counter()
        # The UNet lives only in the export's own process; this one cleans a weight-free skeleton
        # of the graph and moves the weights into the shared file: they are never held twice.
        raw = final.parent / f".raw-{final.stem}" / "raw.onnx"
        raw.parent.mkdir()
        export_peak = export_stage(spec, plan, contract, raw, self.weight_bytes)
        stored, reused = store.size, store.reused
        path = finalize(raw, final, store)
        shutil.rmtree(raw.parent)
        export_seconds = time.perf_counter() - tick
        peak = f", exporter peak {export_peak / 1e9:.2f} GB" if export_peak else ""
        progress(label, f"exported: {(store.size - stored) / 1e9:.3f} GB new weights, "
                        f"{(store.reused - reused) / 1e9:.3f} GB shared{peak}", export_seconds)
        tick = time.perf_counter()
        check_onnx(path)
        graph = graph_flops(str(path), spec.batch) / 1e12
        module = count_flops(self.meta, spec.height, spec.width, spec.text_length, plan) / 1e12
        progress(label, f"checked: {graph * 1e3:.3f} GFLOPs/image-step in the graph", time.perf_counter() - tick)
        plugin = self._plugin_form(at, label, name, plan, contract) if self.request.plugin_form and plan else None
        ort = None
        if self.ort_fusion:
            tick = time.perf_counter()
            fused, counts = fuse(path, store)
            check_onnx(fused)
            ort = file_entry(work, fused)
            progress(label, f"onnxruntime fusion: {counts['Attention']} Attention, {counts['MultiHeadAttention']} "
                            f"MultiHeadAttention, {counts['Softmax']} Softmax left", time.perf_counter() - tick)
        engine, compile_seconds, compile_peak = None, None, None
        library = self.library
        if library is not None:
            store.flush()  # the builder maps the weights file
            target = "-".join(self.request.targets) or "local"
            engine_path = engine_file(work, name, self.shape_key(at), library.name, target)
            source, options = path, self.options
            if plugin is not None and library.api.plugin_refusal is None:  # the engine carries the kernels' plugins
                source, options = work / plugin.path, dataclasses.replace(options, plugins=True)
            progress(label, f"compiling the {'plugin' if options.plugins else 'portable'} form with {library.name} "
                            f"{library.version} for {target}", None)
            built = build_isolated(library, source, engine_path, options)
            compile_seconds, compile_peak = built.result, built.peak_rss
            engine = file_entry(work, engine_path)
            progress(label, f"engine {engine.bytes / 2**20:.1f} MiB, builder peak {built.peak_rss / 1e9:.2f} GB",
                     compile_seconds)
        return GraphEntry(
            name=name, shape=at.shape.key, until=until, steps=[steps.start, steps.stop], keep=keep,
            onnx=file_entry(work, path), ort_onnx=ort, plugin_onnx=plugin, engine=engine, graph_tflops=graph, module_tflops=module,
            export_seconds=export_seconds, compile_seconds=compile_seconds,
            export_peak_rss=export_peak, compile_peak_rss=compile_peak,
        )

    def _plugin_form(self, at: _ShapePlan, label: str, name: str, plan: StagePlan,
                     contract: GraphContract) -> FileEntry:
        """The graph's plugin form beside its portable one, its weights in the same shared file (stored once)."""
        tick = time.perf_counter()
        final = graph_file(self.work, name, self.shape_key(at), "plugin")
        raw = final.parent / f".raw-{final.stem}" / "raw.onnx"
        raw.parent.mkdir()
        export_stage(at.spec, plan, contract, raw, self.weight_bytes, form="plugin")
        path = finalize(raw, final, self.store)
        shutil.rmtree(raw.parent)
        check_onnx(path)
        nodes = plugin_nodes(load_onnx(path))
        self.progress(label, f"plugin form: the map layer as {len(nodes)} atedm nodes "
                             f"({', '.join(sorted({n.op_type for n in nodes}))})", time.perf_counter() - tick)
        return file_entry(self.work, path)

    def shape(self, at: _ShapePlan) -> ShapeGraphs:
        """The baseline and every selected stage of one shape."""
        spec = self.request.spec
        ranges = spec.dsap.step_ranges(spec.steps)
        baseline = self.graph(at, "baseline", None, None, range(0, spec.steps))
        stages = []
        for index, plan in at.plans.items():
            stage = spec.dsap.stages[index]
            stages.append(self.graph(at, stage.name, plan if plan.keep else None, stage.until, ranges[index]))
        contract = at.spec.contract(dict(self.meta.config))
        return ShapeGraphs(batch=at.shape.batch, height=at.shape.height, width=at.shape.width,
                           tokens={b.name: b.tokens for b in at.blocks},
                           inputs=[TensorEntry.of(t) for t in contract.inputs],
                           outputs=[TensorEntry.of(t) for t in contract.outputs], baseline=baseline, stages=stages)


def _build_into(
    work: Path,
    request: BuildRequest,
    model: _Model,
    library: EngineLibrary | None,
    engine_info: EngineInfo,
    progress: Progress,
) -> Manifest:
    spec = request.spec
    start = time.perf_counter()
    meta = model.meta
    strip = request.strip_weights
    gpu = torch.cuda.is_available()
    if strip and library is not None and not gpu:
        raise AtedmError("--strip-weights needs a GPU at build time (TensorRT-RTX compiles stripped plans on it); "
                         "build on the GPU machine or pass --keep-weights")
    weight_bytes = sum(p.numel() for p in meta.parameters()) * torch.finfo(spec.dtype).bits // 8
    if strip is None:
        strip = weight_bytes > EXTERNAL_DATA_BYTES and gpu
    options = BuildOptions(request.targets, request.optimization_level, request.workspace_gib, request.timing_cache, strip,
                           refittable=request.refittable_engines)
    if library is not None:
        engine_info = engine_info.model_copy(update={"weights_stripped": strip, "refittable": request.refittable_engines})
    # The optimizer takes ~25 s a graph whatever the model's width: worth it where a call takes seconds.
    ort_fusion = request.ort_fusion if request.ort_fusion is not None else (
        weight_bytes > ISOLATE_BYTES and spec.precision in ORT_FUSION_PRECISIONS)

    (work / GRAPHS_DIR).mkdir()
    (work / ENGINES_DIR).mkdir()
    store = WeightStore(work / GRAPHS_DIR / WEIGHTS_FILE)
    with store:  # closed on any error too; the staging folder then goes with it
        maker = _GraphMaker(work, request, meta, store, library, options, ort_fusion, weight_bytes, progress,
                            multi=len(model.shapes) > 1, made={})
        shapes = [maker.shape(at) for at in model.shapes]

    spec_data = spec.model_dump(mode="json")
    spec_data["schedule"] = spec.dsap.model_dump(mode="json")
    manifest = Manifest(
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        spec=spec_data,
        unet_config={k: v for k, v in dict(meta.config).items() if not k.startswith("_")},
        weights=file_entry(work, store.path),
        shapes=shapes,
        complete=len(model.shapes[0].plans) == len(spec.dsap.stages),
        engine=engine_info,
        versions=tool_versions(),
        build_seconds=time.perf_counter() - start,
        pipeline=pipeline_info(model.pipeline) if model.pipeline else None,
        loras=list(model.loras),
    )
    write_manifest(work, manifest)
    return manifest


__all__ = ["BuildRequest", "build", "resolve_engine"]
