"""Which builds one eval can compare, the label each one's images go under, and what identifies each image set.

An eval compares image sets pixel by pixel, so every build must draw the same picture space: one model (the
spec's model and seed, and the fingerprint of the pipeline it was built from), one size, batch and precision.
The unpruned images come from the first build's baseline graph; any build of the same model has the same one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from ..contract import SDXL_REFINER
from ..errors import AtedmError
from ..buildfolder import ShapeView, check_same_model, first_view, manifest_sha256, read_manifest
from ..userfiles import check_distinct

#: The label of the unpruned image set; builds never take it.
UNPRUNED = "unpruned"


@dataclass(frozen=True)
class BuildInfo:
    """One build as the eval sees it: where it is, its checked manifest (the view of its first shape, the one eval
    draws at), its label and its identity."""

    folder: Path
    view: ShapeView
    label: str
    identity: str  # sha256 of manifest.json: another build in the same folder draws other images


def baseline_identity(view: ShapeView) -> str:
    """What identifies the unpruned images: the baseline graph's files (and the weights they point into), so
    they are reused across evals of any build of the same model whose baseline is byte for byte the same."""
    base = view.baseline
    parts = [*(f.sha256 for f in view.manifest.weight_files), base.onnx.sha256,
             *(f.sha256 for f in (base.ort_onnx, base.engine) if f)]
    return "baseline:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _label(folder: Path) -> str:
    """A folder-safe label from the build folder's name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", folder.resolve().name).strip("-.") or "build"


def labels_for(folders: list[Path]) -> list[str]:
    """One label per build, from its folder's name; repeats get ``-2``, ``-3``, and none is ``unpruned``."""
    labels: list[str] = []
    for folder in folders:
        base = _label(folder)
        label, n = base, 1
        while label in labels or label == UNPRUNED:
            n += 1
            label = f"{base}-{n}"
        labels.append(label)
    return labels


def load_builds(folders: list[Path]) -> list[BuildInfo]:
    """Each build's manifest (format and consistency checked), refused where the eval cannot compare them."""
    check_distinct(folders)
    manifests = [read_manifest(folder, verify=False) for folder in folders]
    for folder, manifest in zip(folders, manifests):
        if first_view(manifest).contract.family is SDXL_REFINER:
            raise AtedmError(f"build {folder} is the SDXL refiner, which refines images rather than drawing from text; "
                             "eval compares text-to-image builds")
    check_same_model(folders, [first_view(m) for m in manifests], "eval")
    return [BuildInfo(folder, first_view(manifest), label, manifest_sha256(folder))
            for folder, manifest, label in zip(folders, manifests, labels_for(folders))]


def common_steps(builds: list[BuildInfo], steps: int | None) -> int:
    """The step count every image is drawn with: ``--steps``, else the builds' specs' where they agree."""
    if steps:
        return steps
    counts = sorted({b.view.graph_spec.steps for b in builds})
    if len(counts) > 1:
        raise AtedmError(f"the builds' specs differ in steps ({', '.join(map(str, counts))}); pass --steps N so every "
                         "image is drawn with the same steps")
    return counts[0]
