"""A roofline cost model: predicted time per graph on named GPUs and on this machine, from the ops it runs.

Every op one UNet call dispatches (the real module, patched for a stage, on the ``meta`` device: no
memory, no compute) is recorded with its FLOPs (torch's own formulas, the ones ``FlopCounterMode``
uses) and the bytes it reads and writes (its input and output tensors; views move nothing). An
attention the backends fuse (SDPA in the module, ``explicit_attention`` in the graphs, which TensorRT's
MHA fusion and onnxruntime's optimizer take) is one kernel: its FLOPs, and only ``q``, ``k``, ``v`` and
the output in memory. The map layer's kernels (``torch.ops.atedm.*``, ``map_impl: kernels``) are one op
each, priced by their own formulas (``kernels/costs.py``). The map layer's ops (the first layer's
self-attention that also yields the map, G-WPR, selection, recovery, in either form) are tagged, so its
share of a stage is read off directly.

An op takes ``max(FLOPs / peak FLOP/s, bytes / bandwidth) + launches · launch_us``; a graph the sum of its
ops. The peaks are the vendors' dense fp16 tensor figures and memory bandwidths (``DEVICES``, each with its
source), or for ``cpu`` a GEMM and a memory copy measured here. A matmul on fp32 operands (the explicit map
layer's logits) runs at the fp32 peak, off the tensor cores, as torch runs it by default (TF32 off for
matmuls); convolutions and fused attention keep the tensor peak whatever their dtype. ``launch_us`` is
what a kernel costs beyond its roofline (``GPU_LAUNCH_US``: fitted to one H200 measurement, with its
reasoning). Elementwise ops are counted as separate kernels even where an engine would fuse them into a
neighbour, in the baseline and the stages alike: that is how eager PyTorch runs them, replayed from a CUDA
graph or not, and what the launch cost was fitted on.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from types import CodeType

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from .errors import AtedmError
from .kernels.costs import kernel_cost
from .registry import COST_DEVICES


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    tflops: float  # peak dense fp16 tensor FLOP/s (TFLOP/s); for cpu: measured fp32 GEMM
    bandwidth_gbs: float  # memory bandwidth, GB/s
    source: str
    fp32_tflops: float  # peak fp32 FLOP/s off the tensor cores: what an fp32 matmul gets (torch leaves TF32 off)
    launch_us: float  # what one kernel costs beyond its roofline time (``GPU_LAUNCH_US``), µs


#: What a kernel costs on a GPU beyond ``max(FLOPs / peak, bytes / bandwidth)``, in µs. Under CUDA-graph replay
#: the CPU launches nothing, yet each kernel still pays its launch, its ramp-up and its tail (the last wave of
#: blocks leaving SMs idle), and small kernels never reach the roofline. This one figure stands for all of it, and
#: it is fitted, not measured: on the H200 of 2026-11-30 (docs/benchmarks.md; SDXL 1024², batch 2, fp16,
#: CUDA-graph replay) the stock UNet took 41.6 ms a call, and the roofline prices its 1,994 recorded ops at
#: 18.6 ms: (41.6 − 18.6) ms / 1,994 = 11.5 µs. Fitted on the stock UNet alone, it then predicts AT-EDM's stages,
#: which it never saw: main 61.6 ms (3,048 ops; 64.3 measured), early 53.8 ms (2,672; 55.0 measured). A bare
#: launch under graph replay is 2-4 µs; the rest is the roofline's optimism (GEMMs below the tensor peak, norms
#: and elementwise ops below the bandwidth), charged per kernel rather than per FLOP or byte, which may overcharge
#: a pruned graph's smaller kernels (docs/benchmarks.md). Fitted on the H200 alone, it is used for every GPU.
GPU_LAUNCH_US = 11.5

DEVICES: dict[str, Device] = {d.key: d for d in (
    Device("h100", "H100 SXM", 989.4, 3350.0, "NVIDIA H100 Tensor Core GPU datasheet: FP16 Tensor Core 1,979 TFLOPS with "
           "sparsity (989.4 dense), FP32 67 TFLOPS, GPU memory bandwidth 3.35 TB/s (SXM)", 67.0, GPU_LAUNCH_US),
    Device("h200", "H200 SXM", 989.4, 4800.0, "NVIDIA H200 Tensor Core GPU datasheet: FP16 Tensor Core 1,979 TFLOPS with "
           "sparsity (989.4 dense), FP32 67 TFLOPS, GPU memory bandwidth 4.8 TB/s", 67.0, GPU_LAUNCH_US),
    Device("a100", "A100 80GB SXM", 312.0, 2039.0, "NVIDIA A100 Tensor Core GPU datasheet: FP16 Tensor Core 312 TFLOPS "
           "(624 with sparsity), FP32 19.5 TFLOPS, 80GB SXM memory bandwidth 2,039 GB/s", 19.5, GPU_LAUNCH_US),
    Device("l40s", "L40S", 362.05, 864.0, "NVIDIA L40S datasheet: FP16 Tensor Core 362.05 TFLOPS (733 with sparsity), "
           "FP32 91.6 TFLOPS, memory bandwidth 864 GB/s", 91.6, GPU_LAUNCH_US),
    Device("rtx4090", "GeForce RTX 4090", 165.2, 1008.0, "NVIDIA Ada Lovelace architecture whitepaper, RTX 4090: peak FP16 "
           "Tensor TFLOPS with FP32 accumulate 165.2 (330.4 with sparsity), peak FP32 TFLOPS 82.6; memory bandwidth "
           "1,008 GB/s", 82.6, GPU_LAUNCH_US),
)}


def measure_this_machine(seconds: float = 0.5) -> Device:
    """``cpu``: the peaks of this machine, by an fp32 GEMM (2048²) and a 256 MB copy, best of a few runs.

    Its per-op cost is the time of a one-element add: on a CPU an op's launch is its dispatch.
    """
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    src, dst = torch.empty(64 << 20), torch.empty(64 << 20)  # 256 MB each
    gemm, copy = _best(lambda: a @ b, seconds), _best(lambda: dst.copy_(src), seconds)
    one = torch.ones(1)
    launch = _best(lambda: torch.add(one, one, out=dst[:1]), seconds / 10)
    tflops = 2 * 2048**3 / gemm / 1e12
    return Device("cpu", "this machine (CPU, measured)", tflops, 2 * src.nbytes / copy / 1e9,
                  f"measured here: fp32 GEMM 2048x2048 in {gemm * 1e3:.1f} ms, 256 MB copy in {copy * 1e3:.1f} ms, "
                  f"a one-element add in {launch * 1e6:.1f} µs", tflops, launch * 1e6)


def _best(call, budget: float) -> float:  # noqa: ANN001
    call()
    best, spent = float("inf"), 0.0
    while spent < budget or best == float("inf"):
        tick = time.perf_counter()
        call()
        took = time.perf_counter() - tick
        best, spent = min(best, took), spent + took
    return best


def device(name: str) -> Device:
    """A device of ``registry.COST_DEVICES`` by name (``cpu`` is measured now)."""
    key = _squeezed(name)
    if key == "cpu":
        return measure_this_machine()
    if key not in DEVICES:
        raise AtedmError(f"unknown device '{name}'; expected one of: {', '.join(COST_DEVICES)}")
    return DEVICES[key]


def entry_for(gpu: str) -> str | None:
    """The key of ``DEVICES`` that a GPU's name stands for, as torch names it ("NVIDIA H100 80GB HBM3") or as a
    prediction names its device ("H200 SXM"); None for a GPU the model has no entry for."""
    squeezed = _squeezed(gpu)
    return next((key for key in DEVICES if key in squeezed), None)


def _squeezed(name: str) -> str:
    """A device's name as the keys of ``DEVICES`` spell it: lower case, no spaces or dashes."""
    return name.lower().replace(" ", "").replace("-", "")


@dataclass(frozen=True)
class OpCost:
    op: str
    kind: str  # matmul | conv | attention (one fused kernel) | memory
    flops: int
    bytes: int
    map_layer: bool
    fp32: bool = False  # a matmul on fp32 operands: no tensor cores (torch leaves TF32 off for matmuls)
    launches: int = 1  # kernels the op launches

    def seconds(self, dev: Device) -> float:
        """``max(FLOPs / peak, bytes / bandwidth)`` plus ``launch_us`` per kernel: the module docstring's roofline."""
        peak = dev.fp32_tflops if self.fp32 else dev.tflops
        roofline = max(self.flops / (peak * 1e12), self.bytes / (dev.bandwidth_gbs * 1e9))
        return roofline + self.launches * dev.launch_us * 1e-6


def _map_layer_code() -> frozenset[CodeType]:
    """The functions whose work is the map layer's: what only a pruned block pays for.

    Both forms of it: the explicit one and the kernels' (``map_impl``), whose self-attention with its
    projections is ``attention_with_map_kernels`` (and G-WPR ``mapless_gwpr_scores`` where no map is written);
    the ``atedm`` ops themselves are map layer wherever called.
    """
    from .pruning import atedm, gwpr, recover, select
    from .pruning.attention import attention_with_map, attention_with_map_kernels

    functions = (attention_with_map, attention_with_map_kernels, gwpr.gwpr_scores, gwpr.cross_gwpr_scores,
                 gwpr.mapless_gwpr_scores, select.select_tokens, recover.recovery_sources, atedm.select)
    return frozenset(f.__code__ for f in functions)


MAP_DEPTH = 12  # an op of the map layer runs within this many Python frames of one of its functions


def _in_map_layer(codes: frozenset[CodeType]) -> bool:
    """Whether the op being recorded was called (through at most ``MAP_DEPTH`` frames) by a map-layer function."""
    frame = sys._getframe(2)
    for _ in range(MAP_DEPTH):
        if frame is None:
            return False
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def _nbytes(values: object) -> int:
    leaves, _ = tree_flatten(values)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


_NO_KERNEL = frozenset({"_unsafe_view", "detach", "lift_fresh"})  # views in all but name: no data moves


def _fp32_operands(values: object) -> bool:
    leaves, _ = tree_flatten(values)
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in leaves)


class _Recorder(TorchDispatchMode):
    """Every aten op: FLOPs by torch's formulas, bytes of its tensors; SDPA arrives whole from ``_Fused``.

    An ``atedm`` op (the map layer's kernels) is priced by its formula in ``kernels/costs.py``: its tensors
    are not what its kernel reads, and torch has no FLOP formula for it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[OpCost] = []
        self.codes = _map_layer_code()
        self.inside_fused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside_fused or func.is_view or func._overloadpacket.__name__ in _NO_KERNEL:
            return out
        if func.namespace == "atedm":
            self.ops.append(_kernel_op(func, args, kwargs, out))
        else:
            self.ops.append(_aten_op(func, args, kwargs, out, _in_map_layer(self.codes)))
        return out


def _aten_op(func, args: tuple, kwargs: dict, out: object, map_layer: bool) -> OpCost:  # noqa: ANN001
    packet = func._overloadpacket
    flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
    kind = "conv" if "conv" in packet.__name__ else "matmul" if flops else "memory"
    return OpCost(packet.__name__, kind, int(flops), _nbytes((args, kwargs)) + _nbytes(out), map_layer,
                  kind == "matmul" and _fp32_operands((args, kwargs)))


def _kernel_op(func, args: tuple, kwargs: dict, out: object) -> OpCost:  # noqa: ANN001
    """One of the map layer's kernels (``torch.ops.atedm.*``), map layer by definition."""
    name = func._overloadpacket.__name__
    cost = kernel_cost(name, args, kwargs, out)
    return OpCost(name, cost.kind, cost.flops, cost.bytes, True, cost.fp32, cost.launches)


class _Fused(TorchFunctionMode):
    """``scaled_dot_product_attention`` as one kernel: ``4·B·H·N·M·d`` FLOPs, q, k, v and the output in memory."""

    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        query, key = args[0], args[1]
        self.recorder.inside_fused = True
        try:
            out = func(*args, **kwargs)
        finally:
            self.recorder.inside_fused = False
        *lead, tokens, dim = query.shape
        flops = 4 * int(torch.Size(lead).numel()) * tokens * key.shape[-2] * dim
        self.recorder.ops.append(OpCost("attention", "attention", flops, _nbytes(args[:3]) + _nbytes(out),
                                        _in_map_layer(self.recorder.codes)))
        return out


def record_ops(call) -> list[OpCost]:  # noqa: ANN001
    """The ops ``call()`` runs, with their costs (run it on ``meta`` tensors: nothing is computed)."""
    recorder = _Recorder()
    with _Fused(recorder), recorder, torch.no_grad():
        call()
    return recorder.ops


@dataclass(frozen=True)
class Prediction:
    """One graph on one device."""

    seconds: float
    map_seconds: float
    flops: int
    bytes: int
    by_kind: dict[str, float] = field(default_factory=dict)  # seconds per op kind
    launches: int = 0  # kernels launched, each charged the device's launch_us

    @property
    def map_share(self) -> float:
        return self.map_seconds / self.seconds


def predict(ops: list[OpCost], dev: Device) -> Prediction:
    by_kind: dict[str, float] = {}
    for op in ops:
        by_kind[op.kind] = by_kind.get(op.kind, 0.0) + op.seconds(dev)
    return Prediction(sum(by_kind.values()), sum(op.seconds(dev) for op in ops if op.map_layer),
                      sum(op.flops for op in ops), sum(op.bytes for op in ops), by_kind, sum(op.launches for op in ops))
