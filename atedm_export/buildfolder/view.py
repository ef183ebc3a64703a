"""One shape of a build, frozen: the record, that shape's graphs, its spec and contract.

What runs graphs (the backends, ``StagedUNet``, the router) and what checks or times them (verify, bench, eval)
works on one static shape at a time; it takes a ``ShapeView`` and never a record with a hidden cursor. A
single-shape build has one view, ``first_view(manifest)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..contract import GraphContract
from ..errors import ManifestError, ScheduleError, ShapeError
from ..pruning import StagePlan
from ..shapes import Shape, shape_keys
from ..spec import GraphSpec
from .layout import graph_id, graph_label
from .record import GraphEntry, Manifest, ShapeGraphs, TensorEntry


@dataclass(frozen=True)
class ShapeView:
    """The graphs of one shape of ``manifest`` and what they were exported against."""

    manifest: Manifest
    graphs_at: ShapeGraphs

    @property
    def shape(self) -> Shape:
        return self.graphs_at.shape

    @property
    def tokens(self) -> dict[str, int]:
        return self.graphs_at.tokens

    @property
    def inputs(self) -> list[TensorEntry]:
        return self.graphs_at.inputs

    @property
    def outputs(self) -> list[TensorEntry]:
        return self.graphs_at.outputs

    @property
    def baseline(self) -> GraphEntry:
        return self.graphs_at.baseline

    @property
    def stages(self) -> list[GraphEntry]:
        return self.graphs_at.stages

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_name(self) -> str:
        return self.outputs[0].name

    @functools.cached_property
    def graph_spec(self) -> GraphSpec:
        """The spec at this shape (a single-shape spec)."""
        spec = self.manifest.full_spec
        return spec.at(self.shape) if spec.shapes else spec

    @functools.cached_property
    def contract(self) -> GraphContract:
        """The graphs' I/O contract (what ``inputs`` and ``outputs`` record), with the feeds that go with it."""
        return self.graph_spec.contract(self.manifest.unet_config)

    def graphs(self) -> list[GraphEntry]:
        """This shape's graphs: its baseline, then its stages."""
        return self.graphs_at.graphs()

    def graph(self, name: str) -> GraphEntry:
        for entry in self.graphs():
            if entry.name == name:
                return entry
        raise ManifestError(f"build has no graph '{name}'; it has: {', '.join(g.name for g in self.graphs())}")

    def graph_id(self, name: str) -> str:
        """A graph's id in this build (``layout.graph_id``): file stems and served model names."""
        return graph_id(name, self.shape.key if self.manifest.multi_shape else None)

    def label(self, name: str) -> str:
        """A graph's label in this build (``layout.graph_label``): progress lines, tables, errors."""
        return graph_label(name, self.shape.key if self.manifest.multi_shape else None)

    def stage_at(self, step: int, num_steps: int) -> tuple[int, GraphEntry]:
        """``(index in the schedule, built stage)`` that runs denoising ``step`` of ``num_steps``.

        The one lookup the runtime (``StagedUNet``) and the server (``Router``) share, so a client and
        a server can never read the schedule differently.
        """
        if num_steps < 1 or not 0 <= step < num_steps:
            raise ScheduleError(f"step {step} is outside a run of {num_steps} steps (expected 0 <= step < num_steps)")
        schedule = self.graph_spec.dsap
        index = schedule.stage_index(step, num_steps)
        name = schedule.stages[index].name
        for entry in self.stages:
            if entry.name == name:
                return index, entry
        steps = schedule.step_ranges(num_steps)[index]
        raise ScheduleError(
            f"step {step} of {num_steps} needs stage '{name}' (steps {steps.start}-{steps.stop - 1}), which this "
            f"build does not have; built: {', '.join(e.name for e in self.stages)}"
        )

    def plan(self, entry: GraphEntry) -> StagePlan | None:
        """The stage plan a graph was exported with (None: the stock UNet)."""
        pruned = {b: k for b, k in entry.keep.items() if k < self.tokens[b]}
        if entry.name == "baseline" or not pruned:
            return None
        return StagePlan(pruned, self.graph_spec.pruning, dict(self.tokens))


def views(manifest: Manifest) -> list[ShapeView]:
    """One view per shape, in the build's order."""
    return [ShapeView(manifest, graphs) for graphs in manifest.shapes]


def first_view(manifest: Manifest) -> ShapeView:
    """The view of the build's first (default) shape: a single-shape build's only one."""
    return ShapeView(manifest, manifest.shapes[0])


def view_at(manifest: Manifest, shape: Shape) -> ShapeView:
    """The view of ``shape``; a shape the build lacks is one line listing those it has."""
    for graphs in manifest.shapes:
        if graphs.shape == shape:
            return ShapeView(manifest, graphs)
    raise ShapeError(f"this build has no graphs for {shape} ({shape.key}); it has: {shape_keys(manifest.shape_list)}")


def view_for_latent(manifest: Manifest, batch: int, height: int, width: int) -> ShapeView:
    """The view for a UNet call whose ``sample`` is ``[batch, C, height, width]`` (latent pixels)."""
    for graphs in manifest.shapes:
        if graphs.shape.latent == (batch, height, width):
            return ShapeView(manifest, graphs)
    raise ShapeError(f"no graphs for batch {batch} at {width * 8}x{height * 8} px (latent {width}x{height}); "
                     f"this build has: {shape_keys(manifest.shape_list)}")


def find_view(manifest: Manifest, width: int | None = None, height: int | None = None,
              batch: int | None = None) -> ShapeView:
    """The view of the first shape (in the build's order) with the given width, height and batch (each optional):
    what ``generate --width/--height/--batch`` asks for; none is a one-line ``ShapeError`` listing the shapes."""
    wanted = {"width": width, "height": height, "batch": batch}
    for graphs in manifest.shapes:
        if all(value is None or getattr(graphs, key) == value for key, value in wanted.items()):
            return ShapeView(manifest, graphs)
    asked = " ".join(f"{key} {value}" for key, value in wanted.items() if value is not None)
    raise ShapeError(f"this build has no graphs for {asked}; it has: {shape_keys(manifest.shape_list)} "
                     "(width x height, batch)")
