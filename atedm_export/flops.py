"""FLOPs per DSAP stage, counted on the real (patched) module rather than from a formula.

The UNet is built on the ``meta`` device, so the full SDXL costs no memory and no compute; torch's
``FlopCounterMode`` records every matmul, convolution and attention the patched forward dispatches.
Figures are per image (one batch item) and per denoising step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from .costmodel import Device, Prediction, predict, record_ops
from .dsap import stage_plan
from .errors import PlanError
from .contract import GraphContract
from .models import attention_blocks, build_unet, unet_config
from .shapes import AttentionBlock
from .pruning import AtedmOptions, PruningOptions, StagePlan, planned
from .spec import GraphSpec
from .userfiles import load_onnx


def count_flops(unet: UNet2DConditionModel, height: int, width: int, text_length: int, plan: StagePlan | None) -> int:
    """FLOPs of one UNet call for one image on a ``meta`` UNet, with ``plan`` applied (None = stock)."""
    contract = GraphContract.from_config(dict(unet.config), 1, height, width, text_length)
    inputs = contract.unet_kwargs(contract.example_feed(device="meta"))
    with planned(unet, plan), FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(**inputs)
    return counter.get_total_flops()


def graph_ops(unet: UNet2DConditionModel, contract: GraphContract, plan: StagePlan | None) -> list:
    """The costed ops (``costmodel.OpCost``) of one call of ``contract``'s graph on a ``meta`` UNet with ``plan``."""
    inputs = contract.unet_kwargs(contract.example_feed(device="meta"))
    with planned(unet, plan):
        return record_ops(lambda: unet(**inputs))


@dataclass(frozen=True)
class DevicePrediction:
    """The cost model's times for one device: the baseline, each stage, and the schedule per image.

    ``stages`` are the exported graphs (the map layer explicit); ``kernel_stages`` the same stages with the
    map layer on its kernels (``map_impl: kernels``, what PyTorch runs on a GPU), empty where the method
    has no map layer (ToMe) or the kernels do not compute the options' map.
    """

    device: Device
    baseline: Prediction
    stages: dict[str, Prediction]
    stage_steps: dict[str, int]
    kernel_stages: dict[str, Prediction] = field(default_factory=dict)

    def speedup(self, stage: str) -> float:
        return self.baseline.seconds / self.stages[stage].seconds

    def kernels_speedup(self, stage: str) -> float:
        return self.baseline.seconds / self.kernel_stages[stage].seconds

    @property
    def schedule_speedup(self) -> float:
        return self._schedule(self.stages)

    @property
    def kernels_schedule_speedup(self) -> float:
        return self._schedule(self.kernel_stages)

    def _schedule(self, stages: dict[str, Prediction]) -> float:
        steps = sum(self.stage_steps.values())
        return self.baseline.seconds * steps / sum(stages[n].seconds * k for n, k in self.stage_steps.items())

    def to_json(self) -> dict:
        d = self.device
        data = {
            "name": d.name, "peak_tflops": d.tflops, "fp32_tflops": d.fp32_tflops, "bandwidth_gbs": d.bandwidth_gbs,
            "launch_us": d.launch_us, "source": d.source,
            "baseline_ms": self.baseline.seconds * 1e3, "baseline_launches": self.baseline.launches,
            "baseline_ms_by_kind": {k: v * 1e3 for k, v in self.baseline.by_kind.items()},
            "stages": [self._stage_json(n) for n in self.stages],
            "predicted_speedup": self.schedule_speedup,
        }
        if self.kernel_stages:
            data["map_impls"] = {"explicit": self.schedule_speedup, "kernels": self.kernels_schedule_speedup}
            data["forms"] = GRAPH_FORMS  # which map_impls figure is each graph form's
        return data

    def _stage_json(self, name: str) -> dict:
        p = self.stages[name]
        data = {"name": name, "ms": p.seconds * 1e3, "predicted_speedup": self.speedup(name),
                "map_share": p.map_share, "map_ms": p.map_seconds * 1e3, "launches": p.launches,
                "ms_by_kind": {k: v * 1e3 for k, v in p.by_kind.items()}}
        if self.kernel_stages:
            kernels = self.kernel_stages[name]
            data["map_impls"] = {"explicit": self.speedup(name), "kernels": self.kernels_speedup(name)}
            data["kernels"] = {"ms": kernels.seconds * 1e3, "map_share": kernels.map_share,
                               "map_ms": kernels.map_seconds * 1e3, "launches": kernels.launches}
        return data


@dataclass(frozen=True)
class StageFlops:
    name: str
    steps: tuple[int, int]  # [first, stop) step indices for the spec's step count
    num_steps: int
    keep: dict[str, int]
    tflops: float
    saving: float


@dataclass(frozen=True)
class FlopsReport:
    spec: str
    model: str
    schedule: str
    height: int
    width: int
    steps: int
    tokens: dict[str, int]
    baseline_tflops: float
    stages: list[StageFlops] = field(default_factory=list)
    batch: int = 1
    precision: str = "fp32"
    predictions: list[DevicePrediction] = field(default_factory=list)
    method: str = "atedm"  # the pruning method (pruning.METHODS)
    map_batch: str | None = None  # AT-EDM: how the portable form's map layer batches its heads (what "explicit" prices)

    @property
    def schedule_tflops(self) -> float:
        """Average TFLOPs per image-step over the whole run (stages weighted by their step counts)."""
        return sum(s.tflops * s.num_steps for s in self.stages) / self.steps

    @property
    def schedule_saving(self) -> float:
        return 1.0 - self.schedule_tflops / self.baseline_tflops

    def to_json(self) -> dict:
        data = asdict(self)
        data["stages"] = [{**asdict(s), "steps": list(s.steps)} for s in self.stages]
        data["predictions"] = {p.device.key: p.to_json() for p in self.predictions}
        data["schedule_tflops"] = self.schedule_tflops
        data["schedule_saving"] = self.schedule_saving
        return data


def spec_blocks(spec: GraphSpec, unet: UNet2DConditionModel) -> list[AttentionBlock]:
    return attention_blocks(unet, spec.height, spec.width)


#: The map layer of each graph form, as the cost model prices it: the portable form's standard ops are the explicit
#: path's (what onnxruntime and today's engines run); the plugin form's atedm nodes are the kernels (``kernels/nodes.py``).
GRAPH_FORMS = {"portable": "explicit", "plugin": "kernels"}


def flops_report(spec: GraphSpec, devices: tuple[Device, ...] = ()) -> FlopsReport:
    """Baseline and per-stage FLOPs of a spec at its resolution and step count, and predicted times on ``devices``.

    Times are for one call at the spec's batch and precision (the graph a build exports).
    """
    unet = build_unet(unet_config(spec.model), device="meta")
    blocks = spec_blocks(spec, unet)
    options = spec.pruning
    baseline = count_flops(unet, spec.height, spec.width, spec.text_length, None) / 1e12
    ranges = spec.dsap.step_ranges(spec.steps)
    stages = []
    for stage, steps in zip(spec.dsap.stages, ranges):
        plan = stage_plan(stage, blocks, options)
        tflops = count_flops(unet, spec.height, spec.width, spec.text_length, plan) / 1e12
        keep = {b.name: plan.keep.get(b.name, b.tokens) for b in blocks}
        stages.append(StageFlops(stage.name, (steps.start, steps.stop), len(steps), keep, tflops, 1 - tflops / baseline))
    return FlopsReport(
        batch=spec.batch,
        precision=spec.precision,
        predictions=_predictions(spec, devices, [s.name for s in stages], [s.num_steps for s in stages]) if devices else [],
        spec=spec.name,
        method=spec.method,
        map_batch=options.map_batch if isinstance(options, AtedmOptions) else None,
        model=spec.model,
        schedule=spec.dsap.name,
        height=spec.height,
        width=spec.width,
        steps=spec.steps,
        tokens={b.name: b.tokens for b in blocks},
        baseline_tflops=baseline,
        stages=stages,
    )


def _predictions(spec: GraphSpec, devices: tuple[Device, ...], names: list[str], steps: list[int]) -> list[DevicePrediction]:
    """Each graph's ops recorded once (at the spec's batch and precision), then priced per device.

    Each AT-EDM stage is recorded twice: as exported (the map layer explicit) and with the map layer on its
    kernels, whose fake implementations run on ``meta`` tensors.
    """
    unet = build_unet(unet_config(spec.model), dtype=spec.dtype, device="meta")
    contract = spec.contract(dict(unet.config))
    blocks = spec_blocks(spec, unet)
    baseline = graph_ops(unet, contract, None)

    def record(options: PruningOptions) -> dict[str, list]:
        return {name: graph_ops(unet, contract, stage_plan(stage, blocks, options))
                for name, stage in zip(names, spec.dsap.stages)}

    explicit, kernels = (with_map_impl(spec.pruning, impl) for impl in ("explicit", "kernels"))
    staged = record(explicit or spec.pruning)
    kernel_staged = record(kernels) if kernels else {}
    return [DevicePrediction(dev, predict(baseline, dev), {n: predict(ops, dev) for n, ops in staged.items()},
                             dict(zip(names, steps)), {n: predict(ops, dev) for n, ops in kernel_staged.items()})
            for dev in devices]


def with_map_impl(options: PruningOptions, impl: str) -> AtedmOptions | None:
    """AT-EDM ``options`` with the map layer run as ``impl``; None for a method without a map layer (ToMe), or
    where the options ask for a map the kernels do not compute (``heads: max``, ``map_pool`` > 1)."""
    if not isinstance(options, AtedmOptions):
        return None
    try:  # validated, not model_copy(update=...): that skips the check that the kernels compute this map
        return AtedmOptions.model_validate({**options.model_dump(), "map_impl": impl})
    except PlanError:
        return None


def graph_flops(path: str, batch: int) -> int:
    """FLOPs per image counted from an ONNX graph: MatMul, Gemm and Conv, from the inferred shapes.

    These are the ops ``FlopCounterMode`` counts too (elementwise work is not counted by either), so
    the figure from the exported graph and from the patched module agree when the export is faithful.
    Only the graph is read, never the weights, so multi-GB graphs are counted in seconds.
    """
    import math

    import onnx

    model = onnx.shape_inference.infer_shapes(load_onnx(Path(path)))
    graph = model.graph
    dims: dict[str, list[int]] = {t.name: list(t.dims) for t in graph.initializer}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        dims[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
    total = 0
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        out = dims.get(node.output[0])
        weight = dims.get(node.input[1])
        if not out or not weight or 0 in out:
            raise ValueError(f"graph {path}: no static shape for {node.op_type} node '{node.name}'")
        if node.op_type == "MatMul":
            inner = dims[node.input[0]][-1]
            total += 2 * math.prod(out) * inner
        elif node.op_type == "Gemm":
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            a = dims[node.input[0]]
            total += 2 * math.prod(out) * (a[0] if trans_a else a[1])
        else:
            total += 2 * math.prod(out) * math.prod(weight[1:])
    return total // batch
