"""Reading and writing ``BUILD/manifest.json``: the one reader (format check, migration, consistency, checksums)
and the one writer (a record changed as a whole, validated again, written atomically).

Build, refit and the runtime's engine bookkeeping all change records through ``rewrite``, so a changed record is
validated like a loaded one, and a manifest on disk is never half-written (a temporary file renamed over it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import ManifestError, format_validation_error
from ..shapes import Shape
from ..staging import write_atomically
from ..userfiles import load_json
from .checksums import check_files
from .consistency import check_consistent
from .layout import MANIFEST
from .record import FORMAT, GraphEntry, Manifest

READS = ("atedm-export.manifest/3", FORMAT)  # the formats this version loads; older ones are migrated in memory


def read_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """Read and check a build folder's manifest; ``verify`` also re-hashes every artifact."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{folder} is not a build folder: {MANIFEST} not found (run atedm-export build first)")
    data = load_json(path, "an atedm-export build manifest", ManifestError)
    found = data.get("format") if isinstance(data, dict) else None
    if found not in READS:
        raise ManifestError(f"{path} has format {found!r}; this atedm-export reads {FORMAT!r} (rebuild it)")
    try:
        manifest = Manifest.model_validate(migrate(data))
    except ValidationError as exc:
        raise ManifestError(format_validation_error(exc, str(path))) from None
    check_consistent(manifest, path)
    if verify:
        check_files(manifest, folder)
    return manifest


def parse_manifest(text: str) -> Manifest:
    """A record sent as JSON (a Triton config's parameter, a server's answer), from any format ``READS`` lists."""
    return Manifest.model_validate(migrate(json.loads(text)))


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A format-3 manifest as format 4: each graph given its shape's key, the engine library named ``library``
    (``None`` where format 3 said ``backend: onnx``) and its Python module ``module``. Format 4 is returned as is."""
    if data.get("format") == FORMAT:
        return data
    data = json.loads(json.dumps(data))  # a deep copy: the caller's dict stays as read
    for shape in data.get("shapes", []):
        try:
            key = Shape(batch=shape["batch"], height=shape["height"], width=shape["width"]).key
        except (KeyError, TypeError, ValidationError):
            continue  # a shape edited by hand: the record's validation names what is wrong
        for graph in [shape.get("baseline"), *shape.get("stages", [])]:
            if isinstance(graph, dict):
                graph.setdefault("shape", key)
    engine = data.get("engine")
    if isinstance(engine, dict) and "backend" in engine:
        backend = engine.pop("backend")
        engine["module"] = engine.pop("library", None)
        engine["library"] = None if backend == "onnx" else backend
    data["format"] = FORMAT
    return data


def rewrite(manifest: Manifest, graph: Callable[[GraphEntry], dict[str, Any]] | None = None,
            **fields: Any) -> Manifest:  # noqa: ANN401
    """``manifest`` with ``fields`` replaced and each graph (at every shape) updated with what ``graph`` returns
    for it, validated again as a whole: the one way a record changes."""
    data = manifest.model_dump(mode="json")
    if graph is not None:
        for shape, record in zip(data["shapes"], manifest.shapes):
            shape["baseline"].update(_json(graph(record.baseline)))
            for stage, entry in zip(shape["stages"], record.stages):
                stage.update(_json(graph(entry)))
    data.update(_json(fields))
    return Manifest.model_validate(data)


def _json(fields: dict[str, Any]) -> dict[str, Any]:
    """Record values (models, lists of them) as the JSON a record validates from."""
    def plain(value: Any) -> Any:  # noqa: ANN401
        if hasattr(value, "model_dump"):
            return value.model_dump(mode="json")
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return {key: plain(value) for key, value in fields.items()}


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write ``folder/manifest.json`` whole: a temporary file beside it, renamed over it."""
    path = folder / MANIFEST
    write_atomically(path, json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return path


def tool_versions() -> dict[str, str]:
    """The versions a new record states: Python and the packages whose output the build holds."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("atedm-export", "torch", "diffusers", "onnx", "onnxruntime", "onnx-graphsurgeon"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions
