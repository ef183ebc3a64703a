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
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator

from .contract import GraphContract
from .errors import AtedmError, format_validation_error
from .pruning import StagePlan
from .shapes import Shape, shape_keys
from .spec import GraphSpec, parse_spec
from .userfiles import load_json

FORMAT = "atedm-export.manifest/3"  # 2: every graph in onnx/, one shared weights file; 3: graphs per shape
FILENAME = "manifest.json"


class ManifestError(AtedmError):
    """A build folder whose manifest or artifacts cannot be trusted."""


class ShapeError(ManifestError):
    """A shape the build has no graphs for."""


class ScheduleError(ManifestError):
    """A step the build cannot run: outside the run, an unknown timestep, or a stage that was not built."""


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
    """One static graph: a DSAP stage, or the unpruned baseline."""

    name: str
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

    def form_files(self) -> dict[str, FileEntry]:
        """The graph's file of each form built: ``portable``, then ``onnxruntime`` (fused) and ``plugin``."""
        files = {"portable": self.onnx, "onnxruntime": self.ort_onnx, "plugin": self.plugin_onnx}
        return {form: item for form, item in files.items() if item is not None}

    def forms(self) -> list[FileEntry]:
        """The graph's files, one per form (``form_files``)."""
        return list(self.form_files().values())


class EngineInfo(_Model):
    backend: str  # tensorrt | tensorrt-rtx | onnx
    library: str | None = None  # python module
    version: str | None = None
    targets: list[str] = []
    optimization_level: int | None = None
    weights_stripped: bool = False  # plans without weights, refitted from each graph's ONNX at load
    refittable: bool = False  # plans take other weights than their graph's (a refit build's): built with REFIT
    skipped: str | None = None  # why no engines were built
    form: str = "portable"  # the graph form the engines were built from (export.FORMS)
    form_reason: str | None = None  # why that form, where the build has another (compile/api.py plugin_refusal)


class LoraEntry(_Model):
    """A LoRA fused into the build's weights (``lora.py``): the file as given, its checksum and its scale."""

    file: str  # absolute
    sha256: str
    bytes: int
    scale: float

    @classmethod
    def of(cls, file: str, scale: float) -> LoraEntry:
        from .lora import lora_path

        path = lora_path(file).resolve()
        return cls(file=str(path), sha256=sha256(path), bytes=path.stat().st_size, scale=scale)

    def check(self) -> None:
        """The file is still the one the build fused: a changed LoRA would make a reference of another model."""
        from .lora import LoraError, lora_path

        path = lora_path(self.file)
        if path.stat().st_size != self.bytes or sha256(path) != self.sha256:
            raise LoraError(f"LoRA {self.file} changed since the build fused it (sha256 differs); restore it, or "
                            "rebuild (or refit) with the new file")


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

    @classmethod
    def of(cls, folder: Path) -> PipelineInfo:
        from .models import pipeline_files

        return cls(folder=str(folder), files=[PipelineFile(path=str(f.relative_to(folder)), sha256=sha256(f),
                                                           bytes=(st := f.stat()).st_size, mtime_ns=st.st_mtime_ns)
                                              for f in pipeline_files(folder)])

    def changed(self) -> list[str]:
        """The recorded files now missing or different (re-hashed only where size or time changed)."""
        folder = Path(self.folder)
        changed = []
        for item in self.files:
            path = folder / item.path
            if not path.is_file():
                changed.append(f"{item.path} (missing)")
                continue
            stat = path.stat()
            if stat.st_size != item.bytes or (stat.st_mtime_ns != item.mtime_ns and sha256(path) != item.sha256):
                changed.append(item.path)
        return changed


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


class Manifest(_Model):
    """A build's record. Most readers work on one shape: ``tokens``, ``inputs``, ``outputs``, ``baseline``,
    ``stages`` and ``graph_spec`` are those of the selected shape (the first; ``at(shape)`` selects another),
    so a single-shape reader needs no change to read each shape of a multi-shape build."""

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
    _selected: int = PrivateAttr(0)

    # --- shapes ---------------------------------------------------------------------------------

    @property
    def selected(self) -> ShapeGraphs:
        """The shape this view of the manifest reads (``at``)."""
        return self.shapes[self._selected]

    @property
    def shape(self) -> Shape:
        return self.selected.shape

    @property
    def shape_list(self) -> list[Shape]:
        return [s.shape for s in self.shapes]

    @property
    def multi_shape(self) -> bool:
        return len(self.shapes) > 1

    def at(self, shape: Shape) -> Manifest:
        """This manifest viewing ``shape``'s graphs; a shape the build lacks is one line listing those it has."""
        for index, graphs in enumerate(self.shapes):
            if graphs.shape == shape:
                return self._view(index)
        raise ShapeError(f"this build has no graphs for {shape} ({shape.key}); it has: {shape_keys(self.shape_list)}")

    def at_latent(self, batch: int, height: int, width: int) -> Manifest:
        """The view for a UNet call whose ``sample`` is ``[batch, C, height, width]`` (latent pixels)."""
        for index, graphs in enumerate(self.shapes):
            if graphs.shape.latent == (batch, height, width):
                return self._view(index)
        raise ShapeError(f"no graphs for batch {batch} at {width * 8}x{height * 8} px (latent {width}x{height}); "
                         f"this build has: {shape_keys(self.shape_list)}")

    def find(self, width: int | None = None, height: int | None = None, batch: int | None = None) -> Manifest:
        """The view of the first shape (in the build's order) with the given width, height and batch (each optional):
        what ``generate --width/--height/--batch`` asks for; none is a one-line ``ShapeError`` listing the shapes."""
        wanted = {"width": width, "height": height, "batch": batch}
        for index, graphs in enumerate(self.shapes):
            if all(value is None or getattr(graphs, key) == value for key, value in wanted.items()):
                return self._view(index)
        asked = " ".join(f"{key} {value}" for key, value in wanted.items() if value is not None)
        raise ShapeError(f"this build has no graphs for {asked}; it has: {shape_keys(self.shape_list)} "
                         "(width x height, batch)")

    def views(self) -> list[Manifest]:
        """One view per shape, in the build's order."""
        return [self._view(i) for i in range(len(self.shapes))]

    def _view(self, index: int) -> Manifest:
        if index == self._selected:
            return self
        view = self.model_copy()
        for cached in ("graph_spec", "contract"):
            view.__dict__.pop(cached, None)
        view._selected = index
        return view

    @property
    def tokens(self) -> dict[str, int]:
        return self.selected.tokens

    @property
    def inputs(self) -> list[TensorEntry]:
        return self.selected.inputs

    @property
    def outputs(self) -> list[TensorEntry]:
        return self.selected.outputs

    @property
    def baseline(self) -> GraphEntry:
        return self.selected.baseline

    @property
    def stages(self) -> list[GraphEntry]:
        return self.selected.stages

    @functools.cached_property
    def full_spec(self) -> GraphSpec:
        """The spec as built, every shape listed."""
        return parse_spec(self.spec, "manifest spec")

    @functools.cached_property
    def graph_spec(self) -> GraphSpec:
        """The spec at the selected shape (a single-shape spec)."""
        spec = self.full_spec
        return spec.at(self.shape) if spec.shapes else spec

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
        """The selected shape's graphs: its baseline, then its stages."""
        return [self.baseline, *self.stages]

    def all_graphs(self) -> list[GraphEntry]:
        """Every shape's graphs."""
        return [g for shape in self.shapes for g in (shape.baseline, *shape.stages)]

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
        return StagePlan(pruned, self.graph_spec.pruning, dict(self.tokens))

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
        data = load_json(path, "an atedm-export build manifest", ManifestError)
        found = data.get("format") if isinstance(data, dict) else None
        if found != FORMAT:
            raise ManifestError(f"{path} has format {found!r}; this atedm-export reads {FORMAT!r} (rebuild it)")
        try:
            manifest = cls.model_validate(data)
        except ValidationError as exc:
            raise ManifestError(format_validation_error(exc, str(path))) from None
        manifest.check_consistent(path)
        if verify:
            manifest.verify_files(folder)
        return manifest

    def check_consistent(self, source: Path | str = FILENAME) -> None:
        """What the manifest says must agree with what its spec implies, or loading says which field disagrees.

        A hand-edited manifest (another height in its spec, stages whose steps overlap) would otherwise load
        and mislead later: a runtime feeding graphs the wrong shapes, ``inspect`` summing steps twice.
        """
        try:
            listed = self.full_spec.shape_list
        except AtedmError as exc:
            raise ManifestError(f"{source}: spec: {exc}") from None
        if list(listed) != self.shape_list:
            raise ManifestError(f"{source}: shapes: {shape_keys(self.shape_list)} are recorded, but its spec lists "
                                f"{shape_keys(listed)}")
        self._check_loras(source)
        for view in self.views():
            view._check_shape(source)

    def _check_loras(self, source: Path | str) -> None:
        """The LoRAs fused into the weights are the ones its spec lists (refits append theirs to both), each at the
        spec's scale, which the spec bounds: an edit to either list, or a scale out of bounds, is refused."""
        def shown(items: list[tuple[Path, float]]) -> str:
            return ", ".join(f"{path.name} ×{scale:g}" for path, scale in items) or "none"

        listed = [(Path(item.file).resolve(), item.scale) for item in self.full_spec.loras]
        recorded = [(Path(entry.file).resolve(), entry.scale) for entry in self.loras]
        if listed != recorded:
            raise ManifestError(f"{source}: loras: {shown(recorded)} are recorded, but its spec lists {shown(listed)}")

    def _check_shape(self, source: Path | str) -> None:
        """The selected shape's I/O, keep counts and stages against what its spec implies."""
        try:
            spec = self.graph_spec
            contract = self.contract
        except AtedmError as exc:
            raise ManifestError(f"{source}: spec: {exc}") from None
        if self.multi_shape:
            source = f"{source}: shape {self.shape.key}"
        for field, recorded, implied in (("inputs", self.inputs, contract.inputs), ("outputs", self.outputs, contract.outputs)):
            implied_entries = [TensorEntry.of(t) for t in implied]
            if list(recorded) != implied_entries:
                wrong = next((r, i) for r, i in zip([*recorded, None], [*implied_entries, None]) if r != i)
                raise ManifestError(f"{source}: {field}: {_tensor(wrong[0])} is recorded, but its spec ({spec.width}x"
                                    f"{spec.height}, batch {spec.batch}, {spec.precision}) implies {_tensor(wrong[1])}")
        for entry in self.graphs():
            if set(entry.keep) != set(self.tokens) or any(entry.keep[b] > n or entry.keep[b] < 1 for b, n in self.tokens.items()):
                raise ManifestError(f"{source}: {entry.name}: keep counts must name every block of 'tokens' with 1 to "
                                    "its token count")
        if self.baseline.keep != self.tokens or self.baseline.steps != [0, spec.steps]:
            raise ManifestError(f"{source}: baseline: must keep every token over steps [0, {spec.steps}]")
        self._check_stages(source)

    def _check_stages(self, source: Path | str) -> None:
        """Each stage is its schedule's, in its order, over the steps the schedule gives it: the stages tile the run."""
        schedule = self.graph_spec.dsap
        ranges = dict(zip((s.name for s in schedule.stages), schedule.step_ranges(self.graph_spec.steps)))
        until = {s.name: s.until for s in schedule.stages}
        names = [e.name for e in self.stages]
        if len(set(names)) != len(names) or any(n not in ranges for n in names) or \
                names != [n for n in ranges if n in names]:
            raise ManifestError(f"{source}: stages: {names} are not stages of its schedule in order "
                                f"({', '.join(ranges)})")
        for entry in self.stages:
            expected = ranges[entry.name]
            if entry.steps != [expected.start, expected.stop] or entry.until != until[entry.name]:
                raise ManifestError(f"{source}: stage '{entry.name}': steps {entry.steps} (until {entry.until}) are "
                                    f"recorded, but its schedule gives [{expected.start}, {expected.stop}) "
                                    f"(until {until[entry.name]}) of {self.graph_spec.steps}")
        if self.complete and len(names) != len(ranges):
            raise ManifestError(f"{source}: complete: the build says every stage was built, but it has "
                                f"{', '.join(names)} of {', '.join(ranges)}")

    @property
    def weight_files(self) -> list[FileEntry]:
        """The external-data files the graphs point into: the base weights, and a refit build's delta."""
        return [self.weights, *([self.weights_delta] if self.weights_delta else [])]

    def verify_weights(self, folder: Path, linked_from: Path | None = None) -> None:
        """The weights files against their sizes and sha256. ``linked_from``: a build folder whose files were
        checked already; a weights file that is the same file there (a hard link: same inode) is not hashed again."""
        for item in self.weight_files:
            target = folder / item.path
            if linked_from is not None and _same_file(target, linked_from / item.path, item):
                continue
            verify_file(target, item, "weights")

    def verify_files(self, folder: Path, engines: bool = True) -> None:
        """Every artifact against its size and sha256, each file hashed once (the shared weights, the graphs
        stages share); ``engines=False`` leaves the plans out, for the backends that never open them."""
        self.verify_weights(folder)
        seen: set[str] = set()
        for entry in self.all_graphs():
            items = [*entry.forms(), entry.engine if engines else None]
            for item in items:
                if item is not None and item.path not in seen:
                    seen.add(item.path)
                    verify_file(folder / item.path, item, entry.name)
                    if item is not entry.engine:
                        self.check_external_data(folder, item, entry.name)

    def check_external_data(self, folder: Path, item: FileEntry, owner: str) -> None:
        """Every external-data file a graph reads is one the manifest lists (and so hashes): a graph pointed at
        another file (by hand, or a refit's delta left out) would run on weights nobody checked."""
        from .userfiles import load_onnx

        listed = {(folder / weights.path).resolve() for weights in self.weight_files}
        graph = folder / item.path
        for tensor in load_onnx(graph, ManifestError).graph.initializer:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location is not None and (graph.parent / location).resolve() not in listed:
                raise ManifestError(f"{owner}: {item.path} reads tensor '{tensor.name}' from {location}, which the "
                                    f"manifest does not list; expected {', '.join(w.path for w in self.weight_files)}")

    def verify_graph(self, folder: Path, entry: GraphEntry, engine: bool = True) -> None:
        """What one graph relies on: the shared weights, its graph file and (``engine``) its engine."""
        self.verify_weights(folder)
        verify_entry(folder, entry, engine)

    def model_fingerprint(self) -> dict[str, Any]:
        """What must agree between builds whose outputs are compared (``eval``'s images, ``bench``'s side by side):
        the model (the spec's, with the seed built-in weights are drawn with, and where the build recorded the
        pipeline it came from, every file's sha256: two folders of one name can hold other weights), size, batch
        and precision."""
        spec = self.graph_spec
        pipeline = sorted((f.path, f.sha256) for f in self.pipeline.files) if self.pipeline else None
        return {"model": spec.model, "weights seed": spec.seed, "pipeline files": pipeline,
                "loras": [(lora.sha256, lora.scale) for lora in self.loras], "height": spec.height,
                "width": spec.width, "batch": spec.batch, "precision": spec.precision}

    def origin(self, folder: Path) -> str:
        """The sha256 of the manifest of the build that exported these graphs: this build's own, or for a refit
        build the one it was refitted from (through any chain of refits). Two builds of one origin run the same
        graphs with their own weights (``StagedUNet.use_weights``)."""
        return self.refit.origin_sha256 if self.refit else sha256(folder / FILENAME)

    def check_same_graphs(self, folder: Path, other: Manifest, other_folder: Path) -> None:
        """Refuse ``other`` unless it holds these very graphs (a refit of one origin) at every shape and stage."""
        if other.origin(other_folder) != self.origin(folder):
            raise ManifestError(f"{other_folder} does not hold the graphs of {folder} (it is not a refit of the same "
                                "build); switching weights needs the same graphs: use atedm-export refit")
        mine = [(s.shape, [g.name for g in (s.baseline, *s.stages)]) for s in self.shapes]
        theirs = [(s.shape, [g.name for g in (s.baseline, *s.stages)]) for s in other.shapes]
        if mine != theirs:
            raise ManifestError(f"{other_folder} has other shapes or stages than {folder}; switching weights needs "
                                "the same graphs")

    def files(self) -> list[FileEntry]:
        """Every distinct file of the build (stages that reuse the baseline's add nothing)."""
        unique = {item.path: item for item in self.weight_files}
        for entry in self.all_graphs():
            for item in (*entry.forms(), entry.engine):
                if item is not None:
                    unique.setdefault(item.path, item)
        return list(unique.values())


def check_same_model(folders: list[Path], manifests: list[Manifest], command: str) -> None:
    """Refuse builds ``command`` cannot compare (``Manifest.model_fingerprint``), naming the first field that differs."""
    first = manifests[0].model_fingerprint()
    for folder, manifest in zip(folders[1:], manifests[1:]):
        other = manifest.model_fingerprint()
        for key, value in first.items():
            if other[key] != value:
                raise AtedmError(f"builds {folders[0]} and {folder} differ in {key} ({_shown(key, value)} vs "
                                 f"{_shown(key, other[key])}); {command} compares builds of one model at one size, "
                                 "batch and precision")


def _shown(key: str, value: Any) -> str:  # noqa: ANN401
    """A fingerprint field in a message: the pipeline's file list is too long to print."""
    if key == "pipeline files":
        return "a pipeline folder's files" if value else "no pipeline folder"
    if key == "loras":
        return "LoRAs " + ", ".join(f"{sha[:12]}… ×{scale:g}" for sha, scale in value) if value else "no LoRA"
    return str(value)


def _tensor(entry: TensorEntry | None) -> str:
    return "nothing" if entry is None else f"'{entry.name}' {entry.shape} {entry.dtype}"


def verify_entry(folder: Path, entry: GraphEntry, engine: bool = True) -> None:
    """Check one graph's own files (and its engine) against their sizes and sha256, naming the first that differs."""
    for item in [*entry.forms(), *([entry.engine] if engine and entry.engine else [])]:
        verify_file(folder / item.path, item, entry.name)


def _same_file(target: Path, checked: Path, item: FileEntry) -> bool:
    """Whether ``target`` is ``checked`` itself (one inode, as a hard link makes) at the recorded size."""
    try:
        mine, theirs = target.stat(), checked.stat()
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino) and mine.st_size == item.bytes


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
