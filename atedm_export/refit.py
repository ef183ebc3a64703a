"""``atedm-export refit``: a build's graphs with LoRAs fused into their weights, in seconds, not a rebuild.

A LoRA changes a few hundred of the UNet's weight tensors and nothing of its graph. So a refit build keeps
the graphs and the base weights file of the build it comes from, and writes only what the LoRAs change::

    NEW/manifest.json                the same shapes and stages; its LoRAs, its weights files, where it came from
    NEW/onnx/weights.onnx.data       the base weights: a hard link to BUILD's (a copy across filesystems)
    NEW/onnx/weights.refit.onnx.data the tensors the LoRAs changed (and a refit-of-a-refit's earlier ones)
    NEW/onnx/<graph>.onnx            BUILD's graph, its changed initializers pointing into the refit file
    NEW/engines/…                    weight-stripped refittable plans hard-linked; other plans rebuilt or dropped

Which initializer holds which parameter is found by content, never by name (``weights.find_parameters``): the
exporters rename weights (``onnx::MatMul_6471``) and store Linear weights transposed. The UNet is loaded as
BUILD has it (the spec's model and seed, BUILD's own LoRAs fused); each parameter the new LoRAs change is
looked up among the regions of the weights files the graphs reference, and one found nowhere, twice, or
sharing its bytes with another parameter is a one-line error naming it. The LoRAs are then fused with the
function builds use (``lora.fuse_loras``), so a refit build's weights are bit for bit those of a build with
the LoRAs in its spec.

onnxruntime's fused graphs (``ortfuse.py``) stack each self-attention's q/k/v weights into one new tensor.
Those stacks are found by content too, in the layout ``ortfuse.packed_qkv`` states, and rewritten from the
fused weights. Every tensor a fused graph holds beyond its plain graph's must be such a stack or all zeros
(its q/k/v biases); otherwise the fused graphs are dropped (``ort_onnx=None``: onnxruntime runs the plain
graphs) and the output says so, rather than keep a stale copy of a changed weight.

Engines: a weight-stripped plan built refittable (``EngineInfo.refittable``: ``BuilderFlag.REFIT``) holds
none of the weights, so it is hard-linked, and the runtime refits it from NEW's graphs at load. Any other plan
holds or assumes BUILD's weights (a stripped plan built for identical weights, ``REFIT_IDENTICAL``, would run
with other weights "unpredictably", in the libraries' words), so it is rebuilt where the library builds here,
else dropped with the reason (``engine.skipped``).
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from .errors import RefitError
from .lora import LoraError, check_loras, describe, fuse_loras
from .buildfolder import (MANIFEST, EngineInfo, FileEntry, GraphEntry, LoraEntry, Manifest, ManifestError, RefitInfo,
                          check_consistent, check_lora, file_entry, first_view, lora_entry, manifest_sha256, origin,
                          read_manifest, rewrite, sha256, tool_versions, check_graph_files, write_manifest)
from .buildfolder.layout import DELTA_FILE, ENGINES_DIR, GRAPHS_DIR
from .ortfuse import find_packed_qkv, packed_qkv, qkv_names, qkv_parts
from .spec import LoraSpec
from .staging import check_destination, staged_folder
from .weights import (HashedStore, Place, Region, StoredWeights, find_parameters, point_to, region_of, tensor_bytes,
                      tensor_layout)


Progress = Callable[[str, str, float | None], None]  # (phase: loras, graphs, weights, delta, engines; what happened; seconds)


@dataclass(frozen=True)
class RefitRequest:
    build: Path
    loras: tuple[LoraSpec, ...]
    out: Path
    force: bool = False


@dataclass
class RefitResult:
    manifest: Manifest
    seconds: float
    hashing_seconds: float  # sha256 of what was written (the delta as it was written, the graphs) and checked
    writing_seconds: float  # the delta, the graphs, the base weights' link (or copy), linked plans
    delta_bytes: int
    notes: list[str] = field(default_factory=list)  # what was not carried over as it was, and why


def _silent(phase: str, event: str, seconds: float | None) -> None:
    del phase, event, seconds


# --------------------------------------------------------------------------------------------------- graphs


@dataclass
class _Graphs:
    """BUILD's distinct graph files (plain and onnxruntime-fused), read without their weights."""

    models: dict[str, onnx.ModelProto]  # graph path (relative to the build) → graph
    fused_from: dict[str, str]  # fused graph path → the plain graph it was made from

    def regions(self, path: str) -> set[Region]:
        return {r for r in map(region_of, self.models[path].graph.initializer) if r is not None}

    def plain(self) -> list[str]:
        return [p for p in self.models if p not in self.fused_from]


def _read_graphs(build: Path, manifest: Manifest) -> _Graphs:
    """Every distinct graph file, checked against its sha256 (graph files are small), without external data."""
    models: dict[str, onnx.ModelProto] = {}
    fused_from: dict[str, str] = {}
    for entry in manifest.all_graphs():
        check_graph_files(build, entry, engine=False)
        for item in entry.forms():
            if item.path not in models:
                models[item.path] = onnx.load(str(build / item.path), load_external_data=False)
        if entry.ort_onnx is not None:
            fused_from[entry.ort_onnx.path] = entry.onnx.path
    return _Graphs(models, fused_from)


# ------------------------------------------------------------------------------------------------------- refit


def refit(request: RefitRequest, progress: Progress = _silent) -> RefitResult:
    """Write ``request.out``: BUILD's graphs with ``request.loras`` fused into their weights (module docstring).

    The LoRAs add to those BUILD already has (its spec's, earlier refits'); to swap one LoRA for another, refit
    the build without it. Every check that needs no weights (the build's manifest, each LoRA against the UNet's
    modules, BUILD's own LoRA files, the output folder) runs before anything is loaded or written.
    """
    start = time.perf_counter()
    build, out = request.build.resolve(), request.out.resolve()
    if not request.loras:
        raise RefitError("refit needs at least one LoRA (--lora FILE[:SCALE])")
    # the output first: no line of progress comes before a refusal of where it would go
    check_destination(out, request.force, owner_file=MANIFEST, inputs={
        "build": build, **{f"LoRA {index + 1}": Path(item.file) for index, item in enumerate(request.loras)}})
    manifest = read_manifest(build, verify=False)
    from .models import build_unet

    tick = time.perf_counter()
    meta = build_unet(manifest.unet_config, device="meta")
    changed = check_loras(request.loras, meta)
    entries = [lora_entry(item.file, item.scale) for item in request.loras]
    progress("loras", f"{describe(request.loras)}: {len(changed)} parameters change, "
                      f"{_param_bytes(meta, changed, manifest) / 1e6:.1f} MB", time.perf_counter() - tick)
    for lora in manifest.loras:
        check_lora(lora)  # BUILD's own: its weights are made again with them
    with staged_folder(out, what="refit") as work:
        return _Refit(build, manifest, request, entries, changed, work, progress, start).run(out)


def _param_bytes(meta: torch.nn.Module, names: list[str], manifest: Manifest) -> int:
    shapes = dict(meta.named_parameters())
    itemsize = torch.finfo(first_view(manifest).graph_spec.dtype).bits // 8
    return sum(shapes[n].numel() for n in names) * itemsize


@dataclass
class _Refit:
    build: Path
    manifest: Manifest
    request: RefitRequest
    entries: list[LoraEntry]
    changed: list[str]
    work: Path
    progress: Progress
    start: float
    notes: list[str] = field(default_factory=list)
    hashing: float = 0.0
    writing: float = 0.0

    def note(self, phase: str, text: str) -> None:
        self.notes.append(text)
        self.progress(phase, text, None)

    def run(self, out: Path) -> RefitResult:
        manifest, build, work = self.manifest, self.build, self.work
        (work / GRAPHS_DIR).mkdir()
        tick = time.perf_counter()
        graphs = _read_graphs(build, manifest)
        carried = self._check_weights()
        self.hashing += time.perf_counter() - tick
        self.progress("graphs", f"{len(graphs.plain())} graph files"
                                f"{f' (+{len(graphs.fused_from)} onnxruntime-fused)' if graphs.fused_from else ''} "
                                f"checked; weights {carried}", time.perf_counter() - tick)
        remap, delta_entry, fused_ok = self._write_weights(graphs)

        tick = time.perf_counter()
        files = self._write_graphs(graphs, remap, fused_ok)
        self.progress("graphs", f"{len(files)} graph files written, their changed weights pointing into {DELTA_FILE}",
                      time.perf_counter() - tick)
        tick = time.perf_counter()
        base = self._link(build / manifest.weights.path, work / manifest.weights.path, "base weights")
        self.progress("weights", f"{manifest.weights.path}: {base}", time.perf_counter() - tick)
        engine_info, plans = self._engines()
        result = self._manifest(delta_entry, files, engine_info, plans)
        return RefitResult(result, time.perf_counter() - self.start, self.hashing, self.writing, delta_entry.bytes,
                           self.notes)

    def _write_weights(self, graphs: _Graphs) -> tuple[dict[Region, int], FileEntry, bool]:
        """The UNet as BUILD holds it, its changed parameters found in BUILD's weights, the LoRAs fused, the delta
        written: each old region → its offset in the delta, the delta's entry, whether the fused graphs stay."""
        tick = time.perf_counter()
        from .models import load_unet

        spec, loras = first_view(self.manifest).graph_spec, self.manifest.loras
        unet = load_unet(spec.model, dtype=spec.dtype, seed=spec.seed, loras=loras)
        params = dict(unet.named_parameters())
        as_built = f" with {describe(loras)}" if loras else ""
        self.progress("model", f"{spec.model} (seed {spec.seed}, {spec.precision}){as_built}: as the build holds it",
                      time.perf_counter() - tick)
        weights = StoredWeights(self.build / GRAPHS_DIR, [Path(item.path).name for item in self.manifest.weight_files])
        try:
            tick = time.perf_counter()
            plain_regions = set().union(*(graphs.regions(p) for p in graphs.plain()))
            places = find_parameters(params, self.changed, weights, plain_regions)
            stacks, fused_ok = self._fused_stacks(graphs, params, places, weights, plain_regions)
            moved = sum(len(p) for p in places.values())
            self.progress("match", f"every changed parameter found by content: {moved} stored tensors "
                                   f"({sum(pl.transposed for p in places.values() for pl in p)} transposed)"
                                   + (f", {len(stacks)} onnxruntime q/k/v stacks" if stacks else ""),
                          time.perf_counter() - tick)

            tick = time.perf_counter()
            fuse_loras(unet, self.request.loras)
            self.progress("fuse", describe(self.request.loras), time.perf_counter() - tick)

            tick = time.perf_counter()
            delta = HashedStore(self.work / GRAPHS_DIR / DELTA_FILE)
            with delta:
                remap = self._write_delta(delta, params, places, stacks, graphs, weights, fused_ok)
                entry = FileEntry(path=os.path.relpath(delta.path, self.work), sha256=delta.hexdigest(),
                                  bytes=delta.path.stat().st_size)
            self.hashing += delta.hash_seconds  # on a thread of its own, alongside the writing
            self.writing += time.perf_counter() - tick
            self.progress("delta", f"{len(remap)} tensors, {entry.bytes / 1e6:.1f} MB in {DELTA_FILE}",
                          time.perf_counter() - tick)
            return remap, entry, fused_ok
        finally:
            weights.close()

    # --- BUILD's files ----------------------------------------------------------------------------

    def _check_weights(self) -> str:
        """BUILD's weights files against their manifest entries: carried over without hashing where the size is the
        recorded one and the file was not modified after the manifest was written; hashed once otherwise."""
        written = (self.build / MANIFEST).stat().st_mtime_ns
        said = []
        for item in self.manifest.weight_files:
            path = self.build / item.path
            if not path.is_file():
                raise ManifestError(f"weights: {path} is missing (the build is incomplete: rebuild or copy it whole)")
            stat = path.stat()
            if stat.st_size != item.bytes:
                raise ManifestError(f"weights: {item.path} has {stat.st_size} bytes; its manifest says {item.bytes}")
            if stat.st_mtime_ns <= written:
                said.append(f"{Path(item.path).name} carried over (size and time unchanged since the manifest; not "
                            "re-hashed)")
                continue
            if sha256(path) != item.sha256:
                raise ManifestError(f"weights: {item.path} does not match its checksum (corrupted or replaced)")
            said.append(f"{Path(item.path).name} hashed once (modified after the manifest was written): it matches")
        return "; ".join(said)

    # --- onnxruntime's fused graphs ---------------------------------------------------------------

    def _fused_stacks(self, graphs: _Graphs, params: dict[str, torch.Tensor], places: dict[str, list[Place]],
                      weights: StoredWeights, plain_regions: set[Region]) -> tuple[dict[Region, str], bool]:
        """The fused graphs' q/k/v stacks the LoRAs change, and whether the fused graphs can be refitted at all."""
        if not graphs.fused_from:
            return {}, False
        changed = set(self.changed)
        if any(not name.endswith(".weight") for name in changed):
            self.note("onnxruntime", "the LoRAs change biases, which onnxruntime's fused graphs stack with others: "
                                     "dropped them (onnxruntime runs the plain graphs; rebuild for the fused form)")
            return {}, False
        fused_only = set().union(*(graphs.regions(p) for p in graphs.fused_from)) - plain_regions
        stacks, known = find_packed_qkv(params, changed, weights, fused_only)
        unknown = fused_only - known
        missing = self._lost_in_fusion(graphs, places, stacks)
        if unknown or missing:
            why = (f"{len(unknown)} of their tensors are neither a parameter nor a q/k/v stack refit can trace"
                   if unknown else f"'{missing}' is in them in a form refit cannot trace")
            self.note("onnxruntime", f"onnxruntime's fused graphs dropped: {why} (onnxruntime runs the plain graphs; "
                                     "rebuild for the fused form)")
            return {}, False
        return stacks, True

    def _lost_in_fusion(self, graphs: _Graphs, places: dict[str, list[Place]], stacks: dict[Region, str]) -> str | None:
        """A changed parameter a plain graph holds whose fused graph holds it neither as it is nor in a stack."""
        stacked = {name for attention in stacks.values() for name in qkv_names(attention)}
        for fused, plain in graphs.fused_from.items():
            mine, theirs = graphs.regions(fused), graphs.regions(plain)
            for name, found in places.items():
                regions = {p.region for p in found}
                if regions & theirs and not regions & mine and name not in stacked:
                    return name
        return None

    # --- writing ----------------------------------------------------------------------------------

    def _write_delta(self, delta: HashedStore, params: dict[str, torch.Tensor], places: dict[str, list[Place]],
                     stacks: dict[Region, str], graphs: _Graphs, weights: StoredWeights,
                     fused_ok: bool) -> dict[Region, int]:
        """Every changed tensor's new bytes into the delta (and, for a refit of a refit, the earlier delta's tensors
        the graphs still use); each old region → its offset in the delta."""
        remap: dict[Region, int] = {}
        for name, found in places.items():
            for place in found:
                data = tensor_layout(params[name], place.transposed)
                remap[place.region] = delta.put(data, f"{place.region}")
        for region, attention in stacks.items():
            parts = qkv_parts(params, attention)
            remap[region] = delta.put(tensor_bytes(packed_qkv(parts)), f"{region}")  # type: ignore[arg-type]
        earlier = self.manifest.weights_delta
        if earlier is not None:
            paths = [*graphs.plain(), *(graphs.fused_from if fused_ok else [])]
            used = set().union(*(graphs.regions(p) for p in paths))
            for region in sorted(used - set(remap), key=lambda r: (r.location, r.offset)):
                if region.location == Path(earlier.path).name:
                    remap[region] = delta.put(weights.view(region), f"{region}")
        return remap

    def _write_graphs(self, graphs: _Graphs, remap: dict[Region, int], fused_ok: bool) -> dict[str, FileEntry]:
        """Each graph file again, its changed initializers pointing into the delta; their new entries by path."""
        files: dict[str, FileEntry] = {}
        for path, model in graphs.models.items():
            if path in graphs.fused_from and not fused_ok:
                continue
            tick = time.perf_counter()
            for tensor in model.graph.initializer:
                region = region_of(tensor)
                if region in remap:
                    point_to(tensor, DELTA_FILE, remap[region], region.length)  # type: ignore[union-attr]
            target = self.work / path
            target.parent.mkdir(parents=True, exist_ok=True)
            onnx.save_model(model, str(target))
            self.writing += time.perf_counter() - tick
            tick = time.perf_counter()
            files[path] = file_entry(self.work, target)
            self.hashing += time.perf_counter() - tick
        return files

    def _link(self, source: Path, target: Path, what: str) -> str:
        """Hard-link ``source`` as ``target`` (the same file: nothing written, nothing to re-check), or copy it where
        the filesystems differ (or refuse links), and say which."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tick = time.perf_counter()
        try:
            os.link(source, target)
            said = "hard-linked from the build (the same file: no copy, not re-hashed)"
        except OSError as exc:
            reason = "another filesystem" if exc.errno == errno.EXDEV else (exc.strerror or str(exc))
            shutil.copyfile(source, target)
            said = f"copied ({reason}: no hard link possible), {target.stat().st_size / 1e9:.2f} GB"
            self.note("weights", f"{what} {source.name}: {said}")
        self.writing += time.perf_counter() - tick
        return said

    # --- engines ----------------------------------------------------------------------------------

    def _engines(self) -> tuple[EngineInfo, dict[str, FileEntry]]:
        """Linked refittable stripped plans, rebuilt other plans, or none, with the reason; the plans by path."""
        info = self.manifest.engine
        plans = {e.engine.path: e for e in self.manifest.all_graphs() if e.engine is not None}
        if not plans:
            return info, {}
        if info.weights_stripped and info.refittable:
            tick = time.perf_counter()
            for path in plans:
                self._link(self.build / path, self.work / path, "engine")
            self.progress("engines", f"{len(plans)} weight-stripped refittable plans linked (refitted from these "
                                     "graphs' weights at load)", time.perf_counter() - tick)
            return info, {path: entry.engine for path, entry in plans.items()}  # type: ignore[misc]
        why = ("weight-stripped for identical weights (REFIT_IDENTICAL): other weights would run unpredictably"
               if info.weights_stripped else "they hold the build's weights")
        return self._rebuild(info, plans, why)

    def _rebuild(self, info: EngineInfo, plans: dict[str, GraphEntry], why: str) -> tuple[EngineInfo, dict[str, FileEntry]]:
        from .compile import BuildOptions, EngineUnavailable, build_isolated, load_library

        try:
            library = load_library(info.library)
            library.check_targets(tuple(info.targets))
            if info.weights_stripped and not torch.cuda.is_available():
                raise EngineUnavailable("weight-stripped plans are compiled on a GPU, and this machine has none")
        except EngineUnavailable as exc:
            skipped = f"refit: the build's {info.library} plans were not carried over ({why}), and cannot be rebuilt " \
                      f"here: {exc}; rebuild, or refit on a machine that builds them"
            self.note("engines", f"engines dropped: {skipped}")
            return EngineInfo(library=None, skipped=skipped), {}
        options = BuildOptions(tuple(info.targets), info.optimization_level or 3, None, None, info.weights_stripped,
                               refittable=info.refittable)
        built: dict[str, FileEntry] = {}
        (self.work / ENGINES_DIR).mkdir(exist_ok=True)
        for path, entry in plans.items():
            tick = time.perf_counter()
            self.progress("engines", f"{Path(path).name}: rebuilding ({why}) with {library.name} {library.version}",
                          None)
            build_isolated(library, self.work / entry.onnx.path, self.work / path, options)
            built[path] = file_entry(self.work, self.work / path)
            self.progress("engines", f"{Path(path).name}: {built[path].bytes / 2**20:.1f} MiB", time.perf_counter() - tick)
        return info.model_copy(update={"version": library.version}), built

    # --- the manifest -----------------------------------------------------------------------------

    def _manifest(self, delta: FileEntry, files: dict[str, FileEntry], engine: EngineInfo,
                  plans: dict[str, FileEntry]) -> Manifest:
        manifest = self.manifest

        def graph(entry: GraphEntry) -> dict:
            fused = files.get(entry.ort_onnx.path) if entry.ort_onnx is not None else None
            plugin = files[entry.plugin_onnx.path] if entry.plugin_onnx is not None else None
            return {"onnx": files[entry.onnx.path], "ort_onnx": fused, "plugin_onnx": plugin,
                    "engine": plans.get(entry.engine.path) if entry.engine else None}

        spec = dict(manifest.spec)
        spec["loras"] = [*spec.get("loras", []), *({"file": e.file, "scale": e.scale} for e in self.entries)]
        new = rewrite(
            manifest, graph, created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), spec=spec,
            weights_delta=delta, engine=engine, versions=tool_versions(),
            build_seconds=time.perf_counter() - self.start, loras=[*manifest.loras, *self.entries],
            refit=RefitInfo(build=str(self.build), manifest_sha256=manifest_sha256(self.build),
                            origin_sha256=origin(manifest, self.build), seconds=time.perf_counter() - self.start),
        )
        check_consistent(new, self.work / MANIFEST)
        write_manifest(self.work, new)
        return new


def iter_loras(texts: tuple[str, ...]) -> Iterator[LoraSpec]:
    """``FILE`` or ``FILE:SCALE`` from the command line, each a ``LoraSpec`` (a bad one is one line)."""
    from pydantic import ValidationError

    from .errors import format_validation_error

    for text in texts:
        try:
            yield LoraSpec.model_validate(text)
        except ValidationError as exc:
            raise LoraError(format_validation_error(exc, f"--lora {text}")) from None


__all__ = ["DELTA_FILE", "RefitRequest", "RefitResult", "iter_loras", "refit"]
