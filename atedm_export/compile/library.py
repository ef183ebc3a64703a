"""The seam: pick an engine library by name, build an engine from an ONNX file with it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from ..errors import AtedmError
from ..isolated import Isolated, run_isolated
from ..registry import ENGINE_LIBRARIES
from ..weights import MappedWeights
from .api import APIS, EngineUnavailable, Handle, TensorRTApi

assert tuple(APIS) == ENGINE_LIBRARIES


class EngineBuildError(AtedmError):
    """The ONNX parser or the builder refused a graph; the message names the node or the builder's error."""


@dataclass(frozen=True)
class BuildOptions:
    targets: tuple[str, ...] = ()  # compute capabilities, e.g. ("sm89",); empty = the GPU present
    optimization_level: int = 3
    workspace_gib: float | None = None
    timing_cache: Path | None = None  # tensorrt only; TensorRT-RTX has none
    strip_weights: bool = False  # weight-stripped plan, refitted from the graph's weights at load
    refittable: bool = False  # the plan takes other weights than its graph's (a refit build's): BuilderFlag.REFIT
    plugins: bool = False  # the graph is a plugin form: the atedm nodes' plugins are registered before it is parsed


class EngineLibrary:
    """TensorRT or TensorRT-RTX behind the same calls: name, version, targets, build (through ``api``)."""

    def __init__(self, api: TensorRTApi) -> None:
        self.api = api
        self.name = api.library

    @property
    def version(self) -> str:
        return self.api.version

    def targets(self) -> list[str]:
        """Compute capabilities this library can build for ahead of time (empty: only the local GPU)."""
        return self.api.targets()

    def check_targets(self, targets: tuple[str, ...]) -> None:
        if self.api.ahead_of_time:
            if not targets and not _has_cuda_gpu():
                raise EngineUnavailable(
                    f"{self.name} on a machine without a GPU needs --target; one of: {', '.join(self.targets())}"
                )
            for target in targets:
                if target not in self.targets():
                    raise AtedmError(f"unknown target '{target}' for {self.name}; expected one of: {', '.join(self.targets())}")
            return
        if not _has_cuda_gpu():
            raise EngineUnavailable(f"{self.name} builds for the GPU it runs on, and this machine has no CUDA GPU")
        local = _local_target()
        for target in targets:
            if target != local:
                raise AtedmError(f"target '{target}' is not this machine's GPU ({local}); {self.name} builds only for the GPU present")

    def build(self, onnx_path: Path, engine_path: Path, options: BuildOptions) -> float:
        """Parse ``onnx_path``, build a strongly typed engine, stream it to ``engine_path``; returns seconds.

        The weights are never read into memory by us: the parser gets pointers into one read-only
        mapping of the build's weights file (``load_model`` + ``load_initializer``), and the plan goes
        to disk as the builder produces it (``build_to_stream``), so the full SDXL costs the builder's
        own copy of the weights and the mapped pages, not three copies.
        """
        api = self.api
        start = time.perf_counter()
        errors: list[str] = []
        # "cudaError 35" (no driver) is what a CPU-only machine says on every build; it is not the failure.
        logger = api.logger(lambda msg: errors.append(msg) if "cudaError 35" not in msg else None)
        if options.plugins:  # the parser looks each atedm node's plugin up as it reads the graph
            from .plugins import register_plugins

            register_plugins(api.plugin_framework(), api.tensor_types(),
                             options.targets[0] if options.targets else _local_target())
        builder = api.builder(logger)
        network = api.network(builder)
        parser = api.onnx_parser(network, logger)
        weights = self._parse(parser, onnx_path)
        try:
            workspace = int(options.workspace_gib * (1 << 30)) if options.workspace_gib is not None else None
            try:
                config = api.builder_config(builder, options.optimization_level, workspace, options.targets,
                                            options.strip_weights, options.refittable)
            except AtedmError as exc:
                raise EngineBuildError(str(exc)) from None
            use_cache = api.has_timing_cache and options.timing_cache is not None
            if use_cache:
                cache_file = options.timing_cache
                api.attach_timing_cache(config, cache_file.read_bytes() if cache_file.is_file() else b"")
            with engine_path.open("wb") as plan:
                built = api.build_to_stream(builder, network, config, plan.write)
            if not built:
                engine_path.unlink(missing_ok=True)
                raise EngineBuildError(f"{onnx_path.name}: engine build failed: {errors[-1] if errors else 'no reason given'}")
        finally:
            del parser, network
            weights.close()
        if use_cache:
            options.timing_cache.write_bytes(api.serialized_timing_cache(config))
        return time.perf_counter() - start

    def _parse(self, parser: Handle, onnx_path: Path) -> MappedWeights:
        """Load the graph (kilobytes to a few MB) and point the parser at its mapped external weights."""
        api = self.api
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
            if not api.load_model(parser, serialized, str(onnx_path)):
                raise EngineBuildError(f"{onnx_path.name}: ONNX parser: {_first_error(api.parser_errors(parser))}")
            for name, address, size in weights.pointers():
                if not api.load_initializer(parser, name, address, size):
                    raise EngineBuildError(f"{onnx_path.name}: ONNX parser refused initializer '{name}' "
                                           f"({size} bytes): {_first_error(api.parser_errors(parser))}")
            if not api.parse_loaded(parser):
                raise EngineBuildError(f"{onnx_path.name}: ONNX parser: {_first_error(api.parser_errors(parser))}")
        except BaseException:
            weights.close()
            raise
        return weights


def _first_error(errors: list[str]) -> str:
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return (errors[0] if errors else "unknown error") + more


def _has_cuda_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _local_target() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


def build_engine_file(library: str, onnx_path: Path, engine_path: Path, options: BuildOptions) -> float:
    """Load the library by name and build one engine: what an isolated engine build runs."""
    return load_library(library).build(onnx_path, engine_path, options)


def build_isolated(library: EngineLibrary, onnx_path: Path, engine_path: Path, options: BuildOptions) -> Isolated:
    """``library.build`` in a fresh process (``isolated.py``): the builder's memory is its own and goes with it.

    Measured on SDXL fp16 with TensorRT-RTX 1.7: the builder holds two copies of the weights (10.5 GB
    anonymous) beside the 5.3 GB mapped weights file, 15.9 GB in all; inside the exporting process it
    peaked at 23.6 GB.
    """
    try:
        return run_isolated(build_engine_file, library.name, onnx_path, engine_path, options,
                            error=EngineBuildError, what="engine builder")
    except EngineBuildError:
        engine_path.unlink(missing_ok=True)
        raise


def available_libraries() -> list[str]:
    """Engine libraries that import here (with its bindings, not only type stubs)."""
    found = []
    for name, api in APIS.items():
        try:
            api.load()
            found.append(name)
        except EngineUnavailable:
            continue
    return found


def load_library(name: str) -> EngineLibrary:
    """The engine library for ``tensorrt`` or ``tensorrt-rtx``; a clear error when it is not installed."""
    if name not in APIS:
        raise AtedmError(f"unknown engine library '{name}'; expected one of: {', '.join(APIS)}")
    return EngineLibrary(APIS[name].load())
