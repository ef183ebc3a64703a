"""The stage engines of one build on one GPU: loading, shared activation memory, weight residency, launches.

This is the part of the engine backend that needs no tensors: memory is addresses (ints) and streams are
handles, so it runs against the conformance spies on a CPU (``tests/test_trt_conformance.py``) exactly as
it runs on a GPU. ``backends.TensorRTBackend`` puts torch tensors, streams and CUDA graphs around it.

Memory, for N stage engines of one model:
- activations: one buffer, the largest engine's requirement, shared by every context (only one stage
  runs at a time), instead of N;
- weights: ``resident`` keeps every engine's weights on the GPU (N copies); ``cycled`` (TensorRT-RTX,
  deferred weight loading) keeps one: before a stage runs, the previous stage's weights are unloaded and
  its own loaded from its plan, mapped from disk. DSAP switches stages a few times per image, so the
  cost is a few host→GPU copies of the weights per image (docs/weights.md has the design and the numbers).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..compile.api import Handle, TensorRTApi
from ..errors import AtedmError
from ..registry import ENGINE_WEIGHTS


class EngineRuntimeError(AtedmError):
    """An engine that does not load, does not match its build, or fails to run."""


@dataclass
class StageEngine:
    key: str  # the plan's path inside the build
    plan: mmap.mmap  # the plan file, mapped read-only: deserialized from, and reloaded from when cycling
    engine: Handle
    context: Handle


class StageEngines:
    """Every engine of a build deserialized once, their contexts on one activation buffer, one stage run at a time."""

    def __init__(self, api: TensorRTApi, folder: Path, plans: dict[str, Path], io_names: list[str],
                 weights: str = "resident", refit_from: dict[str, Path] | None = None) -> None:
        """``plans``: plan key → file; ``refit_from``: plan key → ONNX graph, for weight-stripped plans."""
        if weights not in ENGINE_WEIGHTS:
            raise EngineRuntimeError(f"unknown weights mode '{weights}'; expected one of: {', '.join(ENGINE_WEIGHTS)}")
        if not plans:
            raise EngineRuntimeError(f"no engines to load from {folder}")
        if weights == "cycled" and not api.deferred_weights:
            raise EngineRuntimeError(f"weights 'cycled' needs deferred weight loading, which {api.library} lacks; "
                                     "use 'resident'")
        if weights == "cycled" and refit_from:
            raise EngineRuntimeError("weights 'cycled' reloads weights from the plans, and these plans are "
                                     "weight-stripped; rebuild with --keep-weights or use 'resident'")
        self.api = api
        self.cycled = weights == "cycled"
        self.errors: list[str] = []
        self.logger = api.logger(self.errors.append)
        self.runtime = api.runtime(self.logger, defer_weights=self.cycled)
        self.io_names = io_names
        self.stages = {key: self._load(key, folder / path, (refit_from or {}).get(key)) for key, path in plans.items()}
        self.resident: str | None = None  # cycled: the stage whose weights are on the GPU
        self.activation_bytes = max(api.device_memory_size(s.engine) for s in self.stages.values())

    def _load(self, key: str, path: Path, onnx_path: Path | None) -> StageEngine:
        with path.open("rb") as handle:
            plan = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        engine = self.api.deserialize(self.runtime, plan)
        if engine is None:
            reason = f": {self.errors[-1]}" if self.errors else ""
            raise EngineRuntimeError(f"{key}: the engine does not load on this GPU and library "
                                     f"(corrupt, or built for another){reason}")
        names = self.api.io_names(engine)
        if sorted(names) != sorted(self.io_names):
            raise EngineRuntimeError(f"{key}: engine tensors {', '.join(names)} differ from the build's "
                                     f"{', '.join(self.io_names)}")
        if onnx_path is not None and not self.api.refit_from_onnx(engine, self.logger, str(onnx_path)):
            raise EngineRuntimeError(f"{onnx_path.name}: refitting the weight-stripped engine failed (graph and engine differ?)")
        return StageEngine(key, plan, engine, self.api.context(engine))

    def share_activations(self, address: int, size: int) -> None:
        """Give every context the same activation memory: ``size`` ≥ ``activation_bytes``, at ``address``."""
        if size < self.activation_bytes:
            raise EngineRuntimeError(f"activation buffer of {size} bytes; the engines need {self.activation_bytes}")
        for stage in self.stages.values():
            self.api.set_device_memory(stage.context, address, size)

    def make_resident(self, key: str, synchronize: Callable[[], None]) -> bool:
        """Before ``key`` runs: with cycled weights, swap the GPU's one weight set to it. True when weights moved
        (CUDA graphs captured with the old addresses must be captured again)."""
        if not self.cycled or self.resident == key:
            return False
        synchronize()  # nothing may still run on the weights about to go
        if self.resident is not None and not self.api.unload_weights(self.stages[self.resident].engine):
            raise EngineRuntimeError(f"{self.resident}: unloading its weights failed")
        self.resident = None
        stage = self.stages[key]
        if not self.api.load_weights(stage.engine, stage.plan):
            raise EngineRuntimeError(f"{key}: loading its weights failed{': ' + self.errors[-1] if self.errors else ''}")
        self.resident = key
        return True

    def loaded(self) -> list[str]:
        """The stages whose weights are on the GPU now (every stage, unless cycled)."""
        return [key for key, stage in self.stages.items() if self.api.weights_loaded(stage.engine)]

    def bind(self, key: str, addresses: dict[str, int]) -> None:
        """Point ``key``'s context at the tensors (every input and the output, by name)."""
        context = self.stages[key].context
        for name in self.io_names:
            if not self.api.set_tensor_address(context, name, addresses[name]):
                raise EngineRuntimeError(f"{key}: the engine refused the address of '{name}'")

    def launch(self, key: str, stream: int) -> None:
        """Enqueue ``key`` on ``stream``, bound by ``bind`` and with its weights resident."""
        if self.cycled and self.resident != key:
            raise EngineRuntimeError(f"{key}: its weights are not on the GPU (make_resident first)")
        if not self.api.execute(self.stages[key].context, stream):
            raise EngineRuntimeError(f"{key}: engine execution failed{': ' + self.errors[-1] if self.errors else ''}")

    def refit(self, graphs: dict[str, Path], synchronize: Callable[[], None]) -> None:
        """Replace every engine's weights with those of ``graphs`` (plan key → ONNX graph of another build of the same
        graph: ``StagedUNet.use_weights``), in place: contexts, activation memory and bindings stay as they are.

        The engines must have been built refittable (``EngineInfo.refittable``; the caller checks the manifest, which
        knows what an engine cannot tell: a plan built for identical weights says refittable too).
        """
        if self.cycled:
            raise EngineRuntimeError("weights 'cycled' reload each stage's weights from its plan, which would undo a "
                                     "refit; use 'resident' to switch weights")
        missing = [key for key in self.stages if key not in graphs]
        if missing:
            raise EngineRuntimeError(f"{missing[0]}: no graph to refit its engine from")
        synchronize()  # nothing may still run on the weights about to change
        for key, stage in self.stages.items():
            if not self.api.refittable(stage.engine):
                raise EngineRuntimeError(f"{key}: the engine was built without refit support; rebuild with refittable "
                                         "engines to switch its weights")
            if not self.api.refit_from_onnx(stage.engine, self.logger, str(graphs[key])):
                reason = f": {self.errors[-1]}" if self.errors else ""
                raise EngineRuntimeError(f"{graphs[key].name}: refitting {key} failed (graph and engine differ?){reason}")

    def close(self) -> None:
        """Drop contexts and engines before their plans' mappings close (the library may read the plan until then)."""
        plans = [stage.plan for stage in self.stages.values()]
        self.stages.clear()
        for plan in plans:
            plan.close()
