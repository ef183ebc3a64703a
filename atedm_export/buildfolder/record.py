"""The build's record, ``BUILD/manifest.json``, as pydantic models and nothing else.

It holds the resolved spec (schedule inline), the UNet config, each shape's graphs with their static I/O, keep
counts, counted FLOPs and files (sha256), the engine library with its version and targets, and tool versions.
Reading it from a folder, checking it and writing it are ``store.py``'s; one shape's reading is ``view.py``'s.
"""

from __future__ import annotations

import functools
from pathlib import PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from ..shapes import Shape
from ..spec import GraphSpec, parse_spec

FORMAT = "atedm-export.manifest/4"  # 3: graphs per shape; 4: graphs know their shape, EngineInfo names its library


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Model):
    path: str  # relative to the build folder
    sha256: str
    bytes: int

    @field_validator("path")
    @classmethod
    def _inside_the_build(cls, value: str) -> str:
        """A build's files are its own: a path that leads out of the folder (edited by hand) is refused."""
        parts = PurePosixPath(value).parts
        if not parts or PurePosixPath(value).is_absolute() or ".." in parts:
            raise ValueError(f"'{value}' leads outside the build folder; expected a path inside it")
        return value


class TensorEntry(_Model):
    name: str
    shape: list[int]
    dtype: str

    @classmethod
    def of(cls, tensor: Any) -> TensorEntry:  # noqa: ANN401 - contract.TensorSpec
        """The manifest's record of one of the contract's tensors."""
        return cls(name=tensor.name, shape=list(tensor.shape), dtype=tensor.dtype)


class GraphEntry(_Model):
    """One static graph: a DSAP stage, or the unpruned baseline, at one shape."""

    name: str
    shape: str  # the key of the shape it was exported at (``Shape.key``)
    until: float | None  # end of the stage as a fraction of the steps; None for the baseline
    steps: list[int]  # [first, stop) for the spec's step count
    keep: dict[str, int]  # kept tokens per attention block (== tokens where unpruned)
    onnx: FileEntry  # the graph's nodes and small tensors; its weights are the build's shared file
    ort_onnx: FileEntry | None = None  # onnxruntime's fused form of the graph (ortfuse.py), where built
    plugin_onnx: FileEntry | None = None  # the map layer as the kernels' atedm nodes (kernels/nodes.py), where built
    engine: FileEntry | None
    graph_tflops: float  # per image-step, counted from the ONNX graph
    module_tflops: float  # per image-step, counted on the patched torch module
    export_seconds: float
    compile_seconds: float | None
    export_peak_rss: int | None = None  # bytes: the export process's peak resident memory
    compile_peak_rss: int | None = None  # bytes: the engine builder process's peak resident memory
    same_as: str | None = None  # a stage that prunes nothing reuses the baseline's files

    @property
    def step_count(self) -> int:
        """How many of the spec's denoising steps this graph runs."""
        return self.steps[1] - self.steps[0]

    @property
    def step_range(self) -> range:
        return range(self.steps[0], self.steps[1])

    def form_files(self) -> dict[str, FileEntry]:
        """The graph's file of each form built: ``portable``, then ``onnxruntime`` (fused) and ``plugin``."""
        files = {"portable": self.onnx, "onnxruntime": self.ort_onnx, "plugin": self.plugin_onnx}
        return {form: item for form, item in files.items() if item is not None}

    def forms(self) -> list[FileEntry]:
        """The graph's files, one per form (``form_files``)."""
        return list(self.form_files().values())


class EngineInfo(_Model):
    """The engines of a build: which engine library made them (None: ONNX graphs only), for which targets."""

    library: str | None  # tensorrt | tensorrt-rtx; None where no engines were built (``skipped`` says why)
    module: str | None = None  # the library's Python module
    version: str | None = None
    targets: list[str] = []
    optimization_level: int | None = None
    weights_stripped: bool = False  # plans without weights, refitted from each graph's ONNX at load
    refittable: bool = False  # plans take other weights than their graph's (a refit build's): built with REFIT
    skipped: str | None = None  # why no engines were built
    form: str = "portable"  # the graph form the engines were built from (export.FORMS)
    form_reason: str | None = None  # why that form, where the build has another (compile/api.py plugin_refusal)

    @property
    def built(self) -> bool:
        return self.library is not None


class LoraEntry(_Model):
    """A LoRA fused into the build's weights (``lora.py``): the file as given, its checksum and its scale."""

    file: str  # absolute
    sha256: str
    bytes: int
    scale: float


class RefitInfo(_Model):
    """Where a refit build (``atedm-export refit``) came from: the same graphs, other weights."""

    build: str  # the build folder it was refitted from (absolute, at the time)
    manifest_sha256: str  # that build's manifest.json
    origin_sha256: str  # manifest.json of the build that exported these graphs (the first of a chain of refits)
    seconds: float


class PipelineFile(_Model):
    path: str  # relative to the pipeline folder
    sha256: str
    bytes: int
    mtime_ns: int  # a file of the same size and time is not hashed again


class PipelineInfo(_Model):
    """The pipeline ``generate`` loads around the build's UNet (VAE, text encoders, tokenizers, scheduler):
    where it is and a fingerprint of every file, so a component changed since the build is reported."""

    folder: str  # absolute
    files: list[PipelineFile]


class ShapeGraphs(_Model):
    """The graphs of one static shape: its token counts, I/O, unpruned baseline and DSAP stages."""

    batch: int
    height: int
    width: int
    tokens: dict[str, int]
    inputs: list[TensorEntry]
    outputs: list[TensorEntry]
    baseline: GraphEntry
    stages: list[GraphEntry]

    @property
    def shape(self) -> Shape:
        return Shape(batch=self.batch, height=self.height, width=self.width)

    def graphs(self) -> list[GraphEntry]:
        """The baseline, then the stages."""
        return [self.baseline, *self.stages]

    @model_validator(mode="after")
    def _graphs_at_this_shape(self) -> ShapeGraphs:
        """Each graph names the shape it sits under: a graph moved between shapes by hand is refused."""
        key = self.shape.key
        for entry in self.graphs():
            if entry.shape != key:
                raise ValueError(f"graph '{entry.name}' says shape {entry.shape} under shape {key}")
        return self


class Manifest(_Model):
    """A build's record: every shape's graphs over one weights file. One shape's reading is a ``ShapeView``."""

    format: str = FORMAT
    created: str
    spec: dict[str, Any]
    unet_config: dict[str, Any]
    weights: FileEntry  # the external-data file every graph's weights point into (onnx/); a refit build's base
    weights_delta: FileEntry | None = None  # a refit build's tensors its LoRAs changed, beside the base (onnx/)
    shapes: list[ShapeGraphs]  # in the spec's order; the first is the default
    complete: bool  # every stage of the schedule was built (not a --stages subset)
    engine: EngineInfo
    versions: dict[str, str]
    build_seconds: float
    pipeline: PipelineInfo | None = None  # where the model is a local diffusers pipeline
    loras: list[LoraEntry] = []  # fused into the weights, in order: the spec's, then each refit's
    refit: RefitInfo | None = None  # a refit build: the graphs of another build, with other weights

    @property
    def shape_list(self) -> list[Shape]:
        return [s.shape for s in self.shapes]

    @property
    def multi_shape(self) -> bool:
        return len(self.shapes) > 1

    @functools.cached_property
    def full_spec(self) -> GraphSpec:
        """The spec as built, every shape listed."""
        return parse_spec(self.spec, "manifest spec")

    def all_graphs(self) -> list[GraphEntry]:
        """Every shape's graphs."""
        return [g for shape in self.shapes for g in shape.graphs()]

    @property
    def weight_files(self) -> list[FileEntry]:
        """The external-data files the graphs point into: the base weights, and a refit build's delta."""
        return [self.weights, *([self.weights_delta] if self.weights_delta else [])]

    def files(self) -> list[FileEntry]:
        """Every distinct file of the build (stages that reuse the baseline's add nothing)."""
        unique = {item.path: item for item in self.weight_files}
        for entry in self.all_graphs():
            for item in (*entry.forms(), entry.engine):
                if item is not None:
                    unique.setdefault(item.path, item)
        return list(unique.values())
