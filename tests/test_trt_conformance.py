"""Every TensorRT call the package makes, checked against the real TensorRT-RTX bindings and the TensorRT 10 stubs.

``compile/api.py`` is the only module that names library attributes (checked below); the engine builder
and ``runtime/engines.py`` reach the library only through it. Here both run against spies
(``trt_surface.py``) of each library: every attribute must exist and be a method or a property as used,
every call must match an overload, every assignment must go to a writable attribute. Every statement
of ``compile/api.py`` must run under the spies, so no call escapes the check.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
import types
from collections.abc import Callable
from itertools import count
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from atedm_export.compile import api as api_module
from atedm_export.compile.api import EngineUnavailable, TensorRTApi, TensorRTRtxApi
from atedm_export.compile.library import BuildOptions, EngineBuildError, EngineLibrary
from atedm_export.runtime.engines import EngineRuntimeError, StageEngines
from tests.conftest import HAS_RTX
from tests.trt_surface import ConformanceError, Spy, Surface, from_module, from_stubs

ROOT = Path(__file__).resolve().parents[1]
STUBS = Path(os.environ.get("ATEDM_TRT_STUBS", ROOT / ".venv" / "trt-stubs"))
IO_NAMES = ["sample", "timestep", "latent"]


@pytest.fixture(scope="session")
def surfaces() -> dict[str, Surface]:
    """TensorRT 10 from its published stubs (required: tools/setup.sh installs them); TensorRT-RTX from its bindings."""
    if not (STUBS / "tensorrt_bindings" / "tensorrt.pyi").is_file():
        pytest.fail(f"TensorRT stubs not found in {STUBS}: run tools/setup.sh (or set ATEDM_TRT_STUBS)")
    found = {"tensorrt": from_stubs(STUBS)}
    if HAS_RTX:
        import tensorrt_rtx_bindings

        found["tensorrt-rtx"] = from_module(tensorrt_rtx_bindings)
    return found


LIBRARIES = [
    pytest.param("tensorrt", TensorRTApi, id="tensorrt-10-stubs"),
    pytest.param("tensorrt-rtx", TensorRTRtxApi, id="tensorrt-rtx-bindings",
                 marks=pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX bindings not installed")),
]


def spied(surfaces: dict[str, Surface], backend: str, api_class: type[TensorRTApi]) -> tuple[Spy, TensorRTApi]:
    spy = Spy(surfaces[backend], version="1.0")
    return spy, api_class(spy)  # type: ignore[arg-type]


def tiny_onnx(folder: Path) -> Path:
    """A MatMul whose 4 KiB weight lives in an external-data file, as a build's graphs keep theirs."""
    weight = numpy_helper.from_array(np.arange(1024, dtype=np.float32).reshape(4, 256), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["sample", "w"], ["latent"], name="mm")], "g",
                              [helper.make_tensor_value_info("sample", onnx.TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("latent", onnx.TensorProto.FLOAT, [1, 256])], [weight])
    path = folder / "graph.onnx"
    onnx.save(helper.make_model(graph), path, save_as_external_data=True, location="weights.data", size_threshold=0)
    return path


def logger_of(spy: Spy) -> object:
    """The logger our code handed the builder (the library would call its ``log``)."""
    return next(c.args[0] for c in spy.calls if c.target == "Builder.__init__")


# ------------------------------------------------------------------------------------------ scenarios


def build_succeeds(spy: Spy, api: TensorRTApi, tmp: Path) -> None:
    def builder_writes(network: object, config: object, writer: object) -> bool:
        return writer.write(b"plan bytes") == 10  # type: ignore[attr-defined]

    spy.returns["Builder.build_serialized_network_to_stream"] = builder_writes
    spy.returns["ITimingCache.serialize"] = b"cache"
    onnx_path = tiny_onnx(tmp)
    cache = tmp / "timing.cache"
    options = BuildOptions(targets=("sm89",) if api.ahead_of_time else (), optimization_level=2, workspace_gib=0.5,
                           timing_cache=cache, strip_weights=True)
    EngineLibrary(api).build(onnx_path, tmp / "graph.plan", options)
    assert (tmp / "graph.plan").read_bytes() == b"plan bytes"
    assert cache.exists() == api.has_timing_cache
    targets = [c.args for c in spy.calls if c.target == "IBuilderConfig.set_compute_capability"]
    assert len(targets) == (1 if api.ahead_of_time else 0)
    initializers = [c.args for c in spy.calls if c.target == "OnnxParser.load_initializer"]
    assert [(name, size) for name, _, size in initializers] == [("w", 4096)]
    flags = [c.args[0] for c in spy.calls if c.target == "IBuilderConfig.set_flag"]
    assert flags == [spy.BuilderFlag.STRIP_PLAN, spy.BuilderFlag.REFIT_IDENTICAL]  # stripped for identical weights
    # refittable plans (what refit builds link and StagedUNet.use_weights refits): REFIT, never REFIT_IDENTICAL
    before = len(spy.calls)
    EngineLibrary(api).build(onnx_path, tmp / "refittable.plan",
                             BuildOptions(targets=options.targets, strip_weights=True, refittable=True))
    flags = [c.args[0] for c in spy.calls[before:] if c.target == "IBuilderConfig.set_flag"]
    assert flags == [spy.BuilderFlag.REFIT, spy.BuilderFlag.STRIP_PLAN]


def build_fails(spy: Spy, api: TensorRTApi, tmp: Path) -> None:
    onnx_path = tiny_onnx(tmp)

    def builder_logs_and_fails(network: object, config: object, writer: object) -> bool:
        severity = spy.ILogger.Severity
        logger_of(spy).log(severity.ERROR, "cudaError 35: no driver ")  # type: ignore[attr-defined]
        logger_of(spy).log(severity.ERROR, "out of device memory ")  # type: ignore[attr-defined]
        logger_of(spy).log(severity.INFO, "not an error")  # type: ignore[attr-defined]
        return False

    spy.returns["Builder.build_serialized_network_to_stream"] = builder_logs_and_fails
    with pytest.raises(EngineBuildError, match="engine build failed: out of device memory$"):
        EngineLibrary(api).build(onnx_path, tmp / "graph.plan", BuildOptions(("sm89",) if api.ahead_of_time else ()))
    assert not (tmp / "graph.plan").exists()
    if api.ahead_of_time:
        spy.returns["IBuilderConfig.set_compute_capability"] = False
        with pytest.raises(EngineBuildError, match="^tensorrt-rtx refused compute capability sm89$"):
            EngineLibrary(api).build(onnx_path, tmp / "graph.plan", BuildOptions(("sm89",)))

    nodes = iter([3, -1])
    # the stubs do not say what OnnxParser.get_error returns (``...``); the bindings say IParserError: ParserError
    spy.returns["OnnxParser.get_error"] = lambda index: spy.spy_class("ParserError")._spy_make()
    spy.returns.update({"OnnxParser.parse_model_proto": False, "OnnxParser.num_errors": 2,
                        "ParserError.node": lambda: next(nodes), "ParserError.node_name": "mm",
                        "ParserError.node_operator": "MatMul", "ParserError.desc": "bad", "ParserError.func": "parse"})
    with pytest.raises(EngineBuildError, match=r"ONNX parser: node 'mm' \(MatMul\): bad \(\+1 more\)"):
        EngineLibrary(api).build(onnx_path, tmp / "graph.plan", BuildOptions(("sm89",) if api.ahead_of_time else ()))
    spy.returns.update({"OnnxParser.load_initializer": False, "OnnxParser.num_errors": 0})
    with pytest.raises(EngineBuildError, match="refused initializer 'w' \\(4096 bytes\\): unknown error"):
        EngineLibrary(api).build(onnx_path, tmp / "graph.plan", BuildOptions())
    spy.returns["OnnxParser.load_model_proto"] = False
    with pytest.raises(EngineBuildError, match="graph.onnx: ONNX parser: unknown error"):
        EngineLibrary(api).build(onnx_path, tmp / "graph.plan", BuildOptions())


def plans(tmp: Path, names: list[str]) -> dict[str, Path]:
    (tmp / "engines").mkdir(exist_ok=True)
    for name in names:
        (tmp / "engines" / f"{name}.plan").write_bytes(f"plan of {name}".encode())
    return {f"engines/{name}.plan": Path("engines") / f"{name}.plan" for name in names}


def engine_spy(spy: Spy, sizes: list[int]) -> None:
    """Engines whose tensors are the build's and whose activation needs are ``sizes`` in load order."""
    needs = iter(sizes)
    spy.returns.update({"ICudaEngine.num_io_tensors": len(IO_NAMES),
                        "ICudaEngine.get_tensor_name": lambda index: IO_NAMES[index],
                        "ICudaEngine.device_memory_size_v2": lambda: next(needs)})


def runtime_resident(spy: Spy, api: TensorRTApi, tmp: Path, refit: bool = True) -> None:
    files = plans(tmp, ["baseline", "stage0", "stage1"])
    engine_spy(spy, [300, 700, 500])
    stripped = {key: tmp / "graph.onnx" for key in files} if refit else None
    engines = StageEngines(api, tmp, files, IO_NAMES, "resident", stripped)
    assert engines.activation_bytes == 700
    with pytest.raises(EngineRuntimeError, match="activation buffer of 500 bytes; the engines need 700"):
        engines.share_activations(0x7000, 500)
    engines.share_activations(0x7000, 1024)
    shared = [c.args for c in spy.calls if c.target == "IExecutionContext.set_device_memory"]
    assert shared == [(0x7000, 1024)] * 3  # one buffer for every stage context
    stream = 0xABC
    for key in ["engines/stage0.plan", "engines/stage1.plan", "engines/stage1.plan", "engines/baseline.plan"]:
        assert not engines.make_resident(key, synchronize=lambda: None)
        engines.bind(key, {name: 0x100 + i for i, name in enumerate(IO_NAMES)})
        engines.launch(key, stream)
    assert [c.args for c in spy.calls if c.target == "IExecutionContext.execute_async_v3"] == [(stream,)] * 4
    spy.returns["ICudaEngine.weights_loaded"] = True  # (TensorRT-RTX reads it; TensorRT's are always loaded)
    assert engines.loaded() == list(files)
    assert len([c for c in spy.calls if c.target == "OnnxParserRefitter.refit_from_file"]) == (3 if refit else 0)
    engines.close()


def runtime_failures(spy: Spy, api: TensorRTApi, tmp: Path) -> None:
    files = plans(tmp, ["baseline"])
    engine_spy(spy, [64] * 8)
    engines = StageEngines(api, tmp, files, IO_NAMES)
    spy.returns["IExecutionContext.set_tensor_address"] = False
    with pytest.raises(EngineRuntimeError, match="refused the address of 'sample'"):
        engines.bind("engines/baseline.plan", dict.fromkeys(IO_NAMES, 1))
    spy.returns["IExecutionContext.execute_async_v3"] = False
    with pytest.raises(EngineRuntimeError, match="engine execution failed"):
        engines.launch("engines/baseline.plan", 1)
    spy.returns["ICudaEngine.get_tensor_name"] = lambda index: ["x", "t", "y"][index]
    with pytest.raises(EngineRuntimeError, match="engine tensors x, t, y differ from the build's sample, timestep, latent"):
        StageEngines(api, tmp, files, IO_NAMES)
    spy.returns["ICudaEngine.get_tensor_name"] = lambda index: IO_NAMES[index]
    spy.returns["Refitter.refit_cuda_engine"] = False
    with pytest.raises(EngineRuntimeError, match="refitting the weight-stripped engine failed"):
        StageEngines(api, tmp, files, IO_NAMES, refit_from={key: tmp / "graph.onnx" for key in files})
    spy.returns["Runtime.deserialize_cuda_engine"] = None
    with pytest.raises(EngineRuntimeError, match="does not load on this GPU"):
        StageEngines(api, tmp, files, IO_NAMES)


def runtime_refit(spy: Spy, api: TensorRTApi, tmp: Path) -> None:
    """``StagedUNet.use_weights`` on engines: each loaded engine refitted in place from another build's graph."""
    files = plans(tmp, ["baseline", "stage0"])
    engine_spy(spy, [300, 700])
    engines = StageEngines(api, tmp, files, IO_NAMES, "resident")
    engines.share_activations(0x7000, 1024)
    other = {key: tmp / f"other-{Path(key).stem}.onnx" for key in files}
    synced = count()
    spy.returns["ICudaEngine.refittable"] = True
    engines.refit(other, synchronize=lambda: next(synced))
    refits = [c.args for c in spy.calls if c.target == "OnnxParserRefitter.refit_from_file"]
    assert refits == [(str(other[key]),) for key in files] and next(synced) == 1
    assert len([c for c in spy.calls if c.target == "Refitter.refit_cuda_engine"]) == 2
    assert [c.args for c in spy.calls if c.target == "IExecutionContext.set_device_memory"] == [(0x7000, 1024)] * 2
    with pytest.raises(EngineRuntimeError, match="engines/stage0.plan: no graph to refit its engine from"):
        engines.refit({"engines/baseline.plan": other["engines/baseline.plan"]}, synchronize=lambda: None)
    spy.returns["Refitter.refit_cuda_engine"] = False
    with pytest.raises(EngineRuntimeError, match="other-baseline.onnx: refitting engines/baseline.plan failed"):
        engines.refit(other, synchronize=lambda: None)
    spy.returns["ICudaEngine.refittable"] = False
    with pytest.raises(EngineRuntimeError, match="built without refit support"):
        engines.refit(other, synchronize=lambda: None)
    engines.close()


def runtime_cycled(spy: Spy, api: TensorRTApi, tmp: Path) -> None:
    """TensorRT-RTX: one stage's weights on the GPU at a time, swapped before a stage runs."""
    files = plans(tmp, ["baseline", "stage0", "stage1"])
    engine_spy(spy, [300, 700, 500])
    loaded: set[int] = set()
    spy.returns.update({"ICudaEngine.load_weights": lambda plan: True, "ICudaEngine.unload_weights": lambda: True})
    engines = StageEngines(api, tmp, files, IO_NAMES, "cycled")
    assert [c.args for c in spy.calls if c.target == "Runtime.defer_weights_loading="] == [(True,)]
    synced = count()
    order = ["engines/stage0.plan", "engines/stage0.plan", "engines/stage1.plan", "engines/baseline.plan"]
    moved = []
    for key in order:
        before = len(spy.calls)
        moved.append(engines.make_resident(key, synchronize=lambda: next(synced)))
        for call in spy.calls[before:]:
            if call.target == "ICudaEngine.load_weights":
                assert not loaded, "a stage's weights were loaded beside another's"
                assert bytes(call.args[0]) == f"plan of {Path(key).stem}".encode()
                loaded.add(id(call.instance))
            elif call.target == "ICudaEngine.unload_weights":
                loaded.discard(id(call.instance))
        engines.bind(key, dict.fromkeys(IO_NAMES, 1))
        engines.launch(key, 1)
    assert moved == [True, False, True, True] and next(synced) == 3
    spy.returns["ICudaEngine.weights_loaded"] = lambda: True
    assert engines.loaded() == list(files)  # read through the library: the spy says every engine is loaded
    with pytest.raises(EngineRuntimeError, match="its weights are not on the GPU"):
        engines.launch("engines/stage0.plan", 1)
    spy.returns["ICudaEngine.unload_weights"] = False
    with pytest.raises(EngineRuntimeError, match="baseline.plan: unloading its weights failed"):
        engines.make_resident("engines/stage0.plan", synchronize=lambda: None)
    with pytest.raises(EngineRuntimeError, match="weight-stripped"):
        StageEngines(api, tmp, files, IO_NAMES, "cycled", refit_from={key: tmp / "graph.onnx" for key in files})
    with pytest.raises(EngineRuntimeError, match="weights 'cycled' reload each stage's weights from its plan"):
        engines.refit({key: tmp / "graph.onnx" for key in files}, synchronize=lambda: None)
    spy.returns["ICudaEngine.load_weights"] = False
    engine_spy(spy, [100])
    fresh = StageEngines(api, tmp, plans(tmp, ["solo"]), IO_NAMES, "cycled")
    with pytest.raises(EngineRuntimeError, match="solo.plan: loading its weights failed"):
        fresh.make_resident("engines/solo.plan", synchronize=lambda: None)


def library_specifics(spy: Spy, api: TensorRTApi, tmp: Path) -> None:
    """The calls one library has and the other refuses, each from the adapter that declares it."""
    assert api.version == "1.0"
    assert api.module == spy.__name__
    if api.ahead_of_time:
        assert api.targets() == ["sm75", "sm80", "sm86", "sm89", "sm120", "sm121"]
        with pytest.raises(EngineUnavailable, match="no timing cache"):
            api.attach_timing_cache(None, b"")
        engine = _engine(spy, api, tmp)
        for loaded in (False, True):  # read from the engine each time, never assumed
            spy.returns["ICudaEngine.weights_loaded"] = loaded
            assert api.weights_loaded(engine) is loaded
        return
    assert api.targets() == []
    assert api.weights_loaded(_engine(spy, api, tmp)) is True  # weights cannot be deferred: always on the GPU
    for call in (lambda: api.load_weights(None, b""), lambda: api.unload_weights(None),
                 lambda: api.runtime(None, defer_weights=True)):
        with pytest.raises(EngineUnavailable, match="tensorrt cannot"):
            call()
    with pytest.raises(EngineRuntimeError, match="needs deferred weight loading, which tensorrt lacks"):
        StageEngines(api, tmp, {"e": Path("e")}, IO_NAMES, "cycled")
    with pytest.raises(EngineRuntimeError, match="unknown weights mode 'shared'"):
        StageEngines(api, tmp, {"e": Path("e")}, IO_NAMES, "shared")


def plugin_framework(spy: Spy, api: TensorRTApi, tmp: Path) -> None:
    """The plugin framework the plugin form's engines need: refused by TensorRT-RTX and before TensorRT 10.9, imported
    from the library's own package after, and the tensor types plugins declare their outputs in."""
    assert set(api.tensor_types()) == {"HALF", "BF16", "FLOAT", "INT64"}
    if api.plugin_refusal:
        with pytest.raises(EngineUnavailable, match="no plugin layer"):
            api.plugin_framework()
        return
    with pytest.raises(EngineUnavailable, match="no ahead-of-time plugins; .* TensorRT >= 10.9"):
        api.plugin_framework()  # the spy says 1.0
    spy.version = "10.13.0"
    with pytest.raises(EngineUnavailable, match="its plugin framework does not import"):
        api.plugin_framework()
    framework = types.ModuleType(f"{spy.__name__}.plugin")
    sys.modules[framework.__name__] = framework
    try:
        assert api.plugin_framework() is framework
    finally:
        del sys.modules[framework.__name__]


def _engine(spy: Spy, api: TensorRTApi, tmp: Path) -> object:
    engine_spy(spy, [1])
    return api.deserialize(api.runtime(api.logger(print)), b"plan")


SCENARIOS: list[Callable[[Spy, TensorRTApi, Path], None]] = [
    build_succeeds, build_fails, runtime_resident, runtime_failures, runtime_refit, library_specifics, plugin_framework]


@pytest.mark.parametrize("backend, api_class", LIBRARIES)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_calls_conform(surfaces, backend, api_class, scenario, tmp_path) -> None:
    spy, api = spied(surfaces, backend, api_class)
    scenario(spy, api, tmp_path)


@pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX bindings not installed")
def test_cycled_weights_conform(surfaces, tmp_path) -> None:
    spy, api = spied(surfaces, "tensorrt-rtx", TensorRTRtxApi)
    runtime_cycled(spy, api, tmp_path)


@pytest.mark.skipif(not HAS_RTX, reason="every branch of the adapter needs both libraries' spies")
def test_every_statement_of_the_adapter_runs_under_a_spy(surfaces, tmp_path) -> None:
    """No call into a library goes unchecked: each statement of compile/api.py runs against a spy."""
    executed: set[int] = set()
    source = Path(api_module.__file__)

    def trace(frame, event, arg):  # noqa: ANN001, ANN202
        if frame.f_code.co_filename != str(source):
            return None

        def lines(frame, event, arg):  # noqa: ANN001, ANN202
            if event == "line":
                executed.add(frame.f_lineno)
            return lines
        return lines

    for index, (backend, api_class) in enumerate([("tensorrt", TensorRTApi), ("tensorrt-rtx", TensorRTRtxApi)]):
        for scenario in [*SCENARIOS, *([runtime_cycled] if api_class.deferred_weights else [])]:
            spy, api = spied(surfaces, backend, api_class)
            folder = tmp_path / f"{index}-{scenario.__name__}"
            folder.mkdir()
            sys.settrace(trace)
            try:
                scenario(spy, api, folder)
            finally:
                sys.settrace(None)
    _load_paths(executed, trace)
    missing = [s for s in _statements(source) if not executed & set(range(s.lineno, (s.end_lineno or s.lineno) + 1))]
    assert not missing, "statements of compile/api.py no spy ran: " + ", ".join(
        f"line {s.lineno}: {ast.unparse(s)[:60]}" for s in missing)


def _load_paths(executed: set[int], trace) -> None:  # noqa: ANN001
    """``load``: the real library, a missing one, and a folder of type stubs that imports as a namespace."""
    sys.settrace(trace)
    try:
        if HAS_RTX:
            TensorRTRtxApi.load()
        _load_missing_and_stubs()
    finally:
        sys.settrace(None)


def real_tensorrt() -> bool:
    """Whether ``import tensorrt`` finds the real bindings here, not nothing or a folder of type stubs
    (which imports as an empty namespace package: a spec with no origin)."""
    module = sys.modules.get("tensorrt")
    if module is not None:
        return hasattr(module, "Builder")
    spec = importlib.util.find_spec("tensorrt")
    return spec is not None and spec.origin is not None


def _load_missing_and_stubs() -> None:
    if real_tensorrt():
        return  # a stubs folder on the path would lose to the installed package: nothing to check here
    class Missing(TensorRTApi):
        module_name = "no_such_trt_module"
    with pytest.raises(EngineUnavailable, match="tensorrt is not installed .* pip install 'atedm-export\\[tensorrt\\]'"):
        Missing.load()
    sys.path.insert(0, str(STUBS))
    try:
        sys.modules.pop("tensorrt", None)
        with pytest.raises(EngineUnavailable, match="has no bindings \\(type stubs only\\?\\)"):
            TensorRTApi.load()
    finally:
        sys.path.remove(str(STUBS))
        sys.modules.pop("tensorrt", None)


def test_type_stubs_are_not_mistaken_for_tensorrt(surfaces) -> None:
    """tensorrt-stubs installs a `tensorrt/` folder that imports as an empty namespace package."""
    if real_tensorrt():
        pytest.skip("the real TensorRT is installed here: `import tensorrt` finds its bindings, never the stubs' folder")
    _load_missing_and_stubs()


def _statements(source: Path) -> list[ast.stmt]:
    """The simple statements inside functions (what runs at call time), docstrings left out."""
    found = []
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for stmt in ast.walk(node):
                if stmt is node or not isinstance(stmt, ast.stmt):
                    continue
                if isinstance(stmt, (ast.If, ast.For, ast.While, ast.Try, ast.With, ast.FunctionDef, ast.ClassDef)):
                    continue
                if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
                    continue
                found.append(stmt)
    return found


def test_only_the_adapter_names_a_library() -> None:
    """No module but compile/api.py imports a TensorRT module or reaches into one (the ``_trt`` handle)."""
    offenders = []
    for path in sorted((ROOT / "atedm_export").rglob("*.py")):
        if path.name == "api.py" and path.parent.name == "compile":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Attribute) and node.attr in ("_trt", "trt"):
                names = [node.attr]
            elif isinstance(node, ast.Constant) and node.value == "tensorrt_rtx_bindings":
                names = [node.value]  # ("tensorrt" alone is also the backend's name in registry.py)
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                names = [str(node.args[0].value)]
            if any(n.split(".")[0] in ("tensorrt", "tensorrt_rtx_bindings", "_trt", "trt") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, "library names outside compile/api.py: " + ", ".join(offenders)


@pytest.mark.parametrize("backend, api_class", LIBRARIES)
def test_the_spy_refuses_what_the_library_lacks(surfaces, backend, api_class) -> None:
    """The check can fail: the calls this project once made wrongly are refused by each library's spy."""
    spy, api = spied(surfaces, backend, api_class)
    engine = spy.spy_class("ICudaEngine")._spy_make()
    with pytest.raises(ConformanceError, match="ICudaEngine has no attribute 'get_device_memory_size_v2'"):
        engine.get_device_memory_size_v2()
    with pytest.raises(TypeError):
        engine.device_memory_size_v2()  # a property, not a method
    if backend == "tensorrt-rtx":
        with pytest.raises(ConformanceError, match="ICudaEngine has no attribute 'device_memory_size'"):
            _ = engine.device_memory_size
        with pytest.raises(ConformanceError, match="has no attribute 'create_execution_context_without_device_memory'"):
            engine.create_execution_context_without_device_memory()
    context = engine.create_execution_context(spy.ExecutionContextAllocationStrategy.USER_MANAGED)
    with pytest.raises(ConformanceError, match="set_tensor_address\\('latent'\\) matches no overload"):
        context.set_tensor_address("latent")
    with pytest.raises(ConformanceError, match="set_device_memory\\('0x10', 64\\) matches no overload"):
        context.set_device_memory("0x10", 64)
    with pytest.raises(ConformanceError, match="read-only"):
        engine.num_io_tensors = 3
    with pytest.raises(ConformanceError, match="has no method 'write_all' to override"):
        class Writer(spy.IStreamWriter):  # noqa: F841
            def write_all(self, data: bytes) -> int:
                return 0
