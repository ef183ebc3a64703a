"""What a manifest says against what its spec implies: a hand-edited field is named when the build loads.

A manifest edited by hand (another height in its spec, stages whose steps overlap, a LoRA list changed) would
otherwise load and mislead later: a runtime feeding graphs the wrong shapes, ``inspect`` summing steps twice.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import AtedmError, ManifestError
from ..shapes import shape_keys
from .layout import MANIFEST
from .record import Manifest, TensorEntry
from .view import ShapeView, views


def check_consistent(manifest: Manifest, source: Path | str = MANIFEST) -> None:
    """Every shape, LoRA and stage against the spec, or one line naming the field that disagrees."""
    try:
        listed = manifest.full_spec.shape_list
    except AtedmError as exc:
        raise ManifestError(f"{source}: spec: {exc}") from None
    if list(listed) != manifest.shape_list:
        raise ManifestError(f"{source}: shapes: {shape_keys(manifest.shape_list)} are recorded, but its spec lists "
                            f"{shape_keys(listed)}")
    _check_loras(manifest, source)
    for view in views(manifest):
        _check_shape(view, source)


def _check_loras(manifest: Manifest, source: Path | str) -> None:
    """The LoRAs fused into the weights are the ones its spec lists (refits append theirs to both), each at the
    spec's scale, which the spec bounds: an edit to either list, or a scale out of bounds, is refused."""
    def shown(items: list[tuple[Path, float]]) -> str:
        return ", ".join(f"{path.name} ×{scale:g}" for path, scale in items) or "none"

    listed = [(Path(item.file).resolve(), item.scale) for item in manifest.full_spec.loras]
    recorded = [(Path(entry.file).resolve(), entry.scale) for entry in manifest.loras]
    if listed != recorded:
        raise ManifestError(f"{source}: loras: {shown(recorded)} are recorded, but its spec lists {shown(listed)}")


def _tensor(entry: TensorEntry | None) -> str:
    return "nothing" if entry is None else f"'{entry.name}' {entry.shape} {entry.dtype}"


def _check_shape(view: ShapeView, source: Path | str) -> None:
    """One shape's I/O, keep counts and stages against what its spec implies."""
    try:
        spec = view.graph_spec
        contract = view.contract
    except AtedmError as exc:
        raise ManifestError(f"{source}: spec: {exc}") from None
    if view.manifest.multi_shape:
        source = f"{source}: shape {view.shape.key}"
    for field, recorded, implied in (("inputs", view.inputs, contract.inputs), ("outputs", view.outputs, contract.outputs)):
        implied_entries = [TensorEntry.of(t) for t in implied]
        if list(recorded) != implied_entries:
            wrong = next((r, i) for r, i in zip([*recorded, None], [*implied_entries, None]) if r != i)
            raise ManifestError(f"{source}: {field}: {_tensor(wrong[0])} is recorded, but its spec ({spec.width}x"
                                f"{spec.height}, batch {spec.batch}, {spec.precision}) implies {_tensor(wrong[1])}")
    for entry in view.graphs():
        if set(entry.keep) != set(view.tokens) or any(entry.keep[b] > n or entry.keep[b] < 1 for b, n in view.tokens.items()):
            raise ManifestError(f"{source}: {entry.name}: keep counts must name every block of 'tokens' with 1 to "
                                "its token count")
    if view.baseline.keep != view.tokens or view.baseline.steps != [0, spec.steps]:
        raise ManifestError(f"{source}: baseline: must keep every token over steps [0, {spec.steps}]")
    _check_stages(view, source)


def _check_stages(view: ShapeView, source: Path | str) -> None:
    """Each stage is its schedule's, in its order, over the steps the schedule gives it: the stages tile the run."""
    schedule = view.graph_spec.dsap
    ranges = dict(zip((s.name for s in schedule.stages), schedule.step_ranges(view.graph_spec.steps)))
    until = {s.name: s.until for s in schedule.stages}
    names = [e.name for e in view.stages]
    if len(set(names)) != len(names) or any(n not in ranges for n in names) or \
            names != [n for n in ranges if n in names]:
        raise ManifestError(f"{source}: stages: {names} are not stages of its schedule in order "
                            f"({', '.join(ranges)})")
    for entry in view.stages:
        expected = ranges[entry.name]
        if entry.steps != [expected.start, expected.stop] or entry.until != until[entry.name]:
            raise ManifestError(f"{source}: stage '{entry.name}': steps {entry.steps} (until {entry.until}) are "
                                f"recorded, but its schedule gives [{expected.start}, {expected.stop}) "
                                f"(until {until[entry.name]}) of {view.graph_spec.steps}")
    if view.manifest.complete and len(names) != len(ranges):
        raise ManifestError(f"{source}: complete: the build says every stage was built, but it has "
                            f"{', '.join(names)} of {', '.join(ranges)}")
