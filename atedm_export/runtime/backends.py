"""Backends that run one graph of a build: eager PyTorch, onnxruntime, TensorRT / TensorRT-RTX.

All take and return torch tensors keyed by the manifest's input names, and check shapes, dtypes, device
and finiteness against the manifest before running, naming the expected values when they differ.

Loading a backend checks the build files that backend opens, and only those (``Backend.check_build_files``): a
build whose engine plan is missing or stale still runs on onnxruntime, and refuses only where a plan is run.

What the rest of the package knows of a backend it reads off its class, never off its name: each class declares
the names it is chosen by (``BACKENDS``, which ``registry.RUNTIME_BACKENDS`` lists for the CLI without torch), the
build files it opens, and how ``bench`` runs it (its forms, their options, whether its baseline is the stock UNet).
"""

from __future__ import annotations

import abc
import copy
import ctypes
import gc
from pathlib import Path
from collections.abc import Sequence
from typing import ClassVar

import torch

from ..contract import precision_of
from ..errors import AtedmError
from ..buildfolder import (FileEntry, GraphEntry, Manifest, ShapeView, check_lora, first_view, read_manifest, rewrite,
                           check_files, view_at)
from ..models import load_unet
from ..kernels.runnable import require_runnable
from ..pruning import AtedmOptions, set_plan
from ..registry import ENGINE_LIBRARIES, RUNTIME_BACKENDS
from ..userfiles import decoding
from .quiet import quiet_libraries


class RuntimeInputError(AtedmError):
    """Inputs that do not match the build: wrong shape, dtype or device."""


#: Every runtime backend class by each name and alias it is chosen by, filled as the classes are defined.
BACKENDS: dict[str, type[Backend]] = {}


class Backend(abc.ABC):
    """Runs the graphs of one build; ``run(graph, feed)`` returns the ``latent`` output.

    A subclass registers itself in ``BACKENDS`` under its ``names`` (by default its one ``name``) and ``aliases``,
    and declares what callers need to know of it in the class attributes and classmethods below.
    """

    #: What the backend is called in messages and reports.
    name: str = "?"
    #: The names that choose this class: ``registry.RUNTIME_BACKENDS`` are every class's, in the CLI's order.
    names: ClassVar[tuple[str, ...]] = ()
    #: Names that choose this class too, offered nowhere as a choice (``load_backend``, ``StagedUNet.load`` take them).
    aliases: ClassVar[tuple[str, ...]] = ()
    default_device: ClassVar[str] = "cpu"
    #: The forms of a build's graphs this backend opens (``GraphEntry.form_files``' names, and ``engine`` for the
    #: plans); none: it opens no file of the build, and ``check_build_files`` checks none.
    opens: ClassVar[tuple[str, ...]] = ()
    #: The form ``bench`` runs in which this backend's baseline is the stock diffusers UNet, what "vs eager" ratios
    #: compare with; None: its baseline is a graph of the build.
    stock_form: ClassVar[str | None] = None
    #: Whether the engine options (``cuda_graphs``, ``weights``: the CLI's ``--cuda-graphs``, ``--engine-weights``)
    #: are this backend's to take.
    takes_engine_options: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "names" not in cls.__dict__ and "name" in cls.__dict__:
            cls.names = (cls.name,)
        for name in (*cls.names, *cls.aliases):
            if name in BACKENDS:
                raise TypeError(f"runtime backend '{name}' is taken by {BACKENDS[name].__name__}")
            BACKENDS[name] = cls

    def __init__(self, folder: Path, view: ShapeView, device: str | torch.device) -> None:
        self.folder = folder
        self.view = view  # the shape whose graphs this backend runs: inputs checked, outputs allocated
        self.device = torch.device(device)

    @property
    def manifest(self) -> Manifest:
        """The build's record (every shape's graphs)."""
        return self.view.manifest

    def at(self, view: ShapeView) -> Backend:
        """This backend running the graphs of another shape of its build.

        A shallow copy: the loaded state (the UNet, sessions, engines) is shared, so a multi-shape build
        costs one backend, and only the shape-bound reading (inputs checked, output allocated) changes.
        """
        if view.shape == self.view.shape and view.manifest is self.manifest:
            return self
        other = copy.copy(self)
        other.view = view
        return other

    @classmethod
    def check_build(cls, name: str, folder: Path, manifest: Manifest) -> None:
        """Refuse a build this backend cannot run when chosen by ``name``, before any file is read."""

    @classmethod
    def check_build_files(cls, folder: Path, manifest: Manifest) -> None:
        """Check the build files this backend opens (``opens``) against the manifest (size and sha256), and no others.

        A backend that opens graphs is checked for the shared weights and each graph's files (every form the build
        has); a missing or corrupted engine plan is no reason to refuse one that never opens a plan.
        """
        if cls.opens:
            check_files(manifest, folder, engines="engine" in cls.opens)

    @classmethod
    @abc.abstractmethod
    def bench_forms(cls, manifest: Manifest) -> tuple[str, ...]:
        """The forms ``bench`` runs a build's graphs in on this backend (its ``form`` column)."""

    @classmethod
    def form_options(cls, form: str) -> dict[str, object]:
        """The keyword arguments that make this backend run ``form`` (one of ``bench_forms``)."""
        return {}

    @classmethod
    @abc.abstractmethod
    def reference(cls, form: str, ran: Sequence[str]) -> str:
        """What this backend's reference in ``bench`` (its fastest baseline) runs, when that is ``form`` of the forms
        ``ran``."""

    def check(self, feed: dict[str, torch.Tensor]) -> None:
        """Refuse inputs that differ from the build in name, shape, dtype, device or finiteness, naming what was
        expected."""
        missing = [t.name for t in self.view.inputs if t.name not in feed]
        if missing:
            raise RuntimeInputError(
                f"missing input '{missing[0]}'; the build takes: {', '.join(self.view.input_names)}")
        for spec in self.view.inputs:
            tensor = feed[spec.name]
            if list(tensor.shape) != spec.shape:
                raise RuntimeInputError(
                    f"input '{spec.name}' has shape {list(tensor.shape)}; the build expects {spec.shape} "
                    f"(static: {self.view.shape})"
                )
            if tensor.dtype != precision_of(spec.dtype).torch:
                raise RuntimeInputError(f"input '{spec.name}' is {tensor.dtype}; the build expects {spec.dtype}")
            if tensor.device.type != self.device.type:
                raise RuntimeInputError(f"input '{spec.name}' is on {tensor.device}; the {self.name} backend runs on {self.device}")
        self._check_finite(feed)

    def _check_finite(self, feed: dict[str, torch.Tensor]) -> None:
        """Refuse NaN or infinity in a floating-point input, naming the input.

        A graph fed NaN returns NaN without complaint, and a pipeline turns that into a black image with no
        word of why; an earlier step that overflowed (fp16) is the usual source. The check is one pass over
        each input and, on a GPU, one synchronization: small beside a UNet call.
        """
        names = [spec.name for spec in self.view.inputs if feed[spec.name].is_floating_point()]
        if not names:
            return
        finite = torch.stack([torch.isfinite(feed[name]).all() for name in names])
        if bool(finite.all()):
            return
        name = names[int((~finite).nonzero()[0])]
        tensor = feed[name]
        bad = int((~torch.isfinite(tensor)).sum())
        raise RuntimeInputError(f"input '{name}' has {bad} of {tensor.numel()} values NaN or infinite; expected "
                                "finite values (an earlier denoising step may have overflowed)")

    def run(self, graph: str, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check(feed)
        return self._run(self.view.graph(graph), feed)

    @abc.abstractmethod
    def _run(self, entry: GraphEntry, feed: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def new_output(self) -> torch.Tensor:
        """An empty ``latent`` tensor of the build's output shape and dtype, on this backend's device."""
        spec = self.view.outputs[0]
        return torch.empty(spec.shape, dtype=precision_of(spec.dtype).torch, device=self.device)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def release(self) -> None:
        """Drop per-graph state that can be rebuilt (sessions): full-size graphs one at a time in memory."""

    def use_weights(self, folder: Path, manifest: Manifest) -> None:
        """Run the graphs of ``folder`` from now on: another build of the very same graphs with other weights (a refit
        build, ``buildfolder.check_same_graphs``, checked by the caller), at this backend's shape. Subclasses swap what
        they hold of the old weights."""
        self.folder = folder
        self.view = view_at(manifest, self.view.shape)


class EagerBackend(Backend):
    """The reference: the UNet of the manifest with each stage's plan applied in PyTorch."""

    name = "eager"
    opens = ()  # the UNet comes from the spec's model, no file of the build
    stock_form = "sdpa"

    @classmethod
    def bench_forms(cls, manifest: Manifest) -> tuple[str, ...]:
        return ("sdpa",)

    @classmethod
    def reference(cls, form: str, ran: Sequence[str]) -> str:
        return "the stock diffusers UNet, attention on SDPA"

    def __init__(self, folder: Path, view: ShapeView, device: str | torch.device = "cpu") -> None:
        super().__init__(folder, view, device)
        options = view.graph_spec.pruning
        if isinstance(options, AtedmOptions) and options.map_impl == "kernels":  # before the UNet loads
            require_runnable(self.device)
        self._load()

    def _load(self) -> None:
        """The spec's UNet with the build's LoRAs fused (each file checked against its recorded sha256 first)."""
        spec = self.view.graph_spec
        for lora in self.manifest.loras:
            check_lora(lora)
        self.unet = load_unet(spec.model, dtype=spec.dtype, device=str(self.device), seed=spec.seed,
                              loras=self.manifest.loras)
        self.graph = self.view.contract.module(self.unet).eval()
        self._active = {"graph": None}  # the plan on the UNet, shared with this backend's other shapes (``at``)

    def use_weights(self, folder: Path, manifest: Manifest) -> None:
        """The UNet again, with the other build's LoRAs."""
        super().use_weights(folder, manifest)
        self.unet = self.graph = None  # the old weights go before the new ones are made
        self._load()

    def _run(self, entry: GraphEntry, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._active["graph"] != entry.onnx.path:  # one file per (shape, plan)
            set_plan(self.unet, self.view.plan(entry))
            self._active["graph"] = entry.onnx.path
        with torch.no_grad():
            return self.graph(*self.graph.args(feed))


class OnnxRuntimeBackend(Backend):
    """One onnxruntime session per graph; CPU, CUDA or TensorRT execution provider; I/O binding on GPU.

    Each graph runs in its fused form (``ortfuse.py``: attention as onnxruntime's own kernels) where the
    build has one; ``fused=False`` runs the plain graphs, the unfused reference ``bench`` labels as such.
    """

    name = "onnxruntime"
    opens = ("portable", "onnxruntime")  # each graph's plain form, or its fused one (``graph_file``)

    @classmethod
    def bench_forms(cls, manifest: Manifest) -> tuple[str, ...]:
        return ("fused", "unfused") if manifest.shapes[0].baseline.ort_onnx is not None else ("unfused",)

    @classmethod
    def form_options(cls, form: str) -> dict[str, object]:
        return {"fused": form == "fused"}

    @classmethod
    def reference(cls, form: str, ran: Sequence[str]) -> str:
        if form == "fused":
            return "the baseline graph, attention fused by onnxruntime's transformer optimizer"
        return "the plain baseline graph, attention as MatMul-Softmax-MatMul" + (
            " (faster here than its fused form)" if "fused" in ran else "")

    def __init__(self, folder: Path, view: ShapeView, device: str | torch.device = "cpu",
                 providers: list[str] | None = None, fused: bool = True) -> None:
        super().__init__(folder, view, device)
        self.fused = fused
        import onnxruntime as ort

        if providers is None:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.type == "cuda" else ["CPUExecutionProvider"]
        unknown = [p for p in providers if p not in ort.get_available_providers()]
        if unknown:
            raise AtedmError(f"onnxruntime has no {unknown[0]} here; available: {', '.join(ort.get_available_providers())}")
        self.providers = providers
        self._sessions: dict[str, object] = {}

    def release(self) -> None:
        self._sessions.clear()
        _return_freed_memory()

    def use_weights(self, folder: Path, manifest: Manifest) -> None:
        """New sessions, made as each graph is next run, on the other build's graph files (the same graphs pointing
        into other weights): the old sessions and their weights go first."""
        super().use_weights(folder, manifest)
        self.release()

    def graph_file(self, entry: GraphEntry) -> FileEntry:
        """The file this backend runs for ``entry``: its fused form where built and wanted."""
        return entry.ort_onnx if self.fused and entry.ort_onnx is not None else entry.onnx

    def session(self, entry: GraphEntry):  # noqa: ANN201 - onnxruntime.InferenceSession
        import onnxruntime as ort

        key = self.graph_file(entry).path
        if key not in self._sessions:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            if self.device.type != "cuda":
                # The memory pattern plans one block for a whole call at the second call, beside the arena
                # the first call grew: +4.8 GB on SDXL 1024² (main graph, fp32: 15.2 → 20.0 GB peak), and
                # the calls were no slower without it (60.9 and 50.9 s vs 64.2 and 64.7 s).
                options.enable_mem_pattern = False
            if self.device.type != "cuda" and self.view.outputs[0].dtype == "float32":
                # fp32 weights are used where they lie: mapped from the build's page-aligned weights file,
                # shared by every session and process that maps it. Prepacking would copy each MatMul
                # weight into anonymous memory. Measured on SDXL 1024² fp32: peak 13.7 GB of which 4.7 GB
                # anonymous instead of 13.6 GB all anonymous, session in 4.3 s instead of 28.7 s, same
                # call time (88.6 vs 87.4 s). fp16 graphs are cast to fp32 copies on a CPU anyway, where
                # prepacking saves 11% of the call time, so they keep it.
                options.add_session_config_entry("session.disable_prepacking", "1")
            with decoding(self.folder / key, "an ONNX model onnxruntime can load"):
                self._sessions[key] = ort.InferenceSession(str(self.folder / key), options, providers=self.providers)
        return self._sessions[key]

    def _run(self, entry: GraphEntry, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        session = self.session(entry)
        if self.device.type != "cuda":
            arrays = {n: feed[n].detach().contiguous().numpy() for n in self.view.input_names}
            return torch.from_numpy(session.run([self.view.output_name], arrays)[0])
        binding = session.io_binding()
        for name in self.view.input_names:
            tensor = feed[name].contiguous()
            binding.bind_input(name, "cuda", self.device.index or 0, _np_dtype(tensor.dtype), list(tensor.shape), tensor.data_ptr())
        out = self.new_output()
        binding.bind_output(self.view.output_name, "cuda", self.device.index or 0, _np_dtype(out.dtype), list(out.shape), out.data_ptr())
        session.run_with_iobinding(binding)
        return out


def _return_freed_memory() -> None:
    """Collect, then hand freed heap back to the OS before the next full-size session is created.

    glibc keeps freed heap for reuse, and a released session's initializers and activations are many
    small-to-medium blocks; trimming keeps them from sitting beside the next graph's session.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def _np_dtype(dtype: torch.dtype):  # noqa: ANN202
    numpy = precision_of(dtype).numpy
    if numpy is None:
        raise RuntimeInputError(f"onnxruntime binds no {dtype} tensors from torch (NumPy has no such type)")
    return numpy


class TensorRTBackend(Backend):
    """The build's engines on a CUDA GPU (``engines.StageEngines``) with torch tensors bound by name.

    All stage contexts share one activation buffer, so several stage engines cost one set of
    activations (only one stage runs at a time); ``weights="cycled"`` keeps one stage's weights on the
    GPU instead of all (TensorRT-RTX). With ``cuda_graphs`` each stage's launch is captured once and
    replayed; the replay writes into the captured output buffer, so each call returns a copy the caller
    owns: PNDM (SD 1.x's default scheduler) keeps earlier raw model outputs, which a later replay would
    otherwise overwrite (``tests/test_engine_runtime.py``).
    """

    names = ENGINE_LIBRARIES  # an instance's ``name``: the library that built the build's plans
    aliases = ("engine",)  # whichever library that is
    default_device: ClassVar[str] = "cuda"
    opens = ("engine", "portable")  # the plans; weight-stripped ones are refitted from the graphs
    takes_engine_options = True

    @classmethod
    def check_build(cls, name: str, folder: Path, manifest: Manifest) -> None:
        """A build with engines, built by library ``name`` (any, by the alias)."""
        if manifest.engine.skipped:
            raise _no_engines(folder, manifest.engine.skipped)
        if name not in cls.aliases and manifest.engine.library != name:
            raise AtedmError(f"build {folder} has {manifest.engine.library} engines, not {name}")

    @classmethod
    def bench_forms(cls, manifest: Manifest) -> tuple[str, ...]:
        return (f"engine, {manifest.engine.form} form",)  # the graph form its engines were built from

    @classmethod
    def reference(cls, form: str, ran: Sequence[str]) -> str:
        return "the baseline engine (TensorRT fuses the graph's attention)"

    def __init__(self, folder: Path, view: ShapeView, device: str | torch.device = "cuda",
                 cuda_graphs: bool = False, weights: str = "resident") -> None:
        super().__init__(folder, view, device)
        from ..compile import load_library
        from .engines import StageEngines

        manifest = view.manifest
        info = manifest.engine
        if info.library not in ENGINE_LIBRARIES:
            raise _no_engines(folder, info.skipped or f"{info.library} engines")
        self.name = info.library
        library = load_library(info.library)
        if library.version != info.version:
            raise AtedmError(f"engines were built with {info.library} {info.version}; this machine has {library.version}: rebuild them")
        if not torch.cuda.is_available():
            raise AtedmError(f"the {info.library} backend needs a CUDA GPU; this machine has none (use --backend onnxruntime)")
        self._check_target(info.targets)
        self.cuda_graphs = cuda_graphs
        entries = {e.engine.path: e for e in manifest.all_graphs() if e.engine is not None}
        refit = {key: folder / e.onnx.path for key, e in entries.items()} if info.weights_stripped else None
        with torch.cuda.device(self.device):
            self.engines = StageEngines(library.api, folder, {key: Path(key) for key in entries},
                                        [*view.input_names, view.output_name], weights, refit)
            self.activations = torch.empty(max(self.engines.activation_bytes, 1), dtype=torch.uint8, device=self.device)
        self.engines.share_activations(self.activations.data_ptr(), self.activations.numel())
        self.graphs: dict[str, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = {}

    def use_weights(self, folder: Path, manifest: Manifest) -> None:
        """Refit the loaded engines in place from the other build's graphs (its weights), keeping contexts and the
        shared activations; CUDA graphs are captured again (weights may move). Only engines built refittable take
        other weights: a weight-stripped plan built for identical weights would run, wrongly."""
        info = self.manifest.engine
        if not info.refittable:
            raise AtedmError(f"the engines of {self.folder} were built for their own weights only (plans "
                             f"{'stripped for identical weights' if info.weights_stripped else 'not refittable'}); "
                             f"load {folder} instead, or build with refittable engines to switch weights in place")
        by_graph = {(e.shape, e.name): e for e in manifest.all_graphs()}
        graphs = {e.engine.path: folder / by_graph[(e.shape, e.name)].onnx.path
                  for e in self.manifest.all_graphs() if e.engine is not None}
        with torch.cuda.device(self.device):
            self.engines.refit(graphs, self.synchronize)
        self.graphs.clear()
        super().use_weights(folder, _keep_engines(manifest, self.manifest))

    def _check_target(self, targets: list[str]) -> None:
        major, minor = torch.cuda.get_device_capability(self.device)
        local = f"sm{major}{minor}"
        if targets and local not in targets and self.name == "tensorrt-rtx":
            raise AtedmError(f"engines were built for {', '.join(targets)}; this GPU is {local}: rebuild with --target {local}")

    def _run(self, entry: GraphEntry, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        key = entry.engine.path
        if self.engines.make_resident(key, self.synchronize):
            self.graphs.pop(key, None)  # captured with the weights' old addresses
        if self.cuda_graphs:
            return self._run_graph(key, feed)
        out = self.new_output()
        tensors = {name: feed[name].contiguous() for name in self.view.input_names}
        self.engines.bind(key, {**_addresses(tensors), self.view.output_name: out.data_ptr()})
        self.engines.launch(key, torch.cuda.current_stream(self.device).cuda_stream)
        return out

    def _run_graph(self, key: str, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        if key not in self.graphs:
            static = {n: feed[n].clone() for n in self.view.input_names}
            out = self.new_output()
            self.engines.bind(key, {**_addresses(static), self.view.output_name: out.data_ptr()})
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self.engines.launch(key, stream.cuda_stream)  # warm-up outside capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    self.engines.launch(key, stream.cuda_stream)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for name in self.view.input_names:
            static[name].copy_(feed[name])
        graph.replay()
        return out.clone()  # the caller's own tensor: the next replay overwrites ``out``


def _keep_engines(new: Manifest, old: Manifest) -> Manifest:
    """``new``'s graphs with ``old``'s engines: the engines this backend loaded, now holding ``new``'s weights."""
    plans = {(g.shape, g.name): g.engine for g in old.all_graphs()}
    return rewrite(new, lambda entry: {"engine": plans[(entry.shape, entry.name)]}, engine=old.engine)


def _addresses(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    return {name: tensor.data_ptr() for name, tensor in tensors.items()}


def _no_engines(folder: Path, why: str) -> AtedmError:
    return AtedmError(f"build {folder} has no engines ({why}); rebuild with --library tensorrt or tensorrt-rtx")


def _unknown(name: str, expected: str) -> AtedmError:
    return AtedmError(f"unknown backend '{name}'; expected {expected} of: {', '.join(RUNTIME_BACKENDS)}")


#: The names that choose a backend, aliases aside: what ``registry.RUNTIME_BACKENDS`` lists without importing torch.
CHOICES = frozenset(name for cls in BACKENDS.values() for name in cls.names)
assert CHOICES == set(RUNTIME_BACKENDS), f"registry.RUNTIME_BACKENDS {RUNTIME_BACKENDS} vs the classes' {CHOICES}"


def backend_type(name: str) -> type[Backend]:
    """The class a name or alias stands for (``BACKENDS``); an unknown name is refused naming the choices."""
    if name not in BACKENDS:
        raise _unknown(name, "one")
    return BACKENDS[name]


def backend_types(names: Sequence[str]) -> list[type[Backend]]:
    """The classes of a list of choices (``bench --backends``): at least one, each of ``CHOICES`` (no alias); the
    first that is not is refused naming the choices."""
    unknown = [n for n in names if n not in CHOICES]
    if unknown or not names:
        raise _unknown(unknown[0] if unknown else "", "some")
    return [BACKENDS[n] for n in names]


def backend_class(name: str, folder: Path, manifest: Manifest) -> type[Backend]:
    """The backend class a name stands for (``backend_type``), refusing a build it cannot run (``check_build``)."""
    cls = backend_type(name)
    cls.check_build(name, folder, manifest)
    return cls


def load_backend(name: str, folder: str | Path, manifest: Manifest | None = None, device: str | None = None,
                 **options: object) -> Backend:
    """A backend by name for a build folder.

    Without ``manifest``, the manifest is loaded and the files this backend opens are checked, and only those
    (``Backend.check_build_files``); a caller that passes a manifest has checked what it needs. The libraries'
    loading notices stay out of the caller's output (``quiet.py``).
    """
    folder = Path(folder)
    checked = manifest is not None
    manifest = manifest or read_manifest(folder, verify=False)
    cls = backend_class(name, folder, manifest)
    if not checked:
        cls.check_build_files(folder, manifest)
    with quiet_libraries():
        return cls(folder, first_view(manifest), device or cls.default_device, **options)
