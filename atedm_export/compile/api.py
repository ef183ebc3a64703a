"""Every call the package makes into a TensorRT library, and nothing else: the only module naming library attributes.

Two libraries share most of one API: datacenter TensorRT 10 (``tensorrt``) and TensorRT for RTX 1.x
(``tensorrt_rtx_bindings``). ``TensorRTApi`` wraps the first, ``TensorRTRtxApi`` overrides what the second
does differently, so each difference is written once, in the subclass, with the reason beside it. The
builder (``library.py``) and the engine runtime (``runtime/engines.py``) hold library objects only as
opaque handles and pass them back here; they never read an attribute of the module or of its objects.

Its plugin half, ``plugins.py``, registers the map layer's ``atedm`` nodes with the plugin framework this module
hands it (``plugin_framework``), in the types it names (``tensor_types``); it is checked against the framework's
own sources. Because the runtime half needs a GPU, this module is checked without one: ``tests/test_trt_conformance.py``
runs every statement of it against spies built from the real ``tensorrt_rtx_bindings`` and from the TensorRT 10
type stubs (``tensorrt-stubs``), which check each attribute, method-or-property use and argument list.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ..errors import AtedmError

Handle = Any  # a library object (builder, network, engine, context...), opaque outside this module


class EngineUnavailable(AtedmError):
    """The engine library is not installed, or cannot build here (no GPU for datacenter TensorRT)."""


#: The first TensorRT whose plugins embed an ahead-of-time compiled kernel (``tensorrt.plugin.aot_impl``).
AOT_PLUGINS_SINCE = (10, 9)


class TensorRTApi:
    """Datacenter TensorRT 10: builds for the GPU it runs on; timing cache; weight-stripped plans and refit."""

    library = "tensorrt"  # the engine library, as the manifest, the CLI and the registry name it
    module_name = "tensorrt"
    extra = "atedm-export[tensorrt]"
    #: builds ahead of time for named compute capabilities, on any machine (TensorRT-RTX only)
    ahead_of_time = False
    #: reuses kernel timings across builds; TensorRT-RTX compiles its kernels on the GPU at load instead
    has_timing_cache = True
    #: an engine can be deserialized without its weights and given them later (TensorRT-RTX only)
    deferred_weights = False
    #: why this library's engines are built from a graph's portable form even where the build has a plugin form
    #: (None: they carry the plugin form, ``--plugin-form``). TensorRT >= 10.9 embeds ahead-of-time plugins, one
    #: compiled kernel each (``tensorrt.plugin.aot_impl``, ``compile/plugins.py``).
    plugin_refusal: str | None = None

    def __init__(self, trt: ModuleType) -> None:
        self._trt = trt

    @classmethod
    def load(cls) -> TensorRTApi:
        """Import the library; ``EngineUnavailable`` naming the pip extra when it is missing or only stubs."""
        try:
            module = importlib.import_module(cls.module_name)
        except ImportError as exc:
            raise EngineUnavailable(f"{cls.library} is not installed ({exc.msg}); "
                                    f"install it with: pip install '{cls.extra}'") from None
        if not hasattr(module, "Builder"):
            # `tensorrt-stubs` installs a `tensorrt/` folder of .pyi files: an empty namespace package.
            raise EngineUnavailable(f"{cls.library}: '{cls.module_name}' here has no bindings (type stubs only?); "
                                    f"install it with: pip install '{cls.extra}'")
        return cls(module)

    @property
    def version(self) -> str:
        return str(self._trt.__version__)

    @property
    def module(self) -> str:
        return self._trt.__name__

    def targets(self) -> list[str]:
        """Compute capabilities the library builds for ahead of time (none: only the GPU present)."""
        return []

    # -------------------------------------------------------------------------------------- logging

    def logger(self, on_error: Callable[[str], None]) -> Handle:
        """A logger that hands each error message to ``on_error`` (a failed build says why in one line)."""
        trt = self._trt
        threshold = trt.ILogger.Severity.ERROR

        class Logger(trt.ILogger):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                if severity <= threshold:
                    on_error(msg.strip())

        return Logger()

    # ---------------------------------------------------------------------------------------- build

    def plugin_framework(self) -> ModuleType:
        """The library's plugin framework (``tensorrt.plugin``), which takes the ``atedm`` nodes' ahead-of-time plugins
        (``compile/plugins.py``); ``EngineUnavailable`` where the library has none that embeds a kernel."""
        if self.plugin_refusal:
            raise EngineUnavailable(f"{self.library} {self.version}: {self.plugin_refusal}")
        numbers = tuple(int(part) for part in re.findall(r"\d+", self.version)[:2])
        if numbers < AOT_PLUGINS_SINCE:
            raise EngineUnavailable(f"{self.library} {self.version} has no ahead-of-time plugins; the plugin form's "
                                    f"engines need TensorRT >= {'.'.join(map(str, AOT_PLUGINS_SINCE))}")
        try:
            return importlib.import_module(f"{self._trt.__name__}.plugin")
        except ImportError as exc:
            raise EngineUnavailable(f"{self.library} {self.version}: its plugin framework does not import "
                                    f"({exc.msg})") from None

    def tensor_types(self) -> dict[str, Handle]:
        """The library's tensor types by name: what a plugin declares its outputs in."""
        types = self._trt.DataType
        return {"HALF": types.HALF, "BF16": types.BF16, "FLOAT": types.FLOAT, "INT64": types.INT64}

    def builder(self, logger: Handle) -> Handle:
        return self._trt.Builder(logger)

    def network(self, builder: Handle) -> Handle:
        """A strongly typed network: precision was decided at export, in the graph's tensor types."""
        return builder.create_network(1 << int(self._trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))

    def onnx_parser(self, network: Handle, logger: Handle) -> Handle:
        return self._trt.OnnxParser(network, logger)

    def load_model(self, parser: Handle, serialized: bytes, path: str) -> bool:
        """Give the parser the graph without its weights (``path`` locates nothing: weights come next)."""
        return bool(parser.load_model_proto(serialized, path))

    def load_initializer(self, parser: Handle, name: str, address: int, size: int) -> bool:
        """Point the parser at one external weight in place (no copy): ``address`` stays mapped until the build ends."""
        return bool(parser.load_initializer(name, address, size))

    def parse_loaded(self, parser: Handle) -> bool:
        return bool(parser.parse_model_proto())

    def parser_errors(self, parser: Handle) -> list[str]:
        """Each parser error as one line, with the node's name and op where the parser knows them."""
        errors = []
        for index in range(parser.num_errors):
            error = parser.get_error(index)
            where = f"node '{error.node_name()}' ({error.node_operator()})" if error.node() >= 0 else f"in {error.func()}"
            errors.append(f"{where}: {error.desc()}")
        return errors

    def builder_config(self, builder: Handle, optimization_level: int, workspace_bytes: int | None,
                       targets: tuple[str, ...], strip_weights: bool, refittable: bool = False) -> Handle:
        trt = self._trt
        config = builder.create_builder_config()
        config.builder_optimization_level = optimization_level
        if workspace_bytes is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        self._set_targets(config, targets)
        if refittable:
            # Every weight may be replaced by other values (a LoRA's): what refit builds and use_weights need.
            # REFIT_IDENTICAL would let the builder assume the values it saw ("different weights during refits
            # yield unpredictable behavior", both libraries' docs).
            config.set_flag(trt.BuilderFlag.REFIT)
        if strip_weights:
            # The plan leaves out the refittable weights; the runtime refits them from the graph's ONNX.
            config.set_flag(trt.BuilderFlag.STRIP_PLAN)
            if not refittable:
                config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
        return config

    def _set_targets(self, config: Handle, targets: tuple[str, ...]) -> None:
        """TensorRT builds for the GPU present; ``library.py`` has refused other targets before this."""

    def attach_timing_cache(self, config: Handle, serialized: bytes) -> Handle:
        """Attach a timing cache (empty bytes start a new one) so later builds skip the kernels already timed."""
        cache = config.create_timing_cache(serialized)
        config.set_timing_cache(cache, ignore_mismatch=False)
        return cache

    def serialized_timing_cache(self, config: Handle) -> bytes:
        return bytes(memoryview(config.get_timing_cache().serialize()))

    def build_to_stream(self, builder: Handle, network: Handle, config: Handle, write: Callable[[bytes], int]) -> bool:
        """Build, handing each chunk of the plan to ``write`` as the builder produces it (never the whole plan in memory)."""
        trt = self._trt

        class Writer(trt.IStreamWriter):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                trt.IStreamWriter.__init__(self)

            def write(self, data: bytes) -> int:
                return write(data)

        return bool(builder.build_serialized_network_to_stream(network, config, Writer()))

    # -------------------------------------------------------------------------------------- runtime

    def runtime(self, logger: Handle, defer_weights: bool = False) -> Handle:
        """A runtime; with ``defer_weights`` its engines deserialize without their weights on the GPU."""
        if defer_weights and not self.deferred_weights:
            raise EngineUnavailable(f"{self.library} cannot defer loading an engine's weights (TensorRT-RTX can)")
        return self._trt.Runtime(logger)

    def deserialize(self, runtime: Handle, plan: bytes) -> Handle | None:
        """The engine, or None when the library refuses the plan (corrupt, other version or GPU)."""
        return runtime.deserialize_cuda_engine(plan)

    def io_names(self, engine: Handle) -> list[str]:
        """The engine's input and output tensor names, in its order (checked against the manifest at load)."""
        return [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]

    def refit_from_onnx(self, engine: Handle, logger: Handle, onnx_path: str) -> bool:
        """Put weights into an engine, read from a graph (and its external data): a weight-stripped engine's own at
        load, or another build's of the same graph (``StagedUNet.use_weights``) into a refittable one."""
        refitter = self._trt.Refitter(engine, logger)
        parser = self._trt.OnnxParserRefitter(refitter, logger)
        return bool(parser.refit_from_file(onnx_path)) and bool(refitter.refit_cuda_engine())

    def refittable(self, engine: Handle) -> bool:
        """Whether the engine's weights can be replaced at all (built with a refit flag)."""
        return bool(engine.refittable)

    def device_memory_size(self, engine: Handle) -> int:
        """Activation memory one context of ``engine`` needs (``device_memory_size_v2``: a property in both libraries)."""
        return int(engine.device_memory_size_v2)

    def context(self, engine: Handle) -> Handle:
        """An execution context whose activation memory the caller provides (shared by all stage contexts)."""
        return engine.create_execution_context(self._trt.ExecutionContextAllocationStrategy.USER_MANAGED)

    def set_device_memory(self, context: Handle, address: int, size: int) -> None:
        context.set_device_memory(address, size)

    def set_tensor_address(self, context: Handle, name: str, address: int) -> bool:
        return bool(context.set_tensor_address(name, address))

    def execute(self, context: Handle, stream: int) -> bool:
        """Enqueue one run on a CUDA stream (an int handle, e.g. ``torch.cuda.Stream.cuda_stream``)."""
        return bool(context.execute_async_v3(stream))

    # -------------------------------------------------------------------------- deferred weights (RTX)

    def load_weights(self, engine: Handle, plan: bytes) -> bool:
        raise EngineUnavailable(f"{self.library} cannot load an engine's weights after deserializing it")

    def unload_weights(self, engine: Handle) -> bool:
        raise EngineUnavailable(f"{self.library} cannot unload an engine's weights")

    def weights_loaded(self, engine: Handle) -> bool:
        """Whether the engine's weights are on the GPU; always, where weights cannot be deferred."""
        return True


class TensorRTRtxApi(TensorRTApi):
    """TensorRT for RTX 1.x: ahead-of-time builds for named GPUs, kernels compiled at load, deferred weights."""

    library = "tensorrt-rtx"
    module_name = "tensorrt_rtx_bindings"
    extra = "atedm-export[rtx]"
    ahead_of_time = True
    has_timing_cache = False
    deferred_weights = True
    #: Found on this CPU with TensorRT-RTX 1.7.1 (docs/build.md): its network has no plugin layer (no
    #: ``add_plugin_v3``), and its ONNX parser, given an ``atedm`` node with a Python ``IPluginV3`` creator
    #: registered, creates the plugin and then aborts the process (``std::terminate``) adding it to the network.
    plugin_refusal = ("TensorRT-RTX 1.7 has no plugin layer (its parser aborts on a plugin node), so its engines "
                      "carry the map layer as standard ops")

    def targets(self) -> list[str]:
        names = [name for name in dir(self._trt.ComputeCapability) if re.fullmatch(r"SM\d+", name)]
        return sorted((name.lower() for name in names), key=lambda name: int(name[2:]))

    def network(self, builder: Handle) -> Handle:
        """TensorRT-RTX networks are always strongly typed; the flag exists but is the only mode, so none is passed."""
        return builder.create_network(0)

    def _set_targets(self, config: Handle, targets: tuple[str, ...]) -> None:
        """The compute capabilities to build for; none given: the GPU present (``CURRENT``)."""
        capability = self._trt.ComputeCapability
        chosen = [getattr(capability, target.upper()) for target in targets] or [capability.CURRENT]
        config.num_compute_capabilities = len(chosen)  # must come before set_compute_capability
        for index, value in enumerate(chosen):
            if not config.set_compute_capability(value, index):
                raise AtedmError(f"tensorrt-rtx refused compute capability {targets[index] if targets else 'current'}")

    def attach_timing_cache(self, config: Handle, serialized: bytes) -> Handle:
        raise EngineUnavailable("tensorrt-rtx has no timing cache (it compiles kernels on the GPU when an engine loads)")

    def runtime(self, logger: Handle, defer_weights: bool = False) -> Handle:
        runtime = self._trt.Runtime(logger)
        if defer_weights:
            runtime.defer_weights_loading = True  # applies to the next deserialize_cuda_engine calls
        return runtime

    def load_weights(self, engine: Handle, plan: bytes) -> bool:
        """Copy the engine's weights to the GPU from its plan (the bytes it was deserialized from); contexts stay valid."""
        return bool(engine.load_weights(plan))

    def unload_weights(self, engine: Handle) -> bool:
        """Free the engine's GPU weights; its contexts stay valid and come back with the next ``load_weights``."""
        return bool(engine.unload_weights())

    def weights_loaded(self, engine: Handle) -> bool:
        return bool(engine.weights_loaded)


APIS: dict[str, type[TensorRTApi]] = {api.library: api for api in (TensorRTApi, TensorRTRtxApi)}

