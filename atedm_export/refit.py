"""``atedm-export refit``: a build's graphs with LoRAs fused into their weights, in seconds, not a rebuild.

A LoRA changes a few hundred of the UNet's weight tensors and nothing of its graph. So a refit build keeps
the graphs and the base weights file of the build it comes from, and writes only what the LoRAs change::

    NEW/manifest.json                the same shapes and stages; its LoRAs, its weights files, where it came from
    NEW/onnx/weights.onnx.data       the base weights: a hard link to BUILD's (a copy across filesystems)
    NEW/onnx/weights.refit.onnx.data the tensors the LoRAs changed (and a refit-of-a-refit's earlier ones)
    NEW/onnx/<graph>.onnx            BUILD's graph, its changed initializers pointing into the refit file
    NEW/engines/…                    weight-stripped refittable plans hard-linked; other plans rebuilt or dropped

Which initializer holds which parameter is found by content, never by name: the exporters rename weights
(``onnx::MatMul_6471``) and store Linear weights transposed. The UNet is loaded as BUILD has it (the spec's
model and seed, BUILD's own LoRAs fused); each parameter the new LoRAs change is looked up, as it is and
transposed, among the regions of the weights files the graphs reference, first by a cheap key (length, first
and last 64 bytes: nothing is hashed whole), then by an exact compare of that one region. A parameter found
nowhere, found twice, or whose bytes another parameter shares (one stored tensor serving both: changing it
would change the other) is a one-line error naming it. The LoRAs are then fused with the function builds use
(``lora.fuse_loras``), so a refit build's weights are bit for bit those of a build with the LoRAs in its spec.

onnxruntime's fused graphs (``ortfuse.py``) stack each self-attention's q/k/v weights into one new tensor.
Those stacks are found by content too (``[Wqᵀ | Wkᵀ | Wvᵀ]``, as onnxruntime's UNet fusion lays them out) and
rewritten from the fused weights. Every tensor a fused graph holds beyond its plain graph's must be such a
stack or all zeros (its q/k/v biases); otherwise the fused graphs are dropped (``ort_onnx=None``: onnxruntime
runs the plain graphs) and the output says so, rather than keep a stale copy of a changed weight.

Engines: a weight-stripped plan built refittable (``EngineInfo.refittable``: ``BuilderFlag.REFIT``) holds
none of the weights, so it is hard-linked, and the runtime refits it from NEW's graphs at load. Any other plan
holds or assumes BUILD's weights (a stripped plan built for identical weights, ``REFIT_IDENTICAL``, would run
with other weights "unpredictably", in the libraries' words), so it is rebuilt where the library builds here,
else dropped with the reason (``engine.skipped``).
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import mmap
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from .errors import AtedmError
from .lora import LoraError, check_loras, describe, fuse_loras
from .manifest import (FILENAME, EngineInfo, FileEntry, GraphEntry, LoraEntry, Manifest, ManifestError, RefitInfo,
                       file_entry, sha256, tool_versions, verify_entry)
from .spec import LoraSpec
from .staging import check_destination, staged_folder
from .weights import WeightStore, point_to

DELTA_FILE = "weights.refit.onnx.data"  # beside the base weights, in onnx/
KEY_BYTES = 64  # the cheap key: a region's length and its first and last KEY_BYTES bytes

Progress = Callable[[str, str, float | None], None]  # (stage, what happened, seconds)


class RefitError(AtedmError):
    """A build the LoRAs cannot be refitted into: a parameter not found, or not alone, in its weights."""


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


@dataclass(frozen=True)
class Region:
    """Where one stored tensor lies: a weights file of the build (by name, in onnx/), offset and length."""

    location: str
    offset: int
    length: int


def _silent(stage: str, event: str, seconds: float | None) -> None:
    del stage, event, seconds


# --------------------------------------------------------------------------------------------- bytes and keys


def _bytes(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as stored in a graph (row-major, its own dtype) as a uint8 array."""
    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)  # NumPy has no bfloat16: the same bytes
    return tensor.numpy().reshape(-1).view(np.uint8)


def _rows(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The tensor as a 2-D view in the layout a graph may store it: as it is, or transposed (2-D weights)."""
    if transposed:
        return tensor.t()
    return tensor.reshape(tensor.shape[0] if tensor.dim() else 1, -1)


def _layout(tensor: torch.Tensor, transposed: bool) -> np.ndarray:
    return _bytes(_rows(tensor, transposed))


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NP_BITS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


def _same(stored: np.ndarray, tensor: torch.Tensor, transposed: bool) -> bool:
    """Whether a region's bytes are ``tensor`` in a layout, bit for bit, compared in place: the tensor is never copied
    into that layout (a transposed 10 GB model would be), nor the region read twice."""
    view = _rows(tensor.detach(), transposed)
    size = view.element_size()
    if stored.nbytes != view.numel() * size:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch notes that the mapped region is read-only: it is only read
        region = torch.from_numpy(stored.view(_NP_BITS[size])).reshape(view.shape)
    return torch.equal(region, view.view(_BITS[size]))


def _key(tensor: torch.Tensor, transposed: bool) -> tuple[int, bytes, bytes]:
    """``(length, first, last KEY_BYTES bytes)`` of the tensor in a layout, without copying the whole of it."""
    view = _rows(tensor, transposed)
    length = view.numel() * view.element_size()
    per_row = max(view.shape[1], 1) * view.element_size()
    take = -(-KEY_BYTES // per_row)  # rows enough for KEY_BYTES
    head, tail = _bytes(view[:take]).tobytes(), _bytes(view[-take:]).tobytes()
    return length, head[:KEY_BYTES], tail[-KEY_BYTES:]


class _Weights:
    """BUILD's weights files, mapped read-only: the regions its graphs reference, keyed and compared."""

    def __init__(self, folder: Path, names: list[str]) -> None:
        self._maps: dict[str, tuple[mmap.mmap, np.ndarray]] = {}
        for name in names:
            with (folder / name).open("rb") as handle:
                mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(handle.fileno()).st_size \
                    else None
            view = np.frombuffer(mapping, dtype=np.uint8) if mapping is not None else np.empty(0, np.uint8)
            self._maps[name] = (mapping, view)  # type: ignore[assignment]

    def view(self, region: Region) -> np.ndarray:
        _, view = self._maps[region.location]
        if region.offset + region.length > len(view):
            raise RefitError(f"{region.location} is too short for a tensor its graphs reference (truncated?)")
        return view[region.offset:region.offset + region.length]

    def key(self, region: Region) -> tuple[int, bytes, bytes]:
        data = self.view(region)
        return region.length, data[:KEY_BYTES].tobytes(), data[-KEY_BYTES:].tobytes()

    def close(self) -> None:
        while self._maps:
            _, (mapping, view) = self._maps.popitem()
            del view
            if mapping is not None:
                mapping.close()


# --------------------------------------------------------------------------------------------------- graphs


@dataclass
class _Graphs:
    """BUILD's distinct graph files (plain and onnxruntime-fused), read without their weights."""

    models: dict[str, onnx.ModelProto]  # graph path (relative to the build) → graph
    fused_from: dict[str, str]  # fused graph path → the plain graph it was made from

    def regions(self, path: str) -> set[Region]:
        found = set()
        for tensor in self.models[path].graph.initializer:
            if uses_external_data(tensor):
                info = ExternalDataInfo(tensor)
                found.add(Region(info.location, info.offset or 0, info.length or _nbytes(tensor)))
        return found

    def plain(self) -> list[str]:
        return [p for p in self.models if p not in self.fused_from]


def _nbytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _read_graphs(build: Path, manifest: Manifest) -> _Graphs:
    """Every distinct graph file, checked against its sha256 (graph files are small), without external data."""
    models: dict[str, onnx.ModelProto] = {}
    fused_from: dict[str, str] = {}
    for entry in manifest.all_graphs():
        verify_entry(build, entry, engine=False)
        for item in entry.forms():
            if item.path not in models:
                models[item.path] = onnx.load(str(build / item.path), load_external_data=False)
        if entry.ort_onnx is not None:
            fused_from[entry.ort_onnx.path] = entry.onnx.path
    return _Graphs(models, fused_from)


# -------------------------------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class _Place:
    """One stored copy of a changed parameter: its region and whether it is stored transposed."""

    region: Region
    transposed: bool


@dataclass(frozen=True)
class _Stack:
    """onnxruntime's stacked q/k/v weight of one self-attention (``[Wqᵀ | Wkᵀ | Wvᵀ]``)."""

    region: Region
    attention: str  # the module's path; its to_q, to_k and to_v weights make the stack


def _layouts(tensor: torch.Tensor) -> list[bool]:
    return [False, True] if tensor.dim() == 2 else [False]


def _match(params: dict[str, torch.Tensor], changed: list[str], weights: _Weights,
           regions: set[Region]) -> dict[str, list[_Place]]:
    """Where each changed parameter is stored, by content; one-line errors for a parameter not found, found twice in
    one layout, or sharing its stored bytes with another parameter."""
    index: dict[tuple, list[Region]] = {}
    for region in regions:
        index.setdefault(weights.key(region), []).append(region)
    others: dict[tuple, list[tuple[str, bool]]] = {}  # every parameter's keys: who else a region could be
    for name, tensor in params.items():
        for transposed in _layouts(tensor):
            others.setdefault(_key(tensor, transposed), []).append((name, transposed))
    places: dict[str, list[_Place]] = {}
    for name in changed:
        tensor = params[name]
        found: list[_Place] = []
        for transposed in _layouts(tensor):
            key = _key(tensor, transposed)
            candidates = index.get(key, [])
            if not candidates:
                continue
            hits = [r for r in candidates if _same(weights.view(r), tensor, transposed)]
            if len(hits) > 1:
                raise RefitError(f"parameter '{name}' is stored {len(hits)} times ({_where(hits)}); refit cannot tell "
                                 "which copy is this parameter")
            if hits and any(p.region == hits[0] for p in found):
                raise RefitError(f"parameter '{name}' reads the same as its transpose; refit cannot tell how the "
                                 "graphs store it")
            for region in hits:
                for other, other_transposed in others.get(key, []):
                    if other != name and _same(weights.view(region), params[other], other_transposed):
                        raise RefitError(f"parameter '{name}' has the same bytes as '{other}': one stored tensor serves "
                                         "both, so refit cannot change one alone")
                found.append(_Place(region, transposed))
        if not found:
            raise RefitError(f"parameter '{name}' is not in the build's weights, as it is or transposed (the build "
                             "holds other weights than its spec's model and LoRAs give?)")
        places[name] = found
    return places


def _where(regions: list[Region]) -> str:
    return ", ".join(f"{r.location}@{r.offset}" for r in regions[:3])


def _qkv(params: dict[str, torch.Tensor], attention: str) -> list[torch.Tensor] | None:
    names = [f"{attention}.to_{p}.weight" for p in "qkv"]
    if not all(n in params for n in names):
        return None
    q, k, v = (params[n] for n in names)
    return [q, k, v] if q.dim() == 2 and q.shape[1] == k.shape[1] == v.shape[1] else None


def _stack(parts: list[torch.Tensor]) -> torch.Tensor:
    """onnxruntime's self-attention weight: ``np.stack((q, k, v), axis=1)`` of the graph's ``[in, out]`` (transposed)
    weights, i.e. ``[in, 3·out]``, each row q's, k's, then v's."""
    return torch.cat([p.t() for p in parts], dim=1)


def _stack_key(parts: list[torch.Tensor]) -> tuple[int, bytes, bytes]:
    """``_key`` of ``_stack(parts)`` from the first and last rows alone (the stack is never made for the key)."""
    length = sum(p.numel() * p.element_size() for p in parts)
    first = _bytes(torch.cat([p[:, 0] for p in parts])).tobytes()
    last = _bytes(torch.cat([p[:, -1] for p in parts])).tobytes()
    return length, first[:KEY_BYTES], last[-KEY_BYTES:]


def _stacks(params: dict[str, torch.Tensor], attentions: list[str], changed: set[str], weights: _Weights,
            fused_only: set[Region]) -> tuple[dict[Region, str], set[Region]]:
    """The fused graphs' own regions as q/k/v stacks: ``(changed stacks: region → attention, regions accounted for)``.

    A region is accounted for when it is the stack of some self-attention (changed ones compared exactly) or holds
    only zeros (the stacked q/k/v biases of attentions without biases).
    """
    by_key: dict[tuple, list[Region]] = {}
    for region in fused_only:
        by_key.setdefault(weights.key(region), []).append(region)
    changed_stacks: dict[Region, str] = {}
    known: set[Region] = set()
    for attention in attentions:
        parts = _qkv(params, attention)
        if parts is None:
            continue
        candidates = by_key.get(_stack_key(parts), [])
        names = {f"{attention}.to_{p}.weight" for p in "qkv"}
        if candidates and names & changed:
            data = _bytes(_stack(parts))
            hits = [r for r in candidates if np.array_equal(weights.view(r), data)]
            if len(hits) > 1:
                raise RefitError(f"the q/k/v stack of '{attention}' is stored {len(hits)} times ({_where(hits)}) in "
                                 "the onnxruntime graphs; refit cannot tell which it is")
            changed_stacks.update(dict.fromkeys(hits, attention))
            known.update(hits)
        else:
            known.update(candidates)
    known.update(r for r in fused_only - known if not weights.view(r).any())
    return changed_stacks, known


# ------------------------------------------------------------------------------------------------- the writer


class _HashingFile:
    """A file written once, front to back, whose sha256 is taken as it is written (never read back), on a thread of
    its own: hashing a block overlaps writing it and making the next (sha256 lets go of the GIL on large blocks)."""

    def __init__(self, handle) -> None:  # noqa: ANN001 - a binary file
        self._handle = handle
        self._digest = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="refit-sha256")
        self._pending: Future | None = None  # one block in flight: memory stays bounded
        self.hash_seconds = 0.0  # on the hashing thread

    def _update(self, data: bytes | memoryview) -> None:
        tick = time.perf_counter()
        self._digest.update(data)
        self.hash_seconds += time.perf_counter() - tick

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def write(self, data: bytes | memoryview) -> int:
        self._wait()
        self._pending = self._hasher.submit(self._update, data)  # the future keeps ``data`` alive until hashed
        return self._handle.write(data)

    def flush(self) -> None:
        self._handle.flush()

    def close(self) -> None:
        self._wait()
        self._hasher.shutdown()
        self._handle.close()

    def hexdigest(self) -> str:
        self._wait()
        return self._digest.hexdigest()


class _DeltaStore(WeightStore):
    """The refit's weights file: page-aligned like the build's, its sha256 taken while it is written."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._file = _HashingFile(self._file)  # type: ignore[assignment]

    def put(self, data: np.ndarray, identity: str) -> int:
        """Store ``data`` (one tensor's bytes) once per ``identity`` (the region it replaces); its offset."""
        return self.add(iter([memoryview(data)]), data.nbytes, hashlib.sha256(identity.encode()).digest())

    def entry(self, folder: Path) -> FileEntry:
        self._file.flush()
        return FileEntry(path=os.path.relpath(self.path, folder), sha256=self._file.hexdigest(),  # type: ignore[attr-defined]
                         bytes=self.path.stat().st_size)

    @property
    def hash_seconds(self) -> float:
        return self._file.hash_seconds  # type: ignore[attr-defined]


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
    check_destination(out, request.force, owner_file=FILENAME, inputs={
        "build": build, **{f"LoRA {index + 1}": Path(item.file) for index, item in enumerate(request.loras)}})
    manifest = Manifest.load(build, verify=False)
    from .models import build_unet

    tick = time.perf_counter()
    meta = build_unet(manifest.unet_config, device="meta")
    changed = check_loras(request.loras, meta)
    entries = [LoraEntry.of(item.file, item.scale) for item in request.loras]
    progress("loras", f"{describe(request.loras)}: {len(changed)} parameters change, "
                      f"{_param_bytes(meta, changed, manifest) / 1e6:.1f} MB", time.perf_counter() - tick)
    for lora in manifest.loras:
        lora.check()  # BUILD's own: its weights are made again with them
    with staged_folder(out, what="refit") as work:
        return _Refit(build, manifest, request, entries, changed, work, progress, start).run(out)


def _param_bytes(meta: torch.nn.Module, names: list[str], manifest: Manifest) -> int:
    shapes = dict(meta.named_parameters())
    itemsize = torch.finfo(manifest.graph_spec.dtype).bits // 8
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

    def note(self, stage: str, text: str) -> None:
        self.notes.append(text)
        self.progress(stage, text, None)

    def run(self, out: Path) -> RefitResult:
        manifest, build, work = self.manifest, self.build, self.work
        (work / "onnx").mkdir()
        tick = time.perf_counter()
        graphs = _read_graphs(build, manifest)
        names = [Path(item.path).name for item in manifest.weight_files]
        carried = self._check_weights()
        self.hashing += time.perf_counter() - tick
        self.progress("graphs", f"{len(graphs.plain())} graph files"
                                f"{f' (+{len(graphs.fused_from)} onnxruntime-fused)' if graphs.fused_from else ''} "
                                f"checked; weights {carried}", time.perf_counter() - tick)

        tick = time.perf_counter()
        from .models import load_unet

        spec = manifest.graph_spec
        unet = load_unet(spec.model, dtype=spec.dtype, seed=spec.seed, loras=manifest.loras)
        params = dict(unet.named_parameters())
        as_built = f" with {describe(manifest.loras)}" if manifest.loras else ""
        self.progress("model", f"{spec.model} (seed {spec.seed}, {spec.precision}){as_built}: as the build holds it",
                      time.perf_counter() - tick)

        weights = _Weights(build / "onnx", names)
        try:
            tick = time.perf_counter()
            plain_regions = set().union(*(graphs.regions(p) for p in graphs.plain()))
            places = _match(params, self.changed, weights, plain_regions)
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
            delta = _DeltaStore(work / "onnx" / DELTA_FILE)
            with delta:
                remap = self._write_delta(delta, params, places, stacks, graphs, weights, fused_ok)
                delta_entry = delta.entry(work)
            del unet, params
            self.hashing += delta.hash_seconds  # on a thread of its own, alongside the writing
            self.writing += time.perf_counter() - tick
            self.progress("delta", f"{len(remap)} tensors, {delta_entry.bytes / 1e6:.1f} MB in {DELTA_FILE}",
                          time.perf_counter() - tick)
        finally:
            weights.close()

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

    # --- BUILD's files ----------------------------------------------------------------------------

    def _check_weights(self) -> str:
        """BUILD's weights files against their manifest entries: carried over without hashing where the size is the
        recorded one and the file was not modified after the manifest was written; hashed once otherwise."""
        written = (self.build / FILENAME).stat().st_mtime_ns
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

    def _fused_stacks(self, graphs: _Graphs, params: dict[str, torch.Tensor], places: dict[str, list[_Place]],
                      weights: _Weights, plain_regions: set[Region]) -> tuple[dict[Region, str], bool]:
        """The fused graphs' q/k/v stacks the LoRAs change, and whether the fused graphs can be refitted at all."""
        if not graphs.fused_from:
            return {}, False
        changed = set(self.changed)
        if any(not name.endswith(".weight") for name in changed):
            self.note("onnxruntime", "the LoRAs change biases, which onnxruntime's fused graphs stack with others: "
                                     "dropped them (onnxruntime runs the plain graphs; rebuild for the fused form)")
            return {}, False
        fused_only = set().union(*(graphs.regions(p) for p in graphs.fused_from)) - plain_regions
        attentions = sorted(n.removesuffix(".to_q.weight") for n in params if n.endswith(".to_q.weight"))
        stacks, known = _stacks(params, attentions, changed, weights, fused_only)
        unknown = fused_only - known
        missing = self._lost_in_fusion(graphs, places, stacks)
        if unknown or missing:
            why = (f"{len(unknown)} of their tensors are neither a parameter nor a q/k/v stack refit can trace"
                   if unknown else f"'{missing}' is in them in a form refit cannot trace")
            self.note("onnxruntime", f"onnxruntime's fused graphs dropped: {why} (onnxruntime runs the plain graphs; "
                                     "rebuild for the fused form)")
            return {}, False
        return stacks, True

    def _lost_in_fusion(self, graphs: _Graphs, places: dict[str, list[_Place]], stacks: dict[Region, str]) -> str | None:
        """A changed parameter a plain graph holds whose fused graph holds it neither as it is nor in a stack."""
        stacked = {f"{attention}.to_{p}.weight" for attention in stacks.values() for p in "qkv"}
        for fused, plain in graphs.fused_from.items():
            mine, theirs = graphs.regions(fused), graphs.regions(plain)
            for name, found in places.items():
                regions = {p.region for p in found}
                if regions & theirs and not regions & mine and name not in stacked:
                    return name
        return None

    # --- writing ----------------------------------------------------------------------------------

    def _write_delta(self, delta: _DeltaStore, params: dict[str, torch.Tensor], places: dict[str, list[_Place]],
                     stacks: dict[Region, str], graphs: _Graphs, weights: _Weights, fused_ok: bool) -> dict[Region, int]:
        """Every changed tensor's new bytes into the delta (and, for a refit of a refit, the earlier delta's tensors
        the graphs still use); each old region → its offset in the delta."""
        remap: dict[Region, int] = {}
        for name, found in places.items():
            for place in found:
                data = _layout(params[name], place.transposed)
                remap[place.region] = delta.put(data, f"{place.region}")
        for region, attention in stacks.items():
            parts = _qkv(params, attention)
            remap[region] = delta.put(_bytes(_stack(parts)), f"{region}")  # type: ignore[arg-type]
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
                if uses_external_data(tensor):
                    info = ExternalDataInfo(tensor)
                    region = Region(info.location, info.offset or 0, info.length or _nbytes(tensor))
                    if region in remap:
                        point_to(tensor, DELTA_FILE, remap[region], region.length)
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
            library = load_library(info.backend)
            library.check_targets(tuple(info.targets))
            if info.weights_stripped and not torch.cuda.is_available():
                raise EngineUnavailable("weight-stripped plans are compiled on a GPU, and this machine has none")
        except EngineUnavailable as exc:
            skipped = f"refit: the build's {info.backend} plans were not carried over ({why}), and cannot be rebuilt " \
                      f"here: {exc}; rebuild, or refit on a machine that builds them"
            self.note("engines", f"engines dropped: {skipped}")
            return EngineInfo(backend="onnx", skipped=skipped), {}
        options = BuildOptions(tuple(info.targets), info.optimization_level or 3, None, None, info.weights_stripped,
                               refittable=info.refittable)
        built: dict[str, FileEntry] = {}
        (self.work / "engines").mkdir(exist_ok=True)
        for path, entry in plans.items():
            tick = time.perf_counter()
            self.progress("engines", f"{Path(path).name}: rebuilding ({why}) with {library.backend} {library.version}",
                          None)
            build_isolated(library, self.work / entry.onnx.path, self.work / path, options)
            built[path] = file_entry(self.work, self.work / path)
            self.progress("engines", f"{Path(path).name}: {built[path].bytes / 2**20:.1f} MiB", time.perf_counter() - tick)
        return info.model_copy(update={"version": library.version}), built

    # --- the manifest -----------------------------------------------------------------------------

    def _manifest(self, delta: FileEntry, files: dict[str, FileEntry], engine: EngineInfo,
                  plans: dict[str, FileEntry]) -> Manifest:
        manifest = self.manifest

        def graph(entry: GraphEntry) -> GraphEntry:
            fused = files.get(entry.ort_onnx.path) if entry.ort_onnx is not None else None
            plugin = files[entry.plugin_onnx.path] if entry.plugin_onnx is not None else None
            return entry.model_copy(update={"onnx": files[entry.onnx.path], "ort_onnx": fused, "plugin_onnx": plugin,
                                            "engine": plans.get(entry.engine.path) if entry.engine else None})

        shapes = [s.model_copy(update={"baseline": graph(s.baseline), "stages": [graph(g) for g in s.stages]})
                  for s in manifest.shapes]
        spec = dict(manifest.spec)
        spec["loras"] = [*spec.get("loras", []), *({"file": e.file, "scale": e.scale} for e in self.entries)]
        origin = manifest.origin(self.build)
        data = manifest.model_dump(mode="json")
        data.update(
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), spec=spec,
            weights=manifest.weights.model_dump(), weights_delta=delta.model_dump(),
            shapes=[s.model_dump(mode="json") for s in shapes], engine=engine.model_dump(mode="json"),
            versions=tool_versions(), build_seconds=time.perf_counter() - self.start,
            loras=[e.model_dump() for e in (*manifest.loras, *self.entries)],
            refit=RefitInfo(build=str(self.build), manifest_sha256=sha256(self.build / FILENAME), origin_sha256=origin,
                            seconds=time.perf_counter() - self.start).model_dump(),
        )
        new = Manifest.model_validate(data)
        new.check_consistent(self.work / FILENAME)
        new.save(self.work)
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


__all__ = ["DELTA_FILE", "RefitError", "RefitRequest", "RefitResult", "iter_loras", "refit"]
