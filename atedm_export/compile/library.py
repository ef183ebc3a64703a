"""The seam: pick an engine library by name, build an engine from an ONNX file with it."""

from __future__ import annotations

import importlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from ..errors import AtedmError
from ..isolated import Isolated, run_isolated
from ..registry import ENGINE_LIBRARIES
from ..weights import MappedWeights

#: engine library name (registry.ENGINE_LIBRARIES) → (python module, pip extra that installs it)
BACKENDS: dict[str, tuple[str, str]] = {
    "tensorrt": ("tensorrt", "atedm-export[tensorrt]"),
    "tensorrt-rtx": ("tensorrt_rtx_bindings", "atedm-export[rtx]"),
}
assert tuple(BACKENDS) == ENGINE_LIBRARIES


class EngineUnavailable(AtedmError):
    """The engine library is not installed, or cannot build here (no GPU for datacenter TensorRT)."""


class EngineBuildError(AtedmError):
    """The ONNX parser or the builder refused a graph; the message names the node or the builder's error."""


@dataclass(frozen=True)
class BuildOptions:
    targets: tuple[str, ...] = ()  # compute capabilities, e.g. ("sm89",); empty = the GPU present
    optimization_level: int = 3
    workspace_gib: float | None = None
    timing_cache: Path | None = None  # tensorrt only; TensorRT-RTX has none
    strip_weights: bool = False  # weight-stripped plan, refitted from the graph's weights at load


class _Logger:
    """Collects the builder's errors so a failed build can say why in its one-line message."""

    def __init__(self, trt: ModuleType) -> None:
        outer = self

        class Logger(trt.ILogger):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                if severity <= trt.ILogger.Severity.ERROR and "cudaError 35" not in msg:
                    outer.errors.append(msg.strip())

        self.errors: list[str] = []
        self.logger = Logger()


class EngineLibrary:
    """TensorRT or TensorRT-RTX behind the same four calls: name, version, targets, build."""

    def __init__(self, backend: str, module: ModuleType) -> None:
        self.backend = backend
        self.trt = module

    @property
    def is_rtx(self) -> bool:
        return self.backend == "tensorrt-rtx"

    @property
    def version(self) -> str:
        return str(self.trt.__version__)

    def targets(self) -> list[str]:
        """Compute capabilities this library can build for ahead of time (empty: only the local GPU)."""
        if not self.is_rtx:
            return []
        names = [n for n in dir(self.trt.ComputeCapability) if re.fullmatch(r"SM\d+", n)]
        return sorted((n.lower() for n in names), key=lambda n: int(n[2:]))

    def check_targets(self, targets: tuple[str, ...]) -> None:
        if self.is_rtx:
            if not targets and not _has_cuda_gpu():
                raise EngineUnavailable(
                    f"tensorrt-rtx on a machine without a GPU needs --target; one of: {', '.join(self.targets())}"
                )
            for target in targets:
                if target not in self.targets():
                    raise AtedmError(f"unknown target '{target}' for tensorrt-rtx; expected one of: {', '.join(self.targets())}")
            return
        if not _has_cuda_gpu():
            raise EngineUnavailable("tensorrt builds for the GPU it runs on, and this machine has no CUDA GPU")
        local = _local_target()
        for target in targets:
            if target != local:
                raise AtedmError(f"target '{target}' is not this machine's GPU ({local}); tensorrt builds only for the GPU present")

    def build(self, onnx_path: Path, engine_path: Path, options: BuildOptions) -> float:
        """Parse ``onnx_path``, build a strongly typed engine, stream it to ``engine_path``; returns seconds.

        The weights are never read into memory by us: the parser gets pointers into one read-only
        mapping of the build's weights file (``load_model_proto`` + ``load_initializer``), and the plan
        goes to disk as the builder produces it (``build_serialized_network_to_stream``), so the full
        SDXL costs the builder's own copy of the weights and the mapped pages, not three copies.
        """
        trt = self.trt
        start = time.perf_counter()
        log = _Logger(trt)
        builder = trt.Builder(log.logger)
        flags = 0 if self.is_rtx else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, log.logger)
        weights = self._parse(parser, onnx_path)
        try:
            config = self._config(builder, options)
            cache = self._load_timing_cache(config, options.timing_cache)
            with _PlanWriter(trt, engine_path) as writer:
                built = builder.build_serialized_network_to_stream(network, config, writer.stream)
            if not built:
                engine_path.unlink(missing_ok=True)
                reason = log.errors[-1] if log.errors else "no reason given"
                raise EngineBuildError(f"{onnx_path.name}: engine build failed: {reason}")
        finally:
            del parser, network
            weights.close()
        if cache is not None and options.timing_cache is not None:
            options.timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
        return time.perf_counter() - start

    def _parse(self, parser: Any, onnx_path: Path) -> MappedWeights:
        """Load the graph (kilobytes to a few MB) and point the parser at its mapped external weights."""
        serialized = onnx_path.read_bytes()
        try:
            model = onnx.load_model_from_string(serialized)
        except DecodeError:
            raise EngineBuildError(f"{onnx_path.name}: not an ONNX model (the file does not parse)") from None
        try:
            weights = MappedWeights(onnx_path, model)
        except OSError as exc:
            raise EngineBuildError(f"{onnx_path.name}: cannot map its weights: {exc.strerror or exc} "
                                   f"({exc.filename or onnx_path.parent})") from None
        try:
            if not parser.load_model_proto(serialized, str(onnx_path)):
                raise EngineBuildError(f"{onnx_path.name}: ONNX parser: {_parser_error(parser)}")
            for name, address, size in weights.pointers():
                if not parser.load_initializer(name, address, size):
                    raise EngineBuildError(f"{onnx_path.name}: ONNX parser refused initializer '{name}' "
                                           f"({size} bytes): {_parser_error(parser)}")
            if not parser.parse_model_proto():
                raise EngineBuildError(f"{onnx_path.name}: ONNX parser: {_parser_error(parser)}")
        except BaseException:
            weights.close()
            raise
        return weights

    def _config(self, builder: Any, options: BuildOptions) -> Any:
        trt = self.trt
        config = builder.create_builder_config()
        config.builder_optimization_level = options.optimization_level
        if options.workspace_gib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
        if self.is_rtx:
            self._set_targets(config, options.targets)
        if options.strip_weights:
            # The plan leaves out weights identical to the ONNX file's; the runtime refits them from it.
            # Saves the plan's copy of the weights on disk and in the builder (5 GB for SDXL in fp16).
            config.set_flag(trt.BuilderFlag.STRIP_PLAN)
            config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
        return config

    def _set_targets(self, config: Any, targets: tuple[str, ...]) -> None:
        trt = self.trt
        chosen = [getattr(trt.ComputeCapability, t.upper()) for t in targets] or [trt.ComputeCapability.CURRENT]
        config.num_compute_capabilities = len(chosen)  # must come before set_compute_capability
        for index, capability in enumerate(chosen):
            if not config.set_compute_capability(capability, index):
                raise EngineBuildError(f"tensorrt-rtx refused compute capability {capability}")

    def _load_timing_cache(self, config: Any, path: Path | None) -> Any:
        """TensorRT reuses kernel timings across builds; TensorRT-RTX compiles kernels on the GPU instead."""
        if self.is_rtx or path is None:
            return None
        cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        return cache


class _PlanWriter:
    """The builder's ``IStreamWriter``: each chunk of the serialized plan goes straight to the file."""

    def __init__(self, trt: ModuleType, path: Path) -> None:
        handle = path.open("wb")
        self.handle = handle

        class Writer(trt.IStreamWriter):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                trt.IStreamWriter.__init__(self)

            def write(self, data: bytes) -> int:
                return handle.write(data)

        self.stream = Writer()

    def __enter__(self) -> _PlanWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


def _parser_error(parser: Any) -> str:
    """The first parser error, with node name and op where the parser knows them."""
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = f"node '{err.node_name()}' ({err.node_operator()})" if err.node() >= 0 else f"in {err.func()}"
        errors.append(f"{where}: {err.desc()}")
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return (errors[0] if errors else "unknown error") + more


def _has_cuda_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _local_target() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


def build_engine_file(backend: str, onnx_path: Path, engine_path: Path, options: BuildOptions) -> float:
    """Load the library by name and build one engine: what an isolated engine build runs."""
    return load_library(backend).build(onnx_path, engine_path, options)


def build_isolated(library: EngineLibrary, onnx_path: Path, engine_path: Path, options: BuildOptions) -> Isolated:
    """``library.build`` in a fresh process (``isolated.py``): the builder's memory is its own and goes with it.

    Measured on SDXL fp16 with TensorRT-RTX 1.7: the builder holds two copies of the weights (10.5 GB
    anonymous) beside the 5.3 GB mapped weights file, 15.9 GB in all; inside the exporting process it
    peaked at 23.6 GB.
    """
    try:
        return run_isolated(build_engine_file, library.backend, onnx_path, engine_path, options,
                            error=EngineBuildError, what="engine builder")
    except EngineBuildError:
        engine_path.unlink(missing_ok=True)
        raise


def available_backends() -> list[str]:
    """Engine backends whose library imports here."""
    found = []
    for backend, (module, _) in BACKENDS.items():
        try:
            importlib.import_module(module)
            found.append(backend)
        except ImportError:
            continue
    return found


def load_library(backend: str) -> EngineLibrary:
    """The engine library for ``tensorrt`` or ``tensorrt-rtx``; a clear error when it is not installed."""
    if backend not in BACKENDS:
        raise AtedmError(f"unknown engine backend '{backend}'; expected one of: {', '.join(BACKENDS)}")
    module, extra = BACKENDS[backend]
    try:
        return EngineLibrary(backend, importlib.import_module(module))
    except ImportError as exc:
        raise EngineUnavailable(f"{backend} is not installed ({exc.msg}); install it with: pip install '{extra}'") from None
