"""A build's files against the record: sizes and sha256, each file hashed once, and the files a graph reads.

Loading a build checks every artifact here, so a flipped byte or a file swapped by hand fails with one line
naming it, never later inside an engine. LoRA files and the pipeline folder a build was made from are
fingerprinted the same way.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import ManifestError
from .layout import MANIFEST
from .record import FileEntry, GraphEntry, LoraEntry, Manifest, PipelineFile, PipelineInfo


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(folder: Path, path: Path) -> FileEntry:
    """The record of a file written under ``folder``."""
    return FileEntry(path=os.path.relpath(path, folder), sha256=sha256(path), bytes=path.stat().st_size)


def check_file(target: Path, item: FileEntry, owner: str) -> None:
    """One artifact (possibly copied elsewhere under another name) against its manifest entry."""
    if not target.is_file():
        raise ManifestError(f"{owner}: {target} is missing (the build is incomplete: rebuild or copy it whole)")
    if target.stat().st_size != item.bytes or sha256(target) != item.sha256:
        raise ManifestError(f"{owner}: {item.path} does not match its checksum (corrupted or replaced)")


def check_graph_files(folder: Path, entry: GraphEntry, engine: bool = True) -> None:
    """Check one graph's own files (and its engine) against their sizes and sha256, naming the first that differs."""
    for item in [*entry.forms(), *([entry.engine] if engine and entry.engine else [])]:
        check_file(folder / item.path, item, entry.name)


def _same_file(target: Path, checked: Path, item: FileEntry) -> bool:
    """Whether ``target`` is ``checked`` itself (one inode, as a hard link makes) at the recorded size."""
    try:
        mine, theirs = target.stat(), checked.stat()
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino) and mine.st_size == item.bytes


def check_weights(manifest: Manifest, folder: Path, linked_from: Path | None = None) -> None:
    """The weights files against their sizes and sha256. ``linked_from``: a build folder whose files were
    checked already; a weights file that is the same file there (a hard link: same inode) is not hashed again."""
    for item in manifest.weight_files:
        target = folder / item.path
        if linked_from is not None and _same_file(target, linked_from / item.path, item):
            continue
        check_file(target, item, "weights")


def check_files(manifest: Manifest, folder: Path, engines: bool = True) -> None:
    """Every artifact against its size and sha256, each file hashed once (the shared weights, the graphs
    stages share); ``engines=False`` leaves the plans out, for the backends that never open them."""
    check_weights(manifest, folder)
    seen: set[str] = set()
    for entry in manifest.all_graphs():
        for item in [*entry.forms(), entry.engine if engines else None]:
            if item is not None and item.path not in seen:
                seen.add(item.path)
                check_file(folder / item.path, item, entry.name)
                if item is not entry.engine:
                    check_external_data(manifest, folder, item, entry.name)


def check_graph(manifest: Manifest, folder: Path, entry: GraphEntry, engine: bool = True) -> None:
    """What one graph relies on: the shared weights, its graph file and (``engine``) its engine."""
    check_weights(manifest, folder)
    check_graph_files(folder, entry, engine)


def check_external_data(manifest: Manifest, folder: Path, item: FileEntry, owner: str) -> None:
    """Every external-data file a graph reads is one the manifest lists (and so hashes): a graph pointed at
    another file (by hand, or a refit's delta left out) would run on weights nobody checked."""
    from ..userfiles import load_onnx

    listed = {(folder / weights.path).resolve() for weights in manifest.weight_files}
    graph = folder / item.path
    for tensor in load_onnx(graph, ManifestError).graph.initializer:
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if location is not None and (graph.parent / location).resolve() not in listed:
            raise ManifestError(f"{owner}: {item.path} reads tensor '{tensor.name}' from {location}, which the "
                                f"manifest does not list; expected {', '.join(w.path for w in manifest.weight_files)}")


def manifest_sha256(folder: Path) -> str:
    """The checksum of a build's manifest file: what identifies the build (refit lineage, eval's records)."""
    return sha256(folder / MANIFEST)


def lora_entry(file: str, scale: float) -> LoraEntry:
    """The record of a LoRA file fused at ``scale``."""
    from ..lora import lora_path

    path = lora_path(file).resolve()
    return LoraEntry(file=str(path), sha256=sha256(path), bytes=path.stat().st_size, scale=scale)


def check_lora(entry: LoraEntry) -> None:
    """The file is still the one the build fused: a changed LoRA would make a reference of another model."""
    from ..lora import LoraError, lora_path

    path = lora_path(entry.file)
    if path.stat().st_size != entry.bytes or sha256(path) != entry.sha256:
        raise LoraError(f"LoRA {entry.file} changed since the build fused it (sha256 differs); restore it, or "
                        "rebuild (or refit) with the new file")


def pipeline_info(folder: Path) -> PipelineInfo:
    """The record of the pipeline folder a build's model came from: every file's fingerprint."""
    from ..models import pipeline_files

    return PipelineInfo(folder=str(folder), files=[
        PipelineFile(path=str(f.relative_to(folder)), sha256=sha256(f), bytes=(st := f.stat()).st_size,
                     mtime_ns=st.st_mtime_ns) for f in pipeline_files(folder)])


def pipeline_changes(info: PipelineInfo) -> list[str]:
    """The recorded pipeline files now missing or different (re-hashed only where size or time changed)."""
    folder = Path(info.folder)
    changed = []
    for item in info.files:
        path = folder / item.path
        if not path.is_file():
            changed.append(f"{item.path} (missing)")
            continue
        stat = path.stat()
        if stat.st_size != item.bytes or (stat.st_mtime_ns != item.mtime_ns and sha256(path) != item.sha256):
            changed.append(item.path)
    return changed
