"""Triton ``config.pbtxt`` files, built and checked with Triton's own model-config protobuf.

Configs are built as ``ModelConfig`` messages (from ``tritonclient``), printed as protobuf text, parsed
back, and checked for what makes a server refuse a model at load: a name that differs from its folder,
no backend or an unknown one, a missing model file, non-static or empty dims, duplicate tensor names,
batching options on a model that cannot batch, instance kinds the backend does not run on. A repository
that would not load is an error at deploy time, not on the server.

Graph models take static dims, their shape's. The router takes every shape of the build: a per-row dim that
differs between shapes (a multi-shape build's latent height or width) is ``-1``, variable, and the router
picks the shape from each request's ``sample`` (``routing``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..contract import INT32, Precision, precision_of
from ..errors import AtedmError
from ..buildfolder import MANIFEST, Manifest, ShapeView, TensorEntry, parse_manifest, views
from .routing import STAGE_OUTPUT, STEP_INPUTS
from .serving import BUILD_PARAMETER, GRAPH_MODELS_PARAMETER, GRAPH_PARAMETER, MANIFEST_PARAMETER, SHAPE_PARAMETER

CONFIG = "config.pbtxt"
MODEL_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
#: what each backend needs in the version folder, and the instance kinds it runs on
MODEL_FILES = {"python": "model.py", "tensorrt_plan": "model.plan"}
INSTANCE_KINDS = {"python": {"KIND_CPU", "KIND_GPU", "KIND_MODEL"}, "tensorrt_plan": {"KIND_GPU"}}


class DeployError(AtedmError):
    """A repository that cannot be written, or that a Triton server would refuse to load."""


def _pb() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise DeployError("deploy needs tritonclient: pip install 'atedm-export[triton]'") from None
    return model_config_pb2


def _add_tensors(field: Any, tensors: list[tuple[str, str, list[int]]]) -> None:
    pb = _pb()
    for name, data_type, dims in tensors:
        field.add(name=name, data_type=pb.DataType.Value(data_type), dims=dims)


def _graph_tensors(entries: list[TensorEntry]) -> list[tuple[str, str, list[int]]]:
    return [(t.name, precision_of(t.dtype).triton, list(t.shape)) for t in entries]


RouterTensors = list[tuple[str, Precision, list[int]]]  # (name, precision, per-row dims)


def router_tensors(manifest: Manifest) -> tuple[RouterTensors, RouterTensors]:
    """The router's per-row inputs and outputs (the graphs' without their batch dim; a scalar per row is ``[1]``, as
    are the step inputs and the stage output): ``(name, precision, dims)``, a dim ``-1`` where the build's shapes
    differ in it."""
    shapes = views(manifest)

    def rows(pick: Any) -> RouterTensors:
        tensors = []
        for i, t in enumerate(pick(shapes[0])):
            dims = [list(pick(v)[i].shape[1:]) or [1] for v in shapes]
            merged = [d if all(other[j] == d for other in dims) else -1 for j, d in enumerate(dims[0])]
            tensors.append((t.name, precision_of(t.dtype), merged))
        return tensors

    inputs = rows(lambda v: v.inputs) + [(n, INT32, [1]) for n in STEP_INPUTS]
    outputs = rows(lambda v: v.outputs[:1]) + [(STAGE_OUTPUT, INT32, [1])]
    return inputs, outputs


def _triton(tensors: RouterTensors) -> list[tuple[str, str, list[int]]]:
    return [(name, p.triton, dims) for name, p, dims in tensors]


def check_gpus(gpus: tuple[int, ...]) -> None:
    """GPU indices as Triton's instance groups take them: each one once, none negative."""
    if any(gpu < 0 for gpu in gpus) or len(set(gpus)) != len(gpus):
        raise DeployError(f"--gpus {','.join(map(str, gpus))}: expected distinct GPU indices, each 0 or more")


def graph_config(name: str, view: ShapeView, graph: str, variant: str, instances: int, build: str = "",
                 gpus: tuple[int, ...] = ()) -> Any:
    """One graph at ``view``'s static shape: a TensorRT plan on GPUs, or the onnxruntime
    stage model.

    ``build``: for the onnxruntime model, the shared build folder, relative to the repository. ``gpus`` (tensorrt):
    an instance group of ``instances`` on each of these GPUs, so Triton's scheduler spreads the router's calls to
    this graph over them; none: ``instances`` on every GPU the server sees (Triton's default for ``KIND_GPU``).
    """
    pb = _pb()
    config = pb.ModelConfig(name=name, max_batch_size=0)
    if variant == "tensorrt":
        config.platform = "tensorrt_plan"
        config.default_model_filename = MODEL_FILES["tensorrt_plan"]
        kind = pb.ModelInstanceGroup.KIND_GPU
    else:
        config.backend = "python"
        config.parameters[GRAPH_PARAMETER].string_value = graph
        config.parameters[BUILD_PARAMETER].string_value = build
        config.parameters[SHAPE_PARAMETER].string_value = view.shape.model_dump_json()
        kind = pb.ModelInstanceGroup.KIND_CPU
    _add_tensors(config.input, _graph_tensors(view.inputs))
    _add_tensors(config.output, _graph_tensors(view.outputs))
    for gpu in gpus or [None]:
        config.instance_group.add(kind=kind, count=instances, gpus=[] if gpu is None else [gpu])
    return config


def router_config(name: str, manifest: Manifest, graph_models: dict[str, str], instances: int, max_batch: int,
                  queue_delay_us: int) -> Any:
    """The UNet clients call: per-row inputs plus step and step count, batched up to ``max_batch`` rows, at any of
    the build's shapes (``router_tensors``); ``graph_models`` maps each graph's id to the model serving it."""
    pb = _pb()
    config = pb.ModelConfig(name=name, backend="python", max_batch_size=max_batch)
    inputs, outputs = router_tensors(manifest)
    _add_tensors(config.input, _triton(inputs))
    _add_tensors(config.output, _triton(outputs))
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=instances)
    config.parameters[MANIFEST_PARAMETER].string_value = manifest.model_dump_json()
    config.parameters[GRAPH_MODELS_PARAMETER].string_value = json.dumps(graph_models, sort_keys=True)
    return config


def to_text(config: Any) -> str:
    """Protobuf text, parsed back with Triton's ModelConfig and compared, before anything is written."""
    from google.protobuf import text_format

    text = text_format.MessageToString(config)
    if parse(text, f"{config.name}/{CONFIG}") != config:
        raise DeployError(f"{config.name}/{CONFIG} does not survive a round trip through Triton's ModelConfig")
    return text


def parse(text: str, source: str) -> Any:
    from google.protobuf import text_format

    config = _pb().ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise DeployError(f"{source}: not a valid Triton model config: {exc}") from None
    return config


def check_model(folder: Path, config: Any) -> None:
    """What makes Triton refuse to load the model in ``folder``; each failure is one line naming it."""
    pb = _pb()
    where = f"{folder.name}/{CONFIG}"
    if config.name != folder.name:
        raise DeployError(f"{where}: name '{config.name}' differs from its folder '{folder.name}'")
    if not MODEL_NAME.match(config.name):
        raise DeployError(f"{where}: model name '{config.name}' must be letters, digits, '_' or '-'")
    kind = config.platform or config.backend
    if kind not in MODEL_FILES or (config.platform and config.backend):
        raise DeployError(f"{where}: backend '{kind}' is not one deploy writes; expected one of: {', '.join(MODEL_FILES)}")
    model_file = folder / "1" / (config.default_model_filename or MODEL_FILES[kind])
    if not model_file.is_file():
        raise DeployError(f"{where}: version 1 has no {model_file.name}")
    if GRAPH_PARAMETER in config.parameters:
        shared = folder.parent / config.parameters[BUILD_PARAMETER].string_value
        if not (shared / MANIFEST).is_file():
            raise DeployError(f"{where}: its build folder {shared} has no {MANIFEST}")
    if config.max_batch_size < 0:
        raise DeployError(f"{where}: max_batch_size must be >= 0, got {config.max_batch_size}")
    if config.HasField("dynamic_batching") and config.max_batch_size == 0:
        raise DeployError(f"{where}: dynamic_batching needs max_batch_size > 0")
    router = MANIFEST_PARAMETER in config.parameters  # takes every shape of its build: -1 where they differ
    for direction, tensors in (("input", config.input), ("output", config.output)):
        names = [t.name for t in tensors]
        if not names or len(set(names)) != len(names) or not all(names):
            raise DeployError(f"{where}: {direction} names must be present and unique, got {names}")
        for t in tensors:
            if t.data_type == pb.TYPE_INVALID:
                raise DeployError(f"{where}: {direction} '{t.name}' has no data_type")
            if router and t.dims and all(d >= 1 or d == -1 for d in t.dims):
                continue
            if not t.dims or any(d < 1 for d in t.dims):
                what = "positive dims, or -1 (variable)" if router else "static positive dims"
                raise DeployError(f"{where}: {direction} '{t.name}' needs {what}, got {list(t.dims)}")
    allowed = INSTANCE_KINDS[kind]
    placed: list[int] = []
    for group in config.instance_group:
        kind_name = pb.ModelInstanceGroup.Kind.Name(group.kind)
        if group.count < 1 or kind_name not in allowed:
            raise DeployError(f"{where}: instance group {kind_name} x{group.count}; {kind} runs {', '.join(sorted(allowed))}, count >= 1")
        if group.gpus and kind_name != "KIND_GPU":
            raise DeployError(f"{where}: instance group {kind_name} names GPUs {list(group.gpus)}; only KIND_GPU groups do")
        placed += group.gpus
    if any(gpu < 0 for gpu in placed) or len(set(placed)) != len(placed):
        raise DeployError(f"{where}: instance groups place GPUs {placed}; expected each GPU once, none negative")


def read_repository(repository: Path, models: Iterable[str] | None = None) -> dict[str, Any]:
    """The models of a repository, parsed and checked: ``{name: ModelConfig}``.

    ``models``: only these (a deployment's, in a repository other models share), each of which must be
    there; else every folder, as a server loads them.
    """
    if models is None:
        folders = sorted(p for p in repository.iterdir() if p.is_dir())
    else:
        folders = [repository / name for name in sorted(models)]
    configs = {}
    for folder in folders:
        if not folder.is_dir():
            raise DeployError(f"{repository}: model folder '{folder.name}' is missing; redeploy the repository")
        path = folder / CONFIG
        if not path.is_file():
            raise DeployError(f"{folder.name}: no {CONFIG}; Triton loads every folder of a repository as a model")
        config = parse(path.read_text(), f"{folder.name}/{CONFIG}")
        check_model(folder, config)
        configs[config.name] = config
    if not configs:
        raise DeployError(f"{repository} holds no models")
    return configs


def check_routes(configs: dict[str, Any], router: str) -> Manifest:
    """The router takes every shape of its build, and its graph models exist and take exactly their shape's static
    inputs and outputs; every stage of every shape has a model."""
    config = configs.get(router)
    if config is None or MANIFEST_PARAMETER not in config.parameters:
        raise DeployError(f"the repository has no atedm-export router model '{router}'; it has: {', '.join(configs)}")
    manifest = parse_manifest(config.parameters[MANIFEST_PARAMETER].string_value)
    graph_models = json.loads(config.parameters[GRAPH_MODELS_PARAMETER].string_value)
    want = _pb().ModelConfig()
    inputs, outputs = router_tensors(manifest)
    _add_tensors(want.input, _triton(inputs))
    _add_tensors(want.output, _triton(outputs))
    if list(config.input) != list(want.input) or list(config.output) != list(want.output):
        raise DeployError(f"{router}/{CONFIG}: inputs and outputs differ from what its build's shapes take")
    graphs = {view.graph_id(entry.name): view for view in views(manifest) for entry in view.graphs()
              if not entry.same_as}
    for graph, model in graph_models.items():
        served = configs.get(model)
        if served is None:
            raise DeployError(f"{router} routes graph '{graph}' to model '{model}', which the repository lacks")
        view = graphs.get(graph)
        if view is None:
            raise DeployError(f"{router} routes graph '{graph}', which its build does not have")
        want = _pb().ModelConfig()
        _add_tensors(want.input, _graph_tensors(view.inputs))
        _add_tensors(want.output, _graph_tensors(view.outputs))
        if list(served.input) != list(want.input) or list(served.output) != list(want.output):
            shape = f" (shape {view.shape.key})" if manifest.multi_shape else ""
            raise DeployError(f"{model}/{CONFIG}: inputs and outputs differ from the build's static graph I/O{shape}")
    for view in views(manifest):
        for stage in view.stages:
            if view.graph_id(stage.same_as or stage.name) not in graph_models:
                shape = f" at {view.shape.key}" if manifest.multi_shape else ""
                raise DeployError(f"{router} has no model for stage '{stage.name}'{shape}")
    return manifest
