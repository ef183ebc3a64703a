"""``atedm-export deploy``: a build folder → a Triton model repository.

Layout (``--name atedm_unet``; every model's numbered folders are its versions, one build each)::

    REPO/atedm_unet/            the UNet clients call (Python backend): routes rows to stage graphs by BLS
    REPO/atedm_unet/1/build/    that version's manifest.json (+ onnx/: every graph, one shared weights file, for
                                onnxruntime)
    REPO/atedm_unet_baseline/   the unpruned graph    } tensorrt:    1/model.plan (tensorrt_plan, KIND_GPU)
    REPO/atedm_unet_<stage>/    each pruned stage     } onnxruntime: 1/model.py, serving its graph of 1/build
    REPO/README.md              how to start the server and call it
    REPO/atedm-deploy.json      what was deployed from where, every file with its sha256

``deploy --next-version`` adds a build as the next version of every model beside the serving one
(``versions``), and ``rollout`` moves running servers to it (``rollout``).

A multi-shape build has a graph model per (shape, graph): ``atedm_unet_<graph>_<shape key>``
(``atedm_unet_main_1216x832-b2``), each config at its shape's static dims; the one router takes every shape
and picks the graph model from each request's ``sample`` and step (``routing``). A stage that prunes
nothing is routed to the baseline model of its shape. The onnxruntime graph models share one
copy of the build's graphs and weights (Triton ignores a model folder's non-numeric subfolders), so
the weights are on disk once per version and every model's session maps the same pages. Artifacts are copied (or hard-linked with
``link``) and each copy is checked against the manifest's sha256; configs are checked with Triton's own
model-config protobuf.

A deploy writes only its own entries (``placement``): the models above, the README and the record. Other
models in the folder (a shared repository) stay as they are, and a name of ours that one of them already
uses is an error. ``atedm-deploy.json`` marks what a deploy wrote: ``--force`` replaces exactly that, one
atedm-export deployment per repository folder. A foreign ``README.md`` is left alone: ours then goes into
the router's folder (the record says where).
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
from ..buildfolder import (MANIFEST, FileEntry, GraphEntry, Manifest, ShapeView, manifest_sha256, read_manifest, check_file,
                           check_files, views, write_manifest)
from ..registry import DEPLOY_VARIANTS
from ..staging import check_apart, check_destination, check_output_file, staged_folder
from ..userfiles import load_json
from .config import (CONFIG, MODEL_NAME, DeployError, build_template, check_gpus, check_routes, graph_config,
                     read_repository, router_config, to_text)
from .kubernetes import KUBERNETES_VERSION, Cluster, check_cluster, check_manifests, manifests, write_kubernetes
from .kubernetes import RECORD as KUBERNETES_RECORD
from .placement import check_movable, check_not_a_build, staged_entries
from .readme import repository_readme
from .routing import graph_model_name
from .layout import BUILD_FOLDER, BYTECODE_GUARD, BYTECODE_GUARD_TEXT, README, RECORD

DEFAULT_ROUTER = "atedm_unet"
FORMAT = "atedm-export.deploy/2"  # 2: a version folder per build, the router's manifest in it (1: one version)
MODEL_SOURCES = {  # what each generated model.py holds: the model lives in the package, versioned with it
    "router": "from atedm_export.deploy.serving import RouterModel as TritonPythonModel  # noqa: F401\n",
    "onnxruntime": "from atedm_export.deploy.serving import OnnxRuntimeStageModel as TritonPythonModel  # noqa: F401\n",
}
Progress = Callable[[str, str], None]


def _python_model(folder: Path, kind: str) -> None:
    """A Python model's version folder: its ``model.py`` (``MODEL_SOURCES[kind]``) and the bytecode guard."""
    (folder / "model.py").write_text(MODEL_SOURCES[kind])
    (folder / BYTECODE_GUARD).write_text(BYTECODE_GUARD_TEXT)


@dataclass(frozen=True)
class DeployRequest:
    build: Path
    repository: Path
    name: str = DEFAULT_ROUTER  # the router's model name (next_version: the deployment's)
    variant: str = "auto"  # tensorrt: tensorrt_plan models (GPUs) | onnxruntime: Python-backend models (CPUs) | auto
    instances: int = 1  # of each model, on each GPU of ``gpus`` (tensorrt), or on the CPU (onnxruntime)
    gpus: tuple[int, ...] = ()  # tensorrt: the GPUs each graph model runs on, an instance group each; () = every GPU
    max_batch: int | None = None  # rows per router call; default: the build's static batch (the largest of its shapes)
    queue_delay_us: int = 2000  # how long the router's dynamic batcher waits to fill a batch
    link: bool = False  # hard-link artifacts instead of copying (same filesystem)
    force: bool = False
    kubernetes: Path | None = None  # also write Kubernetes manifests for the repository here (kubernetes.py)
    storage_uri: str | None = None  # where the repository will be uploaded for the cluster (s3://, gs://, as://)
    load_seconds: float | None = None  # the servers' model-load time (``serve`` prints it); None: from the files' size
    max_replicas: int = 4


def auto_variant(manifest: Manifest) -> str:
    """``tensorrt`` where the build has TensorRT plans that hold their weights (what Triton loads), else ``onnxruntime``."""
    engine = manifest.engine
    return "tensorrt" if engine.library == "tensorrt" and not engine.weights_stripped else "onnxruntime"


def _check(request: DeployRequest, manifest: Manifest) -> None:
    if request.variant not in DEPLOY_VARIANTS:
        raise DeployError(f"unknown deploy variant '{request.variant}'; expected one of: auto, {', '.join(DEPLOY_VARIANTS)}")
    if not MODEL_NAME.match(request.name):
        raise DeployError(f"model name '{request.name}' must be letters, digits, '_' or '-'")
    if request.instances < 1:
        raise DeployError(f"--instances must be >= 1, got {request.instances}")
    if request.max_batch is not None and request.max_batch < 1:
        raise DeployError(f"--max-batch must be >= 1, got {request.max_batch}")
    check_gpus(request.gpus)
    if request.variant != "tensorrt":
        if request.gpus:
            raise DeployError(f"--gpus places the tensorrt variant's plans on GPUs; this deployment is the "
                              f"{request.variant} variant, whose graph models run on the CPU (--instances sets how "
                              "many): deploy a build with TensorRT plans, or leave out --gpus")
        return
    engine = manifest.engine
    if engine.library != "tensorrt":
        found = f"{engine.library} engines" if engine.built else "no engines"
        raise DeployError(f"{request.build} has {found}; Triton's tensorrt_plan backend loads TensorRT plans only: "
                          "rebuild with --library tensorrt on the GPU, or deploy --variant onnxruntime")
    if engine.weights_stripped:
        raise DeployError(f"{request.build} has weight-stripped engines, which Triton's TensorRT backend does not refit; "
                          "rebuild with --keep-weights")


def _distinct_graphs(manifest: Manifest) -> list[tuple[ShapeView, GraphEntry]]:
    """Every graph a model serves, with the view of its shape: per shape, the graphs no stage reuses from another."""
    return [(view, entry) for view in views(manifest) for entry in view.graphs() if not entry.same_as]


def model_names(request: DeployRequest, manifest: Manifest) -> list[str]:
    """Every model folder the deploy will write: the router and one per distinct graph of each shape."""
    return [request.name, *(graph_model_name(request.name, view.graph_id(entry.name))
                            for view, entry in _distinct_graphs(manifest))]


def read_record(repository: Path) -> dict:
    """The record of the deployment in ``repository``: what it wrote there, and from which build."""
    path = repository / RECORD
    if not path.is_file():
        raise DeployError(f"{repository} is not an atedm-export repository: {RECORD} not found")
    record = load_json(path, "an atedm-export deploy record", DeployError)
    if not isinstance(record, dict) or not isinstance(record.get("router"), str) or not isinstance(record.get("models"), dict):
        raise DeployError(f"{path} has no router or models; expected an atedm-export deploy record (redeploy the repository)")
    return record


def current_record(repository: Path) -> dict:
    """The record of a deployment this atedm-export serves and adds versions to (``read_record``, of its format)."""
    record = read_record(repository)
    if record.get("format") != FORMAT:
        raise DeployError(f"{repository} was deployed by an older atedm-export ({record.get('format')}, one version per "
                          f"model; this one reads {FORMAT}): deploy the build again with --force")
    return record


def owned_entries(record: dict, repository: Path) -> frozenset[str]:
    """The entries of ``repository`` the deploy that wrote ``record`` made there: all that ``--force`` may replace.

    A record is a file anyone can edit: a name that is not a model name (``..``, a path) is refused rather
    than followed.
    """
    bad = [name for name in record["models"] if not MODEL_NAME.match(name)]
    if bad:
        raise DeployError(f"{repository / RECORD} lists model '{bad[0]}', which is not a model name (letters, digits, "
                          "'_' or '-'): the record was edited by hand")
    readme = [README] if record.get("readme", README) == README else []  # else it is in the router's folder
    return frozenset([*record["models"], RECORD, *readme])


def _replaceable(out: Path, force: bool) -> frozenset[str]:
    """What the deploy may replace in ``out``: nothing, or (``force``) what the deployment recorded there wrote."""
    check_destination(out, force=True)  # a file in its place or above it, a read-only folder; existing is fine
    check_movable(out)
    if not out.exists():
        return frozenset()
    check_output_file(out / RECORD)  # the folder is writable and the record's name is free for a file
    if not (out / RECORD).exists():
        return frozenset()
    record = read_record(out)
    if not force:
        raise DeployError(f"{out} already holds an atedm-export deployment (router '{record['router']}'); "
                          "pass --force to replace it")
    return owned_entries(record, out)


def check_free(out: Path, names: list[str], replace: frozenset[str]) -> None:
    """Refuse a name of ours already taken by an entry that deploy did not write: such an entry is never replaced."""
    for name in names:
        if name not in replace and os.path.lexists(out / name):
            raise DeployError(f"{out / name} already exists and atedm-export deploy did not write it; it is never "
                              "replaced: choose another --name, or move it away")


def _readme_path(out: Path, router: str, replace: frozenset[str]) -> str:
    """``README.md`` at the top, unless someone else's is there: then ours goes into the router's folder."""
    foreign = README not in replace and os.path.lexists(out / README)
    return f"{router}/{README}" if foreign else README


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
    check_file(target, item, owner)


def _records(work: Path, placements: list[tuple[FileEntry, Path]]) -> list[dict]:
    return [{"path": str(target.relative_to(work)), "sha256": item.sha256, "bytes": item.bytes}
            for item, target in placements]


def _version_build(work: Path, request: DeployRequest, manifest: Manifest, version: int) -> list[dict]:
    """The router's ``<version>/build/``: the manifest it routes by and, for onnxruntime, every distinct graph of every
    shape and the one weights file its graph models serve."""
    folder = work / request.name / str(version) / BUILD_FOLDER
    folder.mkdir(parents=True)
    write_manifest(folder, manifest)
    placements = []
    if request.variant == "onnxruntime":
        graphs = {f.path: f for e in manifest.all_graphs() for f in (e.onnx, e.ort_onnx) if f is not None}
        placements = [(item, folder / item.path) for item in (*manifest.weight_files, *graphs.values())]
    for item, target in placements:
        _place(request.build / item.path, target, item, "build", request.link)
    return _records(work, placements)


def _graph_model(work: Path, request: DeployRequest, view: ShapeView, entry: GraphEntry,
                 version: int) -> tuple[str, list[dict]]:
    """One graph's model folder at ``view``'s shape: its config and its version ``version``; returns its name and the
    files placed, with their checksums."""
    name = graph_model_name(request.name, view.graph_id(entry.name))
    folder = work / name / str(version)
    folder.mkdir(parents=True)
    placements = []
    if request.variant == "tensorrt":
        assert entry.engine is not None
        placements = [(entry.engine, folder / "model.plan")]
    else:
        _python_model(folder, "onnxruntime")
    for item, target in placements:
        _place(request.build / item.path, target, item, entry.name, request.link)
    config = graph_config(name, view, entry.name, request.variant, request.instances, build_template(request.name),
                          request.gpus)
    (work / name / CONFIG).write_text(to_text(config))
    return name, _records(work, placements)


def write_version(work: Path, request: DeployRequest, manifest: Manifest, version: int, max_batch: int,
                  progress: Progress) -> dict[str, dict]:
    """Version ``version`` of every model of the build under ``work`` (``<model>/<version>/``, each model's
    ``config.pbtxt``); returns each model's record: its graph, shape, routes and the files placed."""
    models: dict[str, dict] = {}
    shared = _version_build(work, request, manifest, version)
    if len(shared) > 1:
        progress(request.name, f"{version}/{BUILD_FOLDER}/: {len(shared) - 1} graphs and one weights file, "
                               f"{sum(f['bytes'] for f in shared) / 2**20:,.1f} MiB placed and checked")
    routes = {}
    for view, entry in _distinct_graphs(manifest):  # a stage with same_as is routed to the graph it reuses
        graph = view.graph_id(entry.name)
        model, files = _graph_model(work, request, view, entry, version)
        routes[graph] = model
        models[model] = {"graph": graph, "shape": view.shape.key, "files": files}
        placed = (f"{sum(f['bytes'] for f in files) / 2**20:,.1f} MiB placed and checked" if files
                  else f"served from {request.name}/{version}/{BUILD_FOLDER}/")
        shape = f" at {view.shape.key}" if manifest.multi_shape else ""
        progress(model, f"{entry.name} graph{shape}, version {version}: {placed}")
    router = work / request.name / str(version)
    _python_model(router, "router")
    config = router_config(request.name, manifest, request.instances, max_batch, request.queue_delay_us)
    (work / request.name / CONFIG).write_text(to_text(config))
    models[request.name] = {"graph": None, "routes": routes, "files": shared}
    shapes = f"{len(manifest.shapes)} shapes × " if manifest.multi_shape else ""
    progress(request.name, f"router version {version}: {shapes}{len(manifest.shapes[0].stages)} stages over "
                           f"{len(routes)} graph models, up to {max_batch} rows per call")
    return models


def version_record(request: DeployRequest, manifest: Manifest) -> dict:
    """What the record says of one version: the build it serves, and when it was deployed."""
    return {"build": str(request.build), "manifest_sha256": manifest_sha256(request.build),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def make_record(request: DeployRequest, manifest: Manifest, max_batch: int, readme: str,
                versions: dict[str, dict], models: dict[str, dict]) -> dict:
    """The deployment's record (``atedm-deploy.json``): its newest version's build and options, every version, and
    every model with the files of every version."""
    newest = versions[str(max(map(int, versions)))]
    return {
        "format": FORMAT,
        "created": newest["created"],
        "atedm_export": __version__,
        "build": newest["build"],
        "manifest_sha256": newest["manifest_sha256"],
        "variant": request.variant,
        "router": request.name,
        "max_batch": max_batch,
        "shapes": [shape.key for shape in manifest.shape_list],
        "instances": request.instances,
        "gpus": list(request.gpus),
        "engine": manifest.engine.model_dump(mode="json"),
        "readme": readme,
        "version": max(map(int, versions)),
        "versions": versions,
        "models": models,
    }


def resolve_variant(request: DeployRequest, manifest: Manifest, progress: Progress) -> DeployRequest:
    """``auto`` made concrete from the build (TensorRT plans: tensorrt, else onnxruntime), then the request checked."""
    if request.variant == "auto":
        request = dataclasses.replace(request, variant=auto_variant(manifest))
        progress("repository", f"variant: {request.variant} (the build has {manifest.engine.library or 'no'} engines)")
    _check(request, manifest)
    return request


def deploy(request: DeployRequest, progress: Progress = lambda model, event: None) -> dict:
    """Write the deployment into the repository folder; returns its record (also ``REPO/atedm-deploy.json``).

    Every check that can fail comes before the first file is written: the build and the repository apart,
    the request, the folder, the names, then every artifact's sha256.
    """
    build, out = request.build.resolve(), request.repository.resolve()
    check_apart(out, {"build": build}, "repository", DeployError)
    check_not_a_build(out, MANIFEST)
    manifest = read_manifest(build, verify=False)
    request = resolve_variant(dataclasses.replace(request, build=build), manifest, progress)
    replace = _replaceable(out, request.force)
    readme = _readme_path(out, request.name, replace)
    check_free(out, [*model_names(request, manifest), RECORD, Path(readme).parts[0]], replace)
    others = sorted(p.name for p in out.iterdir() if p.name not in replace) if out.is_dir() else []
    if others:
        progress("repository", f"{len(others)} other entries in {out} are left as they are")
    cluster = _cluster(request, manifest, out, progress) if request.kubernetes else None
    # every artifact the variant serves, against its sha256, before anything is copied (plans: tensorrt only)
    check_files(manifest, build, engines=request.variant == "tensorrt")
    max_batch = request.max_batch or max(shape.batch for shape in manifest.shape_list)
    with staged_entries(out, replace, last=RECORD) as work:
        models = write_version(work, request, manifest, 1, max_batch, progress)
        check_routes(work, read_repository(work), request.name)
        record = make_record(request, manifest, max_batch, readme, {"1": version_record(request, manifest)},
                             {name: {**info, "versions": [1]} for name, info in models.items()})
        (work / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        (work / readme).write_text(repository_readme(record, manifest))
        progress("repository", "configs checked with Triton's ModelConfig")
    if cluster is not None and request.kubernetes is not None:
        with staged_folder(request.kubernetes.resolve(), what="kubernetes") as work:
            written = write_kubernetes(work, cluster, {"repository": str(out), "build": str(build),
                                                       "manifest_sha256": record["manifest_sha256"]})
        progress("kubernetes", f"{len(written)} files in {request.kubernetes}: kubectl apply -k {request.kubernetes} "
                               f"(or -k {request.kubernetes / 'kserve'}); manifests checked against Kubernetes "
                               f"{KUBERNETES_VERSION}'s schemas and KServe's models")
    return record


def _served_bytes(manifest: Manifest, variant: str) -> int:
    """What a server of the variant reads: the plans, or the graphs and the weights they share."""
    if variant == "tensorrt":
        return sum(e.engine.bytes for e in manifest.all_graphs() if e.engine and not e.same_as)
    return sum(f.bytes for f in manifest.weight_files) + sum(e.onnx.bytes for e in manifest.all_graphs() if not e.same_as)


def _cluster(request: DeployRequest, manifest: Manifest, repository: Path, progress: Progress) -> Cluster:
    """The Kubernetes side of the request, checked (options, folder, every manifest) before anything is written."""
    assert request.kubernetes is not None
    folder = request.kubernetes.resolve()
    check_apart(folder, {"build": request.build, "repository": repository}, "--kubernetes", DeployError)
    check_destination(folder, request.force, owner_file=KUBERNETES_RECORD)
    served = _served_bytes(manifest, request.variant)
    load = request.load_seconds or 30 + served / 200e6  # a guess from the size; serve measures the real one
    cluster = Cluster(name=request.name.replace("_", "-").lower(), variant=request.variant,
                      gpus=max(1, len(request.gpus)), repository_bytes=served, load_seconds=load,
                      storage_uri=request.storage_uri, max_replicas=request.max_replicas)
    check_cluster(cluster)
    check_manifests(manifests(cluster), cluster)
    if request.load_seconds is None:
        progress("kubernetes", f"model-load time taken as {load:.0f}s from the files' size: pass the 'ready in' "
                               "time atedm-export serve prints as --load-seconds")
    return cluster


def check_repository(repository: Path, router: str | None = None, files: bool = True) -> Manifest:
    """Re-check a deployment: its models' configs, every version's routes, and (``files``) every file's recorded
    sha256. Returns the newest version's manifest.

    Only the models its record lists are checked: other models in the folder are someone else's.

    ``serve`` leaves the files out: each graph model checks its own files when the server loads it.
    """
    repository = Path(repository)
    record = current_record(repository)
    owned_entries(record, repository)  # the model names the record lists are names, not paths
    manifest = check_routes(repository, read_repository(repository, record["models"]), router or record["router"])
    for model, info in record["models"].items() if files else ():
        for f in info["files"]:
            check_file(repository / f["path"], FileEntry(**f), model)
    return manifest
