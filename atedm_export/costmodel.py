"""A roofline cost model: predicted time per graph on named GPUs and on this machine, from the ops it runs.

Every op one UNet call dispatches (the real module, patched for a stage, on the ``meta`` device: no
memory, no compute) is recorded with its FLOPs (torch's own formulas, the ones ``FlopCounterMode``
uses) and the bytes it reads and writes (its input and output tensors; views move nothing). An
attention the backends fuse (SDPA in the module, ``explicit_attention`` in the graphs, which TensorRT's
MHA fusion and onnxruntime's optimizer take) is one kernel: its FLOPs, and only ``q``, ``k``, ``v`` and
the output in memory. The map layer's ops (the first layer's self-attention that also yields the map,
G-WPR, selection, recovery) are tagged, so its share of a stage is read off directly.

An op takes ``max(FLOPs / peak FLOP/s, bytes / bandwidth)``; a graph the sum of its ops. The peaks are
the vendors' dense fp16 tensor figures and memory bandwidths (``DEVICES``, each with its source), or for
``cpu`` a GEMM and a memory copy measured here. Elementwise ops are counted as separate kernels even
where an engine would fuse them into a neighbour, in the baseline and the stages alike, so absolute
times are upper bounds and the ratios are what the model is for.
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
from .registry import COST_DEVICES


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    tflops: float  # peak dense fp16 tensor FLOP/s (TFLOP/s); for cpu: measured fp32 GEMM
    bandwidth_gbs: float  # memory bandwidth, GB/s
    source: str


DEVICES: dict[str, Device] = {d.key: d for d in (
    Device("h100", "H100 SXM", 989.4, 3350.0, "NVIDIA H100 Tensor Core GPU datasheet: FP16 Tensor Core 1,979 TFLOPS with "
           "sparsity (989.4 dense), GPU memory bandwidth 3.35 TB/s (SXM)"),
    Device("h200", "H200 SXM", 989.4, 4800.0, "NVIDIA H200 Tensor Core GPU datasheet: FP16 Tensor Core 1,979 TFLOPS with "
           "sparsity (989.4 dense), GPU memory bandwidth 4.8 TB/s"),
    Device("a100", "A100 80GB SXM", 312.0, 2039.0, "NVIDIA A100 Tensor Core GPU datasheet: FP16 Tensor Core 312 TFLOPS "
           "(624 with sparsity), 80GB SXM memory bandwidth 2,039 GB/s"),
    Device("l40s", "L40S", 362.05, 864.0, "NVIDIA L40S datasheet: FP16 Tensor Core 362.05 TFLOPS (733 with sparsity), "
           "memory bandwidth 864 GB/s"),
    Device("rtx4090", "GeForce RTX 4090", 165.2, 1008.0, "NVIDIA Ada Lovelace architecture whitepaper, RTX 4090: peak FP16 "
           "Tensor TFLOPS with FP32 accumulate 165.2 (330.4 with sparsity); memory bandwidth 1,008 GB/s"),
)}


def measure_this_machine(seconds: float = 0.5) -> Device:
    """``cpu``: the peaks of this machine, by an fp32 GEMM (2048²) and a 256 MB copy, best of a few runs."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    src, dst = torch.empty(64 << 20), torch.empty(64 << 20)  # 256 MB each
    gemm, copy = _best(lambda: a @ b, seconds), _best(lambda: dst.copy_(src), seconds)
    return Device("cpu", "this machine (CPU, measured)", 2 * 2048**3 / gemm / 1e12, 2 * src.nbytes / copy / 1e9,
                  f"measured here: fp32 GEMM 2048x2048 in {gemm * 1e3:.1f} ms, 256 MB copy in {copy * 1e3:.1f} ms")


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
    key = name.lower().replace(" ", "").replace("-", "")
    if key == "cpu":
        return measure_this_machine()
    if key not in DEVICES:
        raise AtedmError(f"unknown device '{name}'; expected one of: {', '.join(COST_DEVICES)}")
    return DEVICES[key]


@dataclass(frozen=True)
class OpCost:
    op: str
    kind: str  # matmul | conv | attention (one fused kernel) | memory
    flops: int
    bytes: int
    map_layer: bool

    def seconds(self, dev: Device) -> float:
        return max(self.flops / (dev.tflops * 1e12), self.bytes / (dev.bandwidth_gbs * 1e9))


def _map_layer_code() -> frozenset[CodeType]:
    """The functions whose work is the map layer's: what only a pruned block pays for."""
    from .pruning import gwpr, recover, select
    from .pruning.attention import attention_with_map

    functions = (attention_with_map, gwpr.gwpr_scores, gwpr.cross_gwpr_scores, select.select_tokens,
                 recover.recovery_sources)
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


class _Recorder(TorchDispatchMode):
    """Every aten op: FLOPs by torch's formulas, bytes of its tensors; SDPA arrives whole from ``_Fused``."""

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
        packet = func._overloadpacket
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        kind = "conv" if "conv" in packet.__name__ else "matmul" if flops else "memory"
        self.ops.append(OpCost(packet.__name__, kind, int(flops), _nbytes((args, kwargs)) + _nbytes(out),
                               _in_map_layer(self.codes)))
        return out


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

    @property
    def map_share(self) -> float:
        return self.map_seconds / self.seconds


def predict(ops: list[OpCost], dev: Device) -> Prediction:
    by_kind: dict[str, float] = {}
    for op in ops:
        by_kind[op.kind] = by_kind.get(op.kind, 0.0) + op.seconds(dev)
    return Prediction(sum(by_kind.values()), sum(op.seconds(dev) for op in ops if op.map_layer),
                      sum(op.flops for op in ops), sum(op.bytes for op in ops), by_kind)
