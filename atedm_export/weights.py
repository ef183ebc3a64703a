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
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

WEIGHTS_FILE = "weights.onnx.data"
INLINE_BYTES = 1024  # tensors up to this size stay inside the graph file (ONNX's own default threshold)
ALIGN = mmap.ALLOCATIONGRANULARITY  # onnxruntime maps external data only at this alignment
_CHUNK = 64 << 20


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
        self._maps: dict[str, tuple[mmap.mmap, np.ndarray]] = {}
        for location in {t.location for t in self.tensors}:
            with (graph.parent / location).open("rb") as handle:
                mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[location] = (mapping, np.frombuffer(mapping, dtype=np.uint8))

    def pointers(self) -> Iterator[tuple[str, int, int]]:
        """``(initializer name, address, byte count)`` for each external tensor."""
        for tensor in self.tensors:
            mapping, view = self._maps[tensor.location]
            if tensor.offset + tensor.length > len(mapping):
                raise OSError(f"{tensor.location} is too short for '{tensor.name}' (truncated weights file?)")
            yield tensor.name, view.ctypes.data + tensor.offset, tensor.length

    def close(self) -> None:
        while self._maps:
            _, (mapping, view) = self._maps.popitem()
            del view  # the mapping refuses to close while a view of it exists
            mapping.close()
