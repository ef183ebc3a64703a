"""Which builds may stand beside each other: the same model (to compare) or the same graphs (to switch weights).

``eval`` and ``bench`` compare builds of one model at one size; ``StagedUNet.use_weights`` swaps in a refit
build's weights, which only works for the very graphs they were refitted for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import AtedmError, ManifestError
from .checksums import manifest_sha256
from .record import Manifest
from .view import ShapeView


def model_fingerprint(view: ShapeView) -> dict[str, Any]:
    """What must agree between builds whose outputs are compared (``eval``'s images, ``bench``'s side by side):
    the model (the spec's, with the seed built-in weights are drawn with, and where the build recorded the
    pipeline it came from, every file's sha256: two folders of one name can hold other weights), size, batch
    and precision, at the shape ``view`` reads."""
    manifest, spec = view.manifest, view.graph_spec
    pipeline = sorted((f.path, f.sha256) for f in manifest.pipeline.files) if manifest.pipeline else None
    return {"model": spec.model, "weights seed": spec.seed, "pipeline files": pipeline,
            "loras": [(lora.sha256, lora.scale) for lora in manifest.loras], "height": spec.height,
            "width": spec.width, "batch": spec.batch, "precision": spec.precision}


def check_same_model(folders: list[Path], shapes: list[ShapeView], command: str) -> None:
    """Refuse builds ``command`` cannot compare at the shapes it runs (``model_fingerprint``), naming the first field
    that differs."""
    first = model_fingerprint(shapes[0])
    for folder, view in zip(folders[1:], shapes[1:]):
        other = model_fingerprint(view)
        for key, value in first.items():
            if other[key] != value:
                raise AtedmError(f"builds {folders[0]} and {folder} differ in {key} ({_shown(key, value)} vs "
                                 f"{_shown(key, other[key])}); {command} compares builds of one model at one size, "
                                 "batch and precision")


def _shown(key: str, value: Any) -> str:  # noqa: ANN401
    """A fingerprint field in a message: the pipeline's file list is too long to print."""
    if key == "pipeline files":
        return "a pipeline folder's files" if value else "no pipeline folder"
    if key == "loras":
        return "LoRAs " + ", ".join(f"{sha[:12]}… ×{scale:g}" for sha, scale in value) if value else "no LoRA"
    return str(value)


def origin(manifest: Manifest, folder: Path) -> str:
    """The sha256 of the manifest of the build that exported these graphs: this build's own, or for a refit
    build the one it was refitted from (through any chain of refits). Two builds of one origin run the same
    graphs with their own weights (``StagedUNet.use_weights``)."""
    return manifest.refit.origin_sha256 if manifest.refit else manifest_sha256(folder)


def check_same_graphs(manifest: Manifest, folder: Path, other: Manifest, other_folder: Path) -> None:
    """Refuse ``other`` unless it holds these very graphs (a refit of one origin) at every shape and stage."""
    if origin(other, other_folder) != origin(manifest, folder):
        raise ManifestError(f"{other_folder} does not hold the graphs of {folder} (it is not a refit of the same "
                            "build); switching weights needs the same graphs: use atedm-export refit")
    mine = [(s.shape, [g.name for g in s.graphs()]) for s in manifest.shapes]
    theirs = [(s.shape, [g.name for g in s.graphs()]) for s in other.shapes]
    if mine != theirs:
        raise ManifestError(f"{other_folder} has other shapes or stages than {folder}; switching weights needs "
                            "the same graphs")
