"""How the served UNet turns requests into static-batch graph calls (pure torch, no Triton needed).

A request carries ``b <= max_batch`` rows (one latent each: a classifier-free-guidance pair is two rows)
and, per row, the denoising step and the run's step count. Its ``sample`` ([b, C, h, w]) picks the build's
shape (``buildfolder.view_for_latent``, the lookup ``StagedUNet`` uses too): the shape of exactly ``b`` rows at that
latent size; where the build has no shape of ``b`` rows there, the shape of the smallest batch above ``b``
at that size, else of the largest (its rows then padded or chunked, as below). A latent size the build lacks
is the manifest's one-line ``ShapeError``, naming the shapes it has. A single-shape build has one shape, so
every request of its latent size runs it, as before.

Each row goes to the graph of the DSAP stage its step falls in (the same ``round(until × n)`` ranges as
``StagedUNet``), at its request's shape. Rows of one graph, from any of the requests Triton batched
together, are cut into chunks of that shape's static batch ``B``; the last chunk is padded by repeating its
last row, and the outputs are scattered back. A request of exactly ``B`` rows in one stage is one graph
call on exactly its own inputs, so it gets what ``StagedUNet`` gives, bit for bit.

A graph is named by its id (``buildfolder.layout.graph_id``): its name (``main``), with its shape's key in a
multi-shape build (``main.192x128-b2``, the stem of its ONNX file), since every shape has a graph of each name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..buildfolder import Manifest, ScheduleError, ShapeError, ShapeView, first_view, view_for_latent

#: What the router takes besides the graph inputs: per row, the step and the run's step count.
STEP_INPUTS = ("step", "num_steps")
#: What it returns besides ``latent``: per row, the index of the stage that ran (in schedule order).
STAGE_OUTPUT = "stage"


#: A row whose step cannot be served: outside the run, or in a stage this build lacks.
RoutingError = ScheduleError


def graph_model_name(router: str, graph: str) -> str:
    """The Triton model that serves one graph (its id, ``ShapeView.graph_id``): named after the router, so deployments
    can sit side by side: ``atedm_unet_main``, or ``atedm_unet_main_1216x832-b2`` in a multi-shape build. The router
    finds its graph models by this name, at its own version."""
    return f"{router}_{graph.replace('.', '_')}"


@dataclass(frozen=True)
class Chunk:
    """One static-batch graph call: which (request, row) fills each of its first ``len(rows)`` rows."""

    graph: str  # the graph's id (ShapeView.graph_id)
    rows: tuple[tuple[int, int], ...]
    batch: int  # the graph's static batch: rows past len(rows) repeat the last one


class Router:
    """Maps a request to the build's shape, (step, step count) to a stage and its graph, and plans the graph calls
    of a batch of requests."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.first = first_view(manifest)  # the only shape of a single-shape build
        self.batch = int(self.first.inputs[0].shape[0])
        self.input_names = self.first.input_names
        self._batches = sorted({shape.batch for shape in manifest.shape_list})
        self._views: dict[tuple[int, int, int], ShapeView] = {}

    def view_for(self, rows: int, height: int, width: int) -> ShapeView:
        """The build's shape that runs a request of ``rows`` latents of ``height`` × ``width`` (latent pixels)."""
        key = (rows, height, width)
        if key not in self._views:
            try:
                view = view_for_latent(self.manifest, rows, height, width)
            except ShapeError as missing:
                view = self._padded(rows, height, width, missing)
            self._views[key] = view
        return self._views[key]

    def _padded(self, rows: int, height: int, width: int, missing: ShapeError) -> ShapeView:
        """No shape of ``rows`` rows at this size: the next larger batch there (padded), else the largest (chunked)."""
        larger = [b for b in self._batches if b > rows]
        smaller = [b for b in reversed(self._batches) if b < rows]
        for batch in (*larger, *smaller):
            try:
                return view_for_latent(self.manifest, batch, height, width)
            except ShapeError:
                continue
        raise missing

    def graph_of(self, stage: str, view: ShapeView | None = None) -> str:
        """The graph (its id) a stage runs at ``view``'s shape (default: the first): a stage that prunes nothing
        reuses the baseline's."""
        view = view or self.first
        built = next(entry for entry in view.stages if entry.name == stage)
        return view.graph_id(built.same_as or stage)

    def route(self, step: int, num_steps: int, view: ShapeView | None = None) -> tuple[int, str]:
        """``(stage index in the schedule, stage name)`` of denoising step ``step`` of ``num_steps``."""
        index, entry = (view or self.first).stage_at(step, num_steps)
        return index, entry.name

    def plan(self, stages: list[list[str]], views: list[ShapeView] | None = None) -> list[Chunk]:
        """Graph calls for requests whose rows run ``stages[request][row]`` at the shape ``views[request]`` (default:
        the first), grouped by graph, each graph's static batch of rows at a time."""
        by_graph: dict[str, list[tuple[int, int]]] = {}
        batch: dict[str, int] = {}
        for request, names in enumerate(stages):
            view = views[request] if views else self.first
            for row, name in enumerate(names):
                graph = self.graph_of(name, view)
                by_graph.setdefault(graph, []).append((request, row))
                batch[graph] = int(view.inputs[0].shape[0])
        return [Chunk(graph, tuple(rows[i:i + batch[graph]]), batch[graph])
                for graph, rows in by_graph.items() for i in range(0, len(rows), batch[graph])]

    def gather(self, chunk: Chunk, feeds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The graph inputs of a chunk, its static batch of rows, padded by repeating the last real row."""
        rows = list(chunk.rows) + [chunk.rows[-1]] * (chunk.batch - len(chunk.rows))
        requests = {request for request, _ in rows}
        if len(requests) == 1 and [row for _, row in rows] == list(range(chunk.batch)) and \
                feeds[rows[0][0]][self.input_names[0]].shape[0] == chunk.batch:
            feed = feeds[rows[0][0]]  # the common case: one whole request, passed through untouched
            return {name: feed[name] for name in self.input_names}
        return {name: torch.stack([feeds[request][name][row] for request, row in rows]) for name in self.input_names}

    def scatter(self, chunk: Chunk, latent: torch.Tensor, outputs: list[torch.Tensor]) -> None:
        """Copy a chunk's output rows back into each request's output (padding rows are dropped)."""
        for i, (request, row) in enumerate(chunk.rows):
            outputs[request][row] = latent[i]
