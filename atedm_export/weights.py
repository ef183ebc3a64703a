"""One external-data file for every graph of a build: each tensor stored once, by content.

The baseline and every stage graph hold the same UNet weights (a stage only adds small index tensors),
so a build keeps them in one ONNX external-data file beside all its graphs (ONNX tooling refuses
external paths that leave the model's folder, hence one folder). A graph's initializers point into it
by offset and length. Tensors are deduplicated by their bytes' sha256, so whatever names an exporter
gives a weight, or however a stage graph orders them, the file grows only by what is new.

Every tensor starts on a page boundary: onnxruntime then maps the weights from the file instead of
copying them, and the engine builder hands the parser pointers into one mapping of it. Moving bytes
from an exporter's file into the store goes through one bounded buffer: a 5 GB model is never read
into memory at once.

The same files are read back by content (``StoredWeights``, ``find_parameters``): which stored region holds
a torch parameter, whatever the exporter named it. A parameter is looked up as it is and transposed (the
exporters store Linear weights ``[in, out]``), first by a cheap key (length, first and last ``KEY_BYTES``
bytes: nothing is hashed whole), then by an exact compare of that one region. A parameter found nowhere,
found twice, or whose bytes another parameter shares (one stored tensor serving both: changing it would
change the other) is a one-line error naming it. ``refit.py`` rewrites what it finds.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from .errors import RefitError

if TYPE_CHECKING:  # torch is imported where a tensor is read: the engine builder's process never imports it
    import torch

INLINE_BYTES = 1024  # tensors up to this size stay inside the graph file (ONNX's own default threshold)
ALIGN = mmap.ALLOCATIONGRANULARITY  # onnxruntime maps external data only at this alignment
_CHUNK = 64 << 20
KEY_BYTES = 64  # a region's cheap key: its length and its first and last KEY_BYTES bytes

RegionKey = tuple[int, bytes, bytes]  # (length, first KEY_BYTES bytes, last KEY_BYTES bytes)


@dataclass(frozen=True)
class ExternalTensor:
    """Where one initializer's bytes live: ``location`` (relative to the graph's folder), offset, length."""

    name: str
    location: str
    offset: int
    length: int


def external_tensors(model: onnx.ModelProto) -> list[ExternalTensor]:
    """The initializers of ``model`` whose bytes live outside the graph file."""
    found = []
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            length = info.length if info.length is not None else _nbytes(tensor)
            found.append(ExternalTensor(tensor.name, info.location, info.offset or 0, length))
    return found


def _nbytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` an external reference (dropping any bytes it carries)."""
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


class WeightStore:
    """The build's shared weights file, written append-only; ``add`` returns where a tensor's bytes are."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("wb")
        self._index: dict[bytes, tuple[int, int]] = {}
        self.size = 0
        self.reused = 0  # bytes that graphs reference but the file did not have to store again

    def close(self) -> None:
        self._file.close()

    def flush(self) -> None:
        """Make everything stored so far visible to readers of the file (the engine builder maps it)."""
        self._file.flush()

    def __enter__(self) -> WeightStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, chunks: Iterator[memoryview], length: int, digest: bytes) -> int:
        """Store ``length`` bytes (given as chunks) unless bytes with this ``digest`` are stored; their offset."""
        key = digest + length.to_bytes(8, "little")
        if key in self._index:
            self.reused += length
            return self._index[key][0]
        offset = -(-self.size // ALIGN) * ALIGN
        if offset > self.size:
            self._file.write(bytes(offset - self.size))
        for chunk in chunks:
            self._file.write(chunk)
        self.size = offset + length
        self._index[key] = (offset, length)
        return offset

    def move_initializers(self, model: onnx.ModelProto, base_dir: Path) -> None:
        """Point every initializer over ``INLINE_BYTES`` of ``model`` into this store.

        Its bytes come from the graph itself or from the external files ``base_dir`` holds (the exporter's
        output); each is read twice in bounded chunks (hash, then copy when new), never whole.
        """
        sources: dict[str, object] = {}
        try:
            for tensor in model.graph.initializer:
                if uses_external_data(tensor):
                    info = ExternalDataInfo(tensor)
                    if (base_dir / info.location).resolve() == self.path.resolve():
                        continue  # already in this store (a graph made from one of its graphs)
                    handle = sources.get(info.location) or sources.setdefault(
                        info.location, (base_dir / info.location).open("rb"))
                    length = info.length if info.length is not None else _nbytes(tensor)
                    offset = self._add_range(handle, info.offset or 0, length)
                else:
                    data = _inline_bytes(tensor)
                    if len(data) <= INLINE_BYTES:
                        continue
                    length = len(data)
                    offset = self.add(iter([memoryview(data)]), length, hashlib.sha256(data).digest())
                point_to(tensor, self.path.name, offset, length)
        finally:
            for handle in sources.values():
                handle.close()  # type: ignore[attr-defined]

    def _add_range(self, handle: object, start: int, length: int) -> int:
        def chunks() -> Iterator[memoryview]:
            handle.seek(start)  # type: ignore[attr-defined]
            left = length
            while left:
                block = handle.read(min(_CHUNK, left))  # type: ignore[attr-defined]
                if not block:
                    raise OSError(f"external data ends early: {length} bytes expected at offset {start}")
                left -= len(block)
                yield memoryview(block)

        digest = hashlib.sha256()
        for block in chunks():
            digest.update(block)
        return self.add(chunks(), length, digest.digest())


def _inline_bytes(tensor: onnx.TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


class MappedWeights:
    """A graph's external tensors as pointers into one read-only mapping of their file (for engine parsers).

    The mapping stays open as long as this object: parsers keep the pointers, not copies.
    """

    def __init__(self, graph: Path, model: onnx.ModelProto) -> None:
        self.tensors = external_tensors(model)
        self._maps = {location: _map(graph.parent / location) for location in {t.location for t in self.tensors}}

    def pointers(self) -> Iterator[tuple[str, int, int]]:
        """``(initializer name, address, byte count)`` for each external tensor."""
        for tensor in self.tensors:
            _, view = self._maps[tensor.location]
            if tensor.offset + tensor.length > len(view):
                raise OSError(f"{tensor.location} is too short for '{tensor.name}' (truncated weights file?)")
            yield tensor.name, view.ctypes.data + tensor.offset, tensor.length

    def close(self) -> None:
        _unmap(self._maps)


_Mapping = tuple[mmap.mmap | None, np.ndarray]  # a file's mapping (None for an empty file) and its bytes


def _map(path: Path) -> _Mapping:
    """``path`` mapped read-only, and its bytes as an array (an empty file has no mapping: none can be made)."""
    with path.open("rb") as handle:
        if not os.fstat(handle.fileno()).st_size:
            return None, np.empty(0, np.uint8)
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    return mapping, np.frombuffer(mapping, dtype=np.uint8)


def _unmap(maps: dict[str, _Mapping]) -> None:
    while maps:
        _, (mapping, view) = maps.popitem()
        del view  # the mapping refuses to close while a view of it exists
        if mapping is not None:
            mapping.close()


# ------------------------------------------------------------------------------------- finding a tensor by content


@dataclass(frozen=True)
class Region:
    """Where one stored tensor lies: a weights file (by name, beside its graphs), offset and length."""

    location: str
    offset: int
    length: int


def region_of(tensor: onnx.TensorProto) -> Region | None:
    """Where an initializer's bytes are stored, or None for one held in its graph."""
    if not uses_external_data(tensor):
        return None
    info = ExternalDataInfo(tensor)
    return Region(info.location, info.offset or 0, info.length or _nbytes(tensor))


def where(regions: Iterable[Region]) -> str:
    """A few regions, for an error line: ``file@offset, …``."""
    return ", ".join(f"{r.location}@{r.offset}" for r in list(regions)[:3])


@dataclass(frozen=True)
class Place:
    """One stored copy of a parameter: its region and whether it is stored transposed."""

    region: Region
    transposed: bool


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as stored in a graph (row-major, its own dtype) as a uint8 array."""
    import torch

    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)  # NumPy has no bfloat16: the same bytes
    return tensor.numpy().reshape(-1).view(np.uint8)


def _rows(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The tensor as a 2-D view in the layout a graph may store it: as it is, or transposed (2-D weights)."""
    if transposed:
        return tensor.t()
    return tensor.reshape(tensor.shape[0] if tensor.dim() else 1, -1)


def tensor_layout(tensor: torch.Tensor, transposed: bool) -> np.ndarray:
    """The bytes a graph stores for ``tensor``, as it is or transposed."""
    return tensor_bytes(_rows(tensor, transposed))


def _layouts(tensor: torch.Tensor) -> list[bool]:
    """Whether a graph may store ``tensor`` as it is, transposed, or both (exporters transpose Linear weights)."""
    return [False, True] if tensor.dim() == 2 else [False]


_NP_BITS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


def _same(stored: np.ndarray, tensor: torch.Tensor, transposed: bool) -> bool:
    """Whether a region's bytes are ``tensor`` in a layout, bit for bit, compared in place: the tensor is never copied
    into that layout (a transposed 10 GB model would be), nor the region read twice."""
    import torch

    view = _rows(tensor.detach(), transposed)
    size = view.element_size()
    if stored.nbytes != view.numel() * size:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch notes that the mapped region is read-only: it is only read
        region = torch.from_numpy(stored.view(_NP_BITS[size])).reshape(view.shape)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    return torch.equal(region, view.view(bits))


def tensor_key(tensor: torch.Tensor, transposed: bool) -> RegionKey:
    """The key of ``tensor``'s region in a layout (``StoredWeights.key``), without copying the whole of it."""
    view = _rows(tensor, transposed)
    length = view.numel() * view.element_size()
    per_row = max(view.shape[1], 1) * view.element_size()
    take = -(-KEY_BYTES // per_row)  # rows enough for KEY_BYTES
    head, tail = tensor_bytes(view[:take]).tobytes(), tensor_bytes(view[-take:]).tobytes()
    return length, head[:KEY_BYTES], tail[-KEY_BYTES:]


class StoredWeights:
    """Weights files, mapped read-only: the regions their graphs reference, keyed and compared."""

    def __init__(self, folder: Path, names: list[str]) -> None:
        self._maps = {name: _map(folder / name) for name in names}

    def view(self, region: Region) -> np.ndarray:
        _, view = self._maps[region.location]
        if region.offset + region.length > len(view):
            raise RefitError(f"{region.location} is too short for a tensor its graphs reference (truncated?)")
        return view[region.offset:region.offset + region.length]

    def key(self, region: Region) -> RegionKey:
        data = self.view(region)
        return region.length, data[:KEY_BYTES].tobytes(), data[-KEY_BYTES:].tobytes()

    def index(self, regions: Iterable[Region]) -> dict[RegionKey, list[Region]]:
        """``regions`` by their key: the few a tensor with that key could be."""
        found: dict[RegionKey, list[Region]] = {}
        for region in regions:
            found.setdefault(self.key(region), []).append(region)
        return found

    def close(self) -> None:
        _unmap(self._maps)


def find_parameters(params: dict[str, torch.Tensor], changed: list[str], weights: StoredWeights,
                    regions: set[Region]) -> dict[str, list[Place]]:
    """Where each of the ``changed`` parameters is stored among ``regions``, by content; one-line errors for a
    parameter not found, found twice in one layout, or sharing its stored bytes with another parameter."""
    index = weights.index(regions)
    others: dict[RegionKey, list[tuple[str, bool]]] = {}  # every parameter's keys: who else a region could be
    for name, tensor in params.items():
        for transposed in _layouts(tensor):
            others.setdefault(tensor_key(tensor, transposed), []).append((name, transposed))
    places: dict[str, list[Place]] = {}
    for name in changed:
        tensor = params[name]
        found: list[Place] = []
        for transposed in _layouts(tensor):
            key = tensor_key(tensor, transposed)
            for region in _hits(name, tensor, transposed, weights, index.get(key, []), found):
                _check_alone(name, region, params, others.get(key, []), weights)
                found.append(Place(region, transposed))
        if not found:
            raise RefitError(f"parameter '{name}' is not in the build's weights, as it is or transposed (the build "
                             "holds other weights than its spec's model and LoRAs give?)")
        places[name] = found
    return places


def _hits(name: str, tensor: torch.Tensor, transposed: bool, weights: StoredWeights, candidates: list[Region],
          found: list[Place]) -> list[Region]:
    """The one candidate region (or none) that is ``tensor`` in this layout; an error where two are, or where it is
    a region already found in the other layout (a tensor that reads the same as its transpose)."""
    hits = [r for r in candidates if _same(weights.view(r), tensor, transposed)]
    if len(hits) > 1:
        raise RefitError(f"parameter '{name}' is stored {len(hits)} times ({where(hits)}); refit cannot tell "
                         "which copy is this parameter")
    if hits and any(p.region == hits[0] for p in found):
        raise RefitError(f"parameter '{name}' reads the same as its transpose; refit cannot tell how the "
                         "graphs store it")
    return hits


def _check_alone(name: str, region: Region, params: dict[str, torch.Tensor], others: list[tuple[str, bool]],
                 weights: StoredWeights) -> None:
    """An error where another parameter with the same key has the very bytes of ``name``'s region: one stored
    tensor serves both, and changing it for one would change the other."""
    for other, other_transposed in others:
        if other != name and _same(weights.view(region), params[other], other_transposed):
            raise RefitError(f"parameter '{name}' has the same bytes as '{other}': one stored tensor serves "
                             "both, so refit cannot change one alone")


# ---------------------------------------------------------------------------------- a store hashed as it is written


class _HashingFile:
    """A file written once, front to back, whose sha256 is taken as it is written (never read back), on a thread of
    its own: hashing a block overlaps writing it and making the next (sha256 lets go of the GIL on large blocks)."""

    def __init__(self, handle: BinaryIO) -> None:
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


class HashedStore(WeightStore):
    """A weights file like the build's (page-aligned), its sha256 taken while it is written: refit's delta, whose
    checksum then costs no second read of it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._hashing = _HashingFile(self._file)
        self._file = self._hashing  # type: ignore[assignment]

    def put(self, data: np.ndarray, identity: str) -> int:
        """Store ``data`` (one tensor's bytes) once per ``identity`` (say, the region it replaces); its offset."""
        return self.add(iter([memoryview(data)]), data.nbytes, hashlib.sha256(identity.encode()).digest())

    def hexdigest(self) -> str:
        """The sha256 of everything written so far (flushed to the file first)."""
        self._hashing.flush()
        return self._hashing.hexdigest()

    @property
    def hash_seconds(self) -> float:
        return self._hashing.hash_seconds
