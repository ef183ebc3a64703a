"""``BUILD/manifest.json``: what a build holds, enough for the runtime, verify, inspect, bench and deploy.

The manifest records the resolved spec (schedule inline), the UNet config, every graph's static I/O,
keep counts, counted FLOPs, files with sha256, the engine library, its version and target, and tool
versions. Loading checks the format version first and every checksum, so a flipped byte or a manifest
from another format fails with one clear line, never later inside an engine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .contract import GraphContract
from .errors import AtedmError, format_validation_error
from .pruning import StagePlan
from .spec import GraphSpec, parse_spec

FORMAT = "atedm-export.manifest/2"  # 2: every graph in onnx/, one shared weights file
FILENAME = "manifest.json"


class ManifestError(AtedmError):
    """A build folder whose manifest or artifacts cannot be trusted."""


class ScheduleError(ManifestError):
    """A step the build cannot run: outside the run, an unknown timestep, or a stage that was not built."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Model):
    path: str  # relative to the build folder
    sha256: str
    bytes: int


class TensorEntry(_Model):
    name: str
    shape: list[int]
    dtype: str


class GraphEntry(_Model):
    """One static graph: a DSAP stage, or the unpruned baseline."""

    name: str
    until: float | None  # end of the stage as a fraction of the steps; None for the baseline
    steps: list[int]  # [first, stop) for the spec's step count
    keep: dict[str, int]  # kept tokens per attention block (== tokens where unpruned)
    onnx: FileEntry  # the graph's nodes and small tensors; its weights are the build's shared file
    ort_onnx: FileEntry | None = None  # onnxruntime's fused form of the graph (ortfuse.py), where built
    engine: FileEntry | None
    graph_tflops: float  # per image-step, counted from the ONNX graph
    module_tflops: float  # per image-step, counted on the patched torch module
    export_seconds: float
    compile_seconds: float | None
    export_peak_rss: int | None = None  # bytes: the export process's peak resident memory
    compile_peak_rss: int | None = None  # bytes: the engine builder process's peak resident memory
    same_as: str | None = None  # a stage that prunes nothing reuses the baseline's files


class EngineInfo(_Model):
    backend: str  # tensorrt | tensorrt-rtx | onnx
    library: str | None = None  # python module
    version: str | None = None
    targets: list[str] = []
    optimization_level: int | None = None
    weights_stripped: bool = False  # plans without weights, refitted from each graph's ONNX at load
    skipped: str | None = None  # why no engines were built


class Manifest(_Model):
    format: str = FORMAT
    created: str
    spec: dict[str, Any]
    unet_config: dict[str, Any]
    tokens: dict[str, int]
    inputs: list[TensorEntry]
    outputs: list[TensorEntry]
    weights: FileEntry  # the one external-data file every graph's weights point into (onnx/)
    baseline: GraphEntry
    stages: list[GraphEntry]
    complete: bool  # every stage of the schedule was built (not a --stages subset)
    engine: EngineInfo
    versions: dict[str, str]
    build_seconds: float

    @functools.cached_property
    def graph_spec(self) -> GraphSpec:
        return parse_spec(self.spec, "manifest spec")

    @functools.cached_property
    def contract(self) -> GraphContract:
        """The graphs' I/O contract (what ``inputs`` and ``outputs`` record), with the feeds that go with it."""
        return self.graph_spec.contract(self.unet_config)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_name(self) -> str:
        return self.outputs[0].name

    def stage_at(self, step: int, num_steps: int) -> tuple[int, GraphEntry]:
        """``(index in the schedule, built stage)`` that runs denoising ``step`` of ``num_steps``.

        The one lookup the runtime (``StagedUNet``) and the server (``Router``) share, so a client and
        a server can never read the schedule differently.
        """
        if num_steps < 1 or not 0 <= step < num_steps:
            raise ScheduleError(f"step {step} is outside a run of {num_steps} steps (expected 0 <= step < num_steps)")
        schedule = self.graph_spec.dsap
        index = schedule.stage_index(step, num_steps)
        name = schedule.stages[index].name
        for entry in self.stages:
            if entry.name == name:
                return index, entry
        steps = schedule.step_ranges(num_steps)[index]
        raise ScheduleError(
            f"step {step} of {num_steps} needs stage '{name}' (steps {steps.start}-{steps.stop - 1}), which this "
            f"build does not have; built: {', '.join(e.name for e in self.stages)}"
        )

    def graphs(self) -> list[GraphEntry]:
        return [self.baseline, *self.stages]

    def graph(self, name: str) -> GraphEntry:
        for entry in self.graphs():
            if entry.name == name:
                return entry
        raise ManifestError(f"build has no graph '{name}'; it has: {', '.join(g.name for g in self.graphs())}")

    def plan(self, entry: GraphEntry) -> StagePlan | None:
        """The stage plan a graph was exported with (None: the stock UNet)."""
        pruned = {b: k for b, k in entry.keep.items() if k < self.tokens[b]}
        if entry.name == "baseline" or not pruned:
            return None
        return StagePlan(pruned, self.graph_spec.pruning.options(), dict(self.tokens))

    def save(self, folder: Path) -> Path:
        path = folder / FILENAME
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path, verify: bool = True) -> Manifest:
        """Read and check a build folder's manifest; ``verify`` also re-hashes every artifact."""
        folder = Path(folder)
        path = folder / FILENAME
        if not path.is_file():
            raise ManifestError(f"{folder} is not a build folder: {FILENAME} not found (run atedm-export build first)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        found = data.get("format") if isinstance(data, dict) else None
        if found != FORMAT:
            raise ManifestError(f"{path} has format {found!r}; this atedm-export reads {FORMAT!r} (rebuild it)")
        try:
            manifest = cls.model_validate(data)
        except ValidationError as exc:
            raise ManifestError(format_validation_error(exc, str(path))) from None
        if verify:
            manifest.verify_files(folder)
        return manifest

    def verify_files(self, folder: Path) -> None:
        """Every artifact against its size and sha256; the shared weights are hashed once."""
        verify_file(folder / self.weights.path, self.weights, "weights")
        for entry in self.graphs():
            verify_entry(folder, entry)

    def verify_graph(self, folder: Path, entry: GraphEntry, engine: bool = True) -> None:
        """What one graph relies on: the shared weights, its graph file and (``engine``) its engine."""
        verify_file(folder / self.weights.path, self.weights, "weights")
        verify_entry(folder, entry, engine)

    def files(self) -> list[FileEntry]:
        """Every distinct file of the build (stages that reuse the baseline's add nothing)."""
        unique = {self.weights.path: self.weights}
        for entry in self.graphs():
            for item in (entry.onnx, entry.ort_onnx, entry.engine):
                if item is not None:
                    unique.setdefault(item.path, item)
        return list(unique.values())


def verify_entry(folder: Path, entry: GraphEntry, engine: bool = True) -> None:
    """Check one graph's own files (and its engine) against their sizes and sha256, naming the first that differs."""
    for item in [entry.onnx, *([entry.ort_onnx] if entry.ort_onnx else []),
                 *([entry.engine] if engine and entry.engine else [])]:
        verify_file(folder / item.path, item, entry.name)


def verify_file(target: Path, item: FileEntry, owner: str) -> None:
    """One artifact (possibly copied elsewhere under another name) against its manifest entry."""
    if not target.is_file():
        raise ManifestError(f"{owner}: {target} is missing (the build is incomplete: rebuild or copy it whole)")
    if target.stat().st_size != item.bytes or sha256(target) != item.sha256:
        raise ManifestError(f"{owner}: {item.path} does not match its checksum (corrupted or replaced)")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(folder: Path, path: Path) -> FileEntry:
    return FileEntry(path=os.path.relpath(path, folder), sha256=sha256(path), bytes=path.stat().st_size)


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("atedm-export", "torch", "diffusers", "onnx", "onnxruntime", "onnx-graphsurgeon"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions
