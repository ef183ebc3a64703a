"""``atedm-export deploy``: a build folder → a Triton model repository.

Layout (``--name atedm_unet``)::

    REPO/atedm_unet/            the UNet clients call (Python backend): routes rows to stage graphs by BLS
    REPO/atedm_unet/build/      onnxruntime: manifest.json + onnx/ (every graph, one shared weights file)
    REPO/atedm_unet_baseline/   the unpruned graph    } tensorrt:    1/model.plan (tensorrt_plan, KIND_GPU)
    REPO/atedm_unet_<stage>/    each pruned stage     } onnxruntime: 1/model.py, serving its graph of build/
    REPO/README.md              how to start the server and call it
    REPO/atedm-deploy.json      what was deployed from where, every file with its sha256

A stage that prunes nothing is routed to the baseline model. The onnxruntime graph models share one
copy of the build's graphs and weights (Triton ignores a model folder's non-numeric subfolders), so
the weights are on disk once and every model's session maps the same pages. Artifacts are copied (or hard-linked with
``link``) and each copy is checked against the manifest's sha256; configs are checked with Triton's own
model-config protobuf; the repository is written to a hidden folder and renamed into place when whole.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..manifest import FILENAME, FileEntry, GraphEntry, Manifest, sha256, verify_file
from ..registry import DEPLOY_VARIANTS
from ..staging import check_destination, staged_folder
from .config import CONFIG, MODEL_NAME, DeployError, check_routes, graph_config, read_repository, router_config, to_text
from .readme import repository_readme

SHARED_BUILD = "build"  # in the router's folder: what the onnxruntime graph models serve
RECORD = "atedm-deploy.json"
MODEL_SOURCES = {  # what each generated model.py holds: the model lives in the package, versioned with it
    "router": "from atedm_export.deploy.serving import RouterModel as TritonPythonModel  # noqa: F401\n",
    "onnxruntime": "from atedm_export.deploy.serving import OnnxRuntimeStageModel as TritonPythonModel  # noqa: F401\n",
}
Progress = Callable[[str, str], None]


@dataclass(frozen=True)
class DeployRequest:
    build: Path
    repository: Path
    name: str = "atedm_unet"
    backend: str = "auto"  # tensorrt: tensorrt_plan models (GPUs) | onnxruntime: Python-backend models (CPUs) | auto
    instances: int = 1
    max_batch: int | None = None  # rows per router call; default: the build's static batch
    queue_delay_us: int = 2000  # how long the router's dynamic batcher waits to fill a batch
    link: bool = False  # hard-link artifacts instead of copying (same filesystem)
    force: bool = False


def auto_variant(manifest: Manifest) -> str:
    """``tensorrt`` where the build has TensorRT plans that hold their weights (what Triton loads), else ``onnxruntime``."""
    engine = manifest.engine
    return "tensorrt" if engine.backend == "tensorrt" and not engine.weights_stripped else "onnxruntime"


def _check(request: DeployRequest, manifest: Manifest) -> None:
    if request.backend not in DEPLOY_VARIANTS:
        raise DeployError(f"unknown deploy backend '{request.backend}'; expected one of: auto, {', '.join(DEPLOY_VARIANTS)}")
    if not MODEL_NAME.match(request.name):
        raise DeployError(f"model name '{request.name}' must be letters, digits, '_' or '-'")
    if request.instances < 1:
        raise DeployError(f"--instances must be >= 1, got {request.instances}")
    if request.max_batch is not None and request.max_batch < 1:
        raise DeployError(f"--max-batch must be >= 1, got {request.max_batch}")
    if request.backend != "tensorrt":
        return
    engine = manifest.engine
    if engine.backend != "tensorrt":
        found = f"{engine.backend} engines" if not engine.skipped else "no engines"
        raise DeployError(f"{request.build} has {found}; Triton's tensorrt_plan backend loads TensorRT plans only: "
                          "rebuild with --backend tensorrt on the GPU, or deploy --backend onnxruntime")
    if engine.weights_stripped:
        raise DeployError(f"{request.build} has weight-stripped engines, which Triton's TensorRT backend does not refit; "
                          "rebuild with --keep-weights")


def _place(source: Path, target: Path, item: FileEntry, owner: str, link: bool) -> None:
    """Hard-link one artifact (the same file: nothing to re-check) or copy it and check the copy's sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(source, target)
            return
        except OSError:
            pass  # another filesystem: a copy it is
    shutil.copy2(source, target)
    verify_file(target, item, owner)


def _records(work: Path, placements: list[tuple[FileEntry, Path]]) -> list[dict]:
    return [{"path": str(target.relative_to(work)), "sha256": item.sha256, "bytes": item.bytes}
            for item, target in placements]


def _shared_build(work: Path, request: DeployRequest, manifest: Manifest) -> list[dict]:
    """The router's ``build/``: the manifest, every distinct graph and the one weights file, for all graph models."""
    folder = work / request.name / SHARED_BUILD
    folder.mkdir(parents=True)
    manifest.save(folder)
    graphs = {e.onnx.path: e.onnx for e in manifest.graphs()}
    placements = [(item, folder / item.path) for item in (manifest.weights, *graphs.values())]
    for item, target in placements:
        _place(request.build / item.path, target, item, "build", request.link)
    return _records(work, placements)


def _graph_model(work: Path, request: DeployRequest, manifest: Manifest, entry: GraphEntry) -> tuple[str, list[dict]]:
    """One graph's model folder; returns its name and the files placed, with their checksums."""
    name = f"{request.name}_{entry.name}"
    version = work / name / "1"
    version.mkdir(parents=True)
    placements = []
    if request.backend == "tensorrt":
        assert entry.engine is not None
        placements = [(entry.engine, version / "model.plan")]
    else:
        (version / "model.py").write_text(MODEL_SOURCES["onnxruntime"])
    for item, target in placements:
        _place(request.build / item.path, target, item, entry.name, request.link)
    config = graph_config(name, manifest, entry.name, request.backend, request.instances,
                          f"{request.name}/{SHARED_BUILD}")
    (work / name / CONFIG).write_text(to_text(config))
    return name, _records(work, placements)


def deploy(request: DeployRequest, progress: Progress = lambda model, event: None) -> dict:
    """Write the repository; returns its record (also written to ``REPO/atedm-deploy.json``)."""
    build = request.build.resolve()
    manifest = Manifest.load(build)  # checks every artifact's sha256 before anything is copied
    request = dataclasses.replace(request, build=build)
    if request.backend == "auto":
        engine = manifest.engine
        request = dataclasses.replace(request, backend=auto_variant(manifest))
        progress("repository", f"variant: {request.backend} (the build has "
                               f"{engine.backend if not engine.skipped else 'no'} engines)")
    _check(request, manifest)
    out = request.repository.resolve()
    check_destination(out, request.force)
    max_batch = request.max_batch or int(manifest.inputs[0].shape[0])
    with staged_folder(out, "deploy") as work:
        graph_models, models = {}, {}
        shared = _shared_build(work, request, manifest) if request.backend == "onnxruntime" else []
        if shared:
            progress(request.name, f"{SHARED_BUILD}/: {len(shared) - 1} graphs and one weights file, "
                                   f"{sum(f['bytes'] for f in shared) / 2**20:,.1f} MiB placed and checked")
        for entry in manifest.graphs():
            if entry.same_as:
                continue  # routed to the graph it reuses
            model, files = _graph_model(work, request, manifest, entry)
            graph_models[entry.name] = model
            models[model] = {"graph": entry.name, "files": files}
            placed = (f"{sum(f['bytes'] for f in files) / 2**20:,.1f} MiB placed and checked" if files
                      else f"served from {request.name}/{SHARED_BUILD}/")
            progress(model, f"{entry.name} graph, {placed}")
        router = work / request.name / "1"
        router.mkdir(parents=True)
        (router / "model.py").write_text(MODEL_SOURCES["router"])
        config = router_config(request.name, manifest, graph_models, request.instances, max_batch, request.queue_delay_us)
        (work / request.name / CONFIG).write_text(to_text(config))
        models[request.name] = {"graph": None, "routes": graph_models, "files": shared}
        progress(request.name, f"router: {len(manifest.stages)} stages over {len(graph_models)} graph models, "
                               f"up to {max_batch} rows per call")
        check_routes(read_repository(work), request.name)
        record = {
            "format": "atedm-export.deploy/1",
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "atedm_export": __version__,
            "build": str(build),
            "manifest_sha256": sha256(build / FILENAME),
            "backend": request.backend,
            "router": request.name,
            "max_batch": max_batch,
            "instances": request.instances,
            "engine": manifest.engine.model_dump(mode="json"),
            "models": models,
        }
        (work / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        (work / "README.md").write_text(repository_readme(record, manifest))
        progress("repository", "configs checked with Triton's ModelConfig")
    return record


def check_repository(repository: Path, router: str | None = None, files: bool = True) -> Manifest:
    """Re-check a written repository: every config, the routes, and (``files``) every file's recorded sha256.

    ``serve`` leaves the files out: each graph model checks its own files when the server loads it.
    """
    repository = Path(repository)
    record_path = repository / RECORD
    if not record_path.is_file():
        raise DeployError(f"{repository} is not an atedm-export repository: {RECORD} not found")
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError as exc:
        raise DeployError(f"{record_path} is not valid JSON ({exc.msg} at line {exc.lineno}); redeploy the repository") from None
    manifest = check_routes(read_repository(repository), router or record["router"])
    for model, info in record["models"].items() if files else ():
        for f in info["files"]:
            verify_file(repository / f["path"], FileEntry(**f), model)
    return manifest
