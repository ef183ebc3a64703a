"""Triton ``config.pbtxt`` files, built and checked with Triton's own model-config protobuf.

Configs are built as ``ModelConfig`` messages (from ``tritonclient``), printed as protobuf text, parsed
back, and checked for what makes a server refuse a model at load: a name that differs from its folder,
no backend or an unknown one, a missing model file, non-static or empty dims, duplicate tensor names,
batching options on a model that cannot batch, instance kinds the backend does not run on. A repository
that would not load is an error at deploy time, not on the server.

Graph models take static dims, their shape's. The router takes every shape of the build: a per-row dim that
differs between shapes (a multi-shape build's latent height or width) is ``-1``, variable, and the router
picks the shape from each request's ``sample`` (``routing``).

Versions: every model's numeric folders are versions, one build each. Graph models load every version
(``version_policy: all``), so a new build's graphs come up beside the old; the router loads only its newest
(``latest 1``), and each router version calls the graph models at its own version. A config is the same for
every version of its model (only the router's published manifest follows the newest), so Triton never
reloads a version that did not change.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..contract import INT32, Precision, precision_of
from ..errors import AtedmError
from ..buildfolder import MANIFEST, Manifest, ShapeView, TensorEntry, parse_manifest, read_manifest, views
from .routing import STAGE_OUTPUT, STEP_INPUTS, Router, graph_model_name
from .layout import BUILD_FOLDER
from .serving import BUILD_PARAMETER, GRAPH_PARAMETER, MANIFEST_PARAMETER, SHAPE_PARAMETER

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
    """One graph at ``view``'s static shape, every version loaded: a TensorRT plan on GPUs, or the onnxruntime
    stage model.

    ``build``: for the onnxruntime model, the build folder each version serves, relative to the repository, with
    ``{version}`` for its version (``build_template``). ``gpus`` (tensorrt):
    an instance group of ``instances`` on each of these GPUs, so Triton's scheduler spreads the router's calls to
    this graph over them; none: ``instances`` on every GPU the server sees (Triton's default for ``KIND_GPU``).
    """
    pb = _pb()
    config = pb.ModelConfig(name=name, max_batch_size=0)
    config.version_policy.all.SetInParent()  # a new build's version loads beside the one the router still calls
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


def build_template(router: str) -> str:
    """Where an onnxruntime graph model's version finds its build: in the router's folder of that version."""
    return f"{router}/{{version}}/{BUILD_FOLDER}"


def model_versions(folder: Path) -> list[int]:
    """A model folder's versions, as Triton reads them: its subfolders named by a positive integer, in order."""
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def version_manifests(repository: Path, router: str) -> dict[int, Manifest]:
    """The manifest each version of the router routes by (``<router>/<version>/build/``), by version."""
    return {version: read_manifest(repository / router / str(version) / BUILD_FOLDER, verify=False)
            for version in model_versions(repository / router)}


def router_config(name: str, manifest: Manifest, instances: int, max_batch: int, queue_delay_us: int) -> Any:
    """The UNet clients call: per-row inputs plus step and step count, batched up to ``max_batch`` rows, at any of
    the build's shapes (``router_tensors``). Only its newest version is loaded; ``manifest`` (the newest's) is
    published for clients."""
    pb = _pb()
    config = pb.ModelConfig(name=name, backend="python", max_batch_size=max_batch)
    config.version_policy.latest.num_versions = 1
    inputs, outputs = router_tensors(manifest)
    _add_tensors(config.input, _triton(inputs))
    _add_tensors(config.output, _triton(outputs))
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=instances)
    config.parameters[MANIFEST_PARAMETER].string_value = manifest.model_dump_json()
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
    versions = model_versions(folder)
    if not versions:
        raise DeployError(f"{where}: no version folder (1, 2, …) beside it; Triton loads a model's numbered folders")
    for version in versions:
        model_file = folder / str(version) / (config.default_model_filename or MODEL_FILES[kind])
        if not model_file.is_file():
            raise DeployError(f"{where}: version {version} has no {model_file.name}")
        if GRAPH_PARAMETER in config.parameters:
            shared = _version_build(folder, config, version)
            if not (shared / MANIFEST).is_file():
                raise DeployError(f"{where}: the build folder of version {version}, {shared}, has no {MANIFEST}")
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


def _version_build(folder: Path, config: Any, version: int) -> Path:
    """The build folder an onnxruntime graph model's ``version`` serves (its config's template filled in)."""
    template = config.parameters[BUILD_PARAMETER].string_value
    try:
        return folder.parent / template.format(version=version)
    except (KeyError, IndexError, ValueError):
        raise DeployError(f"{folder.name}/{CONFIG}: {BUILD_PARAMETER} '{template}' is not a path with {{version}}; "
                          "redeploy the repository") from None


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


def check_routes(repository: Path, configs: dict[str, Any], router: str) -> Manifest:
    """Every version of the router routes to graph models that have that version and take exactly their shape's
    static inputs and outputs; every version takes the inputs and outputs of the router's config (a client's contract
    does not change with a build); the config publishes the newest version's manifest. Returns that manifest."""
    config = configs.get(router)
    if config is None or MANIFEST_PARAMETER not in config.parameters:
        raise DeployError(f"the repository has no atedm-export router model '{router}'; it has: {', '.join(configs)}")
    manifests = version_manifests(repository, router)
    newest = manifests[max(manifests)]
    if parse_manifest(config.parameters[MANIFEST_PARAMETER].string_value) != newest:
        raise DeployError(f"{router}/{CONFIG} publishes another manifest than its newest version's "
                          f"({max(manifests)}); redeploy the repository")
    for version, manifest in manifests.items():
        want = _pb().ModelConfig()
        inputs, outputs = router_tensors(manifest)
        _add_tensors(want.input, _triton(inputs))
        _add_tensors(want.output, _triton(outputs))
        if list(config.input) != list(want.input) or list(config.output) != list(want.output):
            raise DeployError(f"{router}/{CONFIG}: inputs and outputs differ from what the shapes of version "
                              f"{version}'s build take")
        _check_graph_models(repository, configs, router, version, manifest)
    return newest


def _check_graph_models(repository: Path, configs: dict[str, Any], router: str, version: int, manifest: Manifest) -> None:
    """The graph models version ``version`` of the router calls: there, at that version, with their shape's I/O."""
    routes = Router(manifest)
    for view in views(manifest):
        for stage in view.stages:
            graph = routes.graph_of(stage.name, view)
            model = graph_model_name(router, graph)
            served = configs.get(model)
            shape = f" at {view.shape.key}" if manifest.multi_shape else ""
            if served is None:
                raise DeployError(f"{router} version {version} routes stage '{stage.name}'{shape} to model '{model}', "
                                  "which the repository lacks")
            if version not in model_versions(repository / model):
                raise DeployError(f"{router} version {version} calls model '{model}' at version {version}, which "
                                  f"it lacks (it has {model_versions(repository / model)})")
            want = _pb().ModelConfig()
            _add_tensors(want.input, _graph_tensors(view.inputs))
            _add_tensors(want.output, _graph_tensors(view.outputs))
            if list(served.input) != list(want.input) or list(served.output) != list(want.output):
                raise DeployError(f"{model}/{CONFIG}: inputs and outputs differ from the build's static graph I/O"
                                  + (f" (shape {view.shape.key})" if manifest.multi_shape else ""))
