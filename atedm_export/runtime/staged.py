"""``StagedUNet``: a drop-in for ``pipe.unet`` that runs the right DSAP stage's graph at each step.

It has the call signature and output type of diffusers' ``UNet2DConditionModel`` and the attributes
the family's pipeline reads (``config``, ``dtype``, ``device``; SDXL's ``add_embedding.linear_1.in_features``),
so::

    staged = StagedUNet.load("build/sdxl", backend="tensorrt")
    staged.attach(pipe)            # pipe.unet = staged, and staged follows pipe.scheduler's timesteps
    image = pipe(prompt).images[0]

Each call's timestep is looked up in the scheduler's timesteps to find the step index; the schedule's
step ranges (for the run's step count) give the stage. Custom loops call ``set_timesteps`` instead.

``StagedUNet.load(folder, unpruned=True)`` runs the build's baseline graph at every step instead: the
unpruned model of the same build, on the same backend, for what the pruned images are compared against
(``atedm-export eval``).

A multi-shape build (``shapes:`` in its spec) runs the graphs of the call's own shape, read from ``sample``
(batch, latent height and width); a shape the build lacks is a one-line ``ShapeError`` listing those it has.

Inputs are checked before each call (``Backend.check``): a wrong shape, dtype or device, or a NaN or
infinite value in any floating-point input (``sample`` included), is refused with a one-line
``RuntimeInputError`` naming the input, instead of a NaN latent that would come out as a black image.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from ..contract import precision_of
from ..errors import AtedmError
from ..buildfolder import (Manifest, ScheduleError, ShapeError, ShapeView, check_same_graphs, read_manifest, check_graph_files,
                           check_weights, view_for_latent)
from .backends import Backend, RuntimeInputError, load_backend

__all__ = ["ScheduleError", "ShapeError", "StageStats", "StagedUNet"]


@dataclass
class StageStats:
    calls: int = 0
    seconds: float = 0.0
    steps: list[int] = field(default_factory=list)


class StagedUNet(torch.nn.Module):
    """Runs a build's stage graphs across the denoising loop on one backend (``unpruned``: its baseline graph at
    every step)."""

    def __init__(self, backend: Backend, unpruned: bool = False) -> None:
        super().__init__()
        self.backend = backend
        self.view: ShapeView = backend.view  # the first shape's: what pipelines read (dtype, config, schedule)
        self.unpruned = unpruned
        self.schedule = self.view.graph_spec.dsap
        self.contract = self.view.contract
        self.config = FrozenDict(self.manifest.unet_config)
        if self.contract.family.added_conditioning:
            self.add_embedding = SimpleNamespace(
                linear_1=SimpleNamespace(in_features=self.contract.family.add_embedding_width(self.manifest.unet_config))
            )
        self.encoder_hid_proj = None
        self._scheduler: Any = None
        self._timesteps: torch.Tensor | None = None
        self._order = 1
        self._shapes: dict[tuple[int, int, int], Backend] = {}  # (batch, latent h, latent w) → backend at that shape
        self.stats: dict[str, StageStats] = {name: StageStats() for name in self.graph_names()}

    @classmethod
    def load(cls, folder: str | Path, backend: str = "onnxruntime", device: str | None = None, unpruned: bool = False,
             **options: Any) -> StagedUNet:
        """The build at ``folder`` on ``backend``, with the build files that backend opens checked, and only those:
        a missing engine plan refuses the engine backends, not onnxruntime or eager (``Backend.check_build_files``).
        ``unpruned``: run the baseline graph at every step (the same model, nothing pruned)."""
        return cls(load_backend(backend, folder, None, device, **options), unpruned=unpruned)

    @property
    def manifest(self) -> Manifest:
        """The build's record (every shape's graphs)."""
        return self.view.manifest

    def graph_names(self) -> list[str]:
        """The graphs this UNet can run: the baseline alone when unpruned, else the built stages."""
        return [self.view.baseline.name] if self.unpruned else [s.name for s in self.view.stages]

    # --- what pipelines read -------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return precision_of(self.view.inputs[0].dtype).torch

    @property
    def device(self) -> torch.device:
        return self.backend.device

    # --- step bookkeeping ----------------------------------------------------------------------

    def attach(self, pipe: Any) -> Any:
        """Make this the pipeline's UNet and follow its scheduler's timesteps."""
        pipe.unet = self
        self._scheduler = pipe.scheduler
        return pipe

    def set_timesteps(self, timesteps: Sequence[float] | torch.Tensor, order: int = 1) -> None:
        """For custom loops: the timesteps of the run, in call order (``order`` calls per step)."""
        self._timesteps = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
        self._order = order
        self._check_stages(-(-len(self._timesteps) // order))

    def reset_stats(self) -> None:
        self.stats = {name: StageStats() for name in self.graph_names()}

    def _current_timesteps(self) -> tuple[torch.Tensor, int]:
        if self._scheduler is not None and getattr(self._scheduler, "timesteps", None) is not None:
            return torch.as_tensor(self._scheduler.timesteps, dtype=torch.float64).cpu().flatten(), int(
                getattr(self._scheduler, "order", 1)
            )
        if self._timesteps is not None:
            return self._timesteps, self._order
        raise ScheduleError("StagedUNet does not know the run's timesteps: call attach(pipe) or set_timesteps(...) first")

    def _check_stages(self, num_steps: int) -> None:
        """Refuse a run that needs a stage the build lacks, before its first step (the manifest's lookup); an
        unpruned run needs the baseline alone, which every build has."""
        if num_steps < 1:
            raise ScheduleError(f"a run needs at least 1 step, got {num_steps}")
        if self.unpruned:
            return
        for steps in self.schedule.step_ranges(num_steps):
            if len(steps):
                self.view.stage_at(steps.start, num_steps)

    def locate(self, timestep: torch.Tensor | float) -> tuple[int, int, str]:
        """``(step, num_steps, graph name)`` of a call at ``timestep``: its step's stage (the baseline when unpruned)."""
        timesteps, order = self._current_timesteps()
        value = float(torch.as_tensor(timestep).flatten()[0])
        matches = (timesteps - value).abs() < 1e-3
        if not bool(matches.any()):
            raise ScheduleError(f"timestep {value:g} is not one of the run's {len(timesteps)} timesteps")
        # Order-2 schedulers (Heun) visit t0, t1, t1, t2, t2, …: 2n - 1 timesteps for n steps.
        num_steps = int(getattr(self._scheduler, "num_inference_steps", 0) or 0) or -(-len(timesteps) // order)
        step = min(-(-int(matches.nonzero()[0]) // order), num_steps - 1)
        self._check_stages(num_steps)
        if self.unpruned:
            return step, num_steps, self.view.baseline.name
        return step, num_steps, self.view.stage_at(step, num_steps)[1].name

    # --- shapes ------------------------------------------------------------------------------------

    def backend_for(self, sample: torch.Tensor) -> Backend:
        """The backend at ``sample``'s shape (its batch and latent size): the build's graphs for that shape. A
        single-shape build has one backend, whose input check names the one shape it takes."""
        if not self.manifest.multi_shape:
            return self.backend
        if sample.dim() != 4:
            raise RuntimeInputError(f"input 'sample' has shape {list(sample.shape)}; expected [batch, channels, "
                                    "height, width]")
        batch, _, height, width = sample.shape
        key = (int(batch), int(height), int(width))
        if key not in self._shapes:
            if self.view.shape.latent == key:
                self._shapes[key] = self.backend
            else:
                self._shapes[key] = self.backend.at(view_for_latent(self.manifest, *key))
        return self._shapes[key]

    # --- the UNet call -------------------------------------------------------------------------

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        return_dict: bool = True,
        **unsupported: Any,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """diffusers' UNet call: the stage of this timestep's step runs on the backend, which refuses inputs
        that differ from the build or hold NaN or infinity (``Backend.check``), naming the input."""
        extra = [k for k, v in unsupported.items() if v is not None]
        if timestep_cond is not None or extra:
            raise AtedmError(f"StagedUNet does not take {(['timestep_cond'] if timestep_cond is not None else []) + extra}")
        feed = self.contract.feed_from_call(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        backend = self.backend_for(sample)
        step, num_steps, stage = self.locate(timestep)
        batch = sample.shape[0]
        # Graph backends read the graph inputs only; a served UNet (Triton) routes by these.
        feed["step"] = torch.full((batch,), step, dtype=torch.int32)
        feed["num_steps"] = torch.full((batch,), num_steps, dtype=torch.int32)
        start = time.perf_counter()
        out = backend.run(stage, feed)
        backend.synchronize()
        stats = self.stats[stage]
        stats.calls += 1
        stats.seconds += time.perf_counter() - start
        stats.steps.append(step)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def stage_report(self) -> list[dict]:
        """Which stage ran at which steps, and for how long, since the last ``reset_stats``."""
        rows = []
        for name, s in self.stats.items():
            steps = sorted(set(s.steps))
            span = f"{steps[0]}-{steps[-1]}" if steps else "-"
            rows.append({"stage": name, "steps": span, "calls": s.calls, "seconds": s.seconds})
        return rows

    def use_weights(self, folder: str | Path) -> None:
        """Switch to the weights of another build of the same graphs (``atedm-export refit``: other LoRAs) without
        loading the graphs again: onnxruntime opens new sessions on its graph files as each stage next runs, engines
        are refitted in place (built refittable), the eager backend fuses its LoRAs into a fresh UNet.

        ``folder`` must hold these very graphs (a refit of the same origin), or nothing changes and one line says why;
        its graph and weights files are checked first (a weights file hard-linked from this build is not hashed again).
        """
        folder = Path(folder)
        current = self.backend.folder
        manifest = read_manifest(folder, verify=False)
        check_same_graphs(self.manifest, current, manifest, folder)
        if self.backend.name != "eager":
            check_weights(manifest, folder, linked_from=current)
            for entry in manifest.all_graphs():
                check_graph_files(folder, entry, engine=False)
        self.backend.use_weights(folder, manifest)
        self.view = self.backend.view
        self._shapes.clear()  # the other shapes' views of the backend are made again from it
