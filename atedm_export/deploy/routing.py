"""How the served UNet turns requests into static-batch graph calls (pure torch, no Triton needed).

A request carries ``b <= max_batch`` rows (one latent each: a classifier-free-guidance pair is two rows)
and, per row, the denoising step and the run's step count. Each row goes to the graph of the DSAP stage
its step falls in (the same ``round(until × n)`` ranges as ``StagedUNet``). Rows of one graph, from any
of the requests Triton batched together, are cut into chunks of the build's static batch ``B``; the last
chunk is padded by repeating its last row, and the outputs are scattered back. A request of exactly
``B`` rows in one stage is one graph call on exactly its own inputs, so it gets what ``StagedUNet``
gives, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..manifest import Manifest, ScheduleError

#: What the router takes besides the graph inputs: per row, the step and the run's step count.
STEP_INPUTS = ("step", "num_steps")
#: What it returns besides ``latent``: per row, the index of the stage that ran (in schedule order).
STAGE_OUTPUT = "stage"


#: A row whose step cannot be served: outside the run, or in a stage this build lacks.
RoutingError = ScheduleError


@dataclass(frozen=True)
class Chunk:
    """One static-batch graph call: which (request, row) fills each of its first ``len(rows)`` rows."""

    graph: str
    rows: tuple[tuple[int, int], ...]


class Router:
    """Maps (step, step count) to a stage and its graph, and plans the graph calls of a batch of requests."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.batch = int(manifest.inputs[0].shape[0])
        self.built = {entry.name: entry for entry in manifest.stages}
        self.input_names = manifest.input_names

    def graph_of(self, stage: str) -> str:
        """The graph a stage runs: a stage that prunes nothing reuses the baseline's."""
        return self.built[stage].same_as or stage

    def route(self, step: int, num_steps: int) -> tuple[int, str]:
        """``(stage index in the schedule, stage name)`` of denoising step ``step`` of ``num_steps``."""
        index, entry = self.manifest.stage_at(step, num_steps)
        return index, entry.name

    def plan(self, stages: list[list[str]]) -> list[Chunk]:
        """Graph calls for requests whose rows run ``stages[request][row]``, grouped by graph, ``batch`` rows each."""
        by_graph: dict[str, list[tuple[int, int]]] = {}
        for request, names in enumerate(stages):
            for row, name in enumerate(names):
                by_graph.setdefault(self.graph_of(name), []).append((request, row))
        return [Chunk(graph, tuple(rows[i:i + self.batch]))
                for graph, rows in by_graph.items() for i in range(0, len(rows), self.batch)]

    def gather(self, chunk: Chunk, feeds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The graph inputs of a chunk, ``batch`` rows each, padded by repeating the last real row."""
        rows = list(chunk.rows) + [chunk.rows[-1]] * (self.batch - len(chunk.rows))
        requests = {request for request, _ in rows}
        if len(requests) == 1 and [row for _, row in rows] == list(range(self.batch)):
            feed = feeds[rows[0][0]]  # the common case: one whole request, passed through untouched
            return {name: feed[name] for name in self.input_names}
        return {name: torch.stack([feeds[request][name][row] for request, row in rows]) for name in self.input_names}

    def scatter(self, chunk: Chunk, latent: torch.Tensor, outputs: list[torch.Tensor]) -> None:
        """Copy a chunk's output rows back into each request's output (padding rows are dropped)."""
        for i, (request, row) in enumerate(chunk.rows):
            outputs[request][row] = latent[i]
