"""onnxruntime runs a plugin-form graph: each ``atedm`` node through its own ``torch.ops.atedm`` op.

onnxruntime-extensions (``onnx_op``) registers a Python function as a custom op; each node's function hands its
inputs to the op the node stands for, so what runs is the kernel source PyTorch runs (on CPU tensors, in Triton's
interpreter, ``TRITON_INTERPRET=1``). onnxruntime-extensions takes Python ops in its own domain only
(``ai.onnx.contrib``): the session gets a copy of the graph with the ``atedm`` nodes moved there, and the file on
disk keeps its domain, the one a TensorRT plugin is looked up by.

A Python op is registered with fixed input types, once per process; a graph's float inputs are all of one
precision (``contract.py``), so the types are those of the first graph run, and a graph of another precision in
the same process is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from ..errors import AtedmError
from . import ops
from .nodes import DOMAIN, NODE_TYPES
from .outputs import OUTPUTS
from .runnable import require_runnable

EXTENSIONS_DOMAIN = "ai.onnx.contrib"  # the one domain onnxruntime-extensions' Python ops live in

_registered: dict[str, np.dtype] = {}  # precision of the Python ops registered in this process


def session_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose ``atedm`` nodes onnxruntime runs with ``session_options``'s library."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.domain == DOMAIN:
            node.domain = EXTENSIONS_DOMAIN
    for opset in copy.opset_import:
        if opset.domain == DOMAIN:
            opset.domain = EXTENSIONS_DOMAIN
    return copy


def plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The graph's ``atedm`` nodes: none in a portable graph."""
    return [node for node in model.graph.node if node.domain == DOMAIN]


def session_options(precision: np.dtype, folder: Path):  # noqa: ANN201 - onnxruntime.SessionOptions
    """Session options with onnxruntime-extensions' library, every ``atedm`` node registered for ``precision``,
    external weights read from ``folder`` (the graph's own: ``session_model``'s copy goes to onnxruntime as bytes)."""
    import onnxruntime

    require_runnable(torch.device("cpu"))  # onnxruntime runs on the CPU: the kernels in Triton's interpreter
    try:
        from onnxruntime_extensions import get_library_path
    except ImportError:
        raise AtedmError("running a plugin-form graph in onnxruntime needs onnxruntime-extensions "
                         "(pip install 'atedm-export[kernels]')") from None
    _register(np.dtype(precision))
    options = onnxruntime.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    return options


def _register(precision: np.dtype) -> None:
    if precision.name in _registered:
        return
    if _registered:
        raise AtedmError(f"this process runs plugin-form graphs in {next(iter(_registered))}; a {precision.name} "
                         "graph needs a process of its own (onnxruntime-extensions registers a Python op once)")
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    dtype = torch.from_numpy(np.zeros(1, precision)).dtype
    float_types = {torch.float32: PyCustomOpDef.dt_float, torch.float16: PyCustomOpDef.dt_float16}
    if dtype not in float_types:
        raise AtedmError(f"plugin-form graphs run in onnxruntime in fp32 or fp16, not {precision.name}")
    types = {**float_types, torch.int64: PyCustomOpDef.dt_int64}
    for name, node_type in NODE_TYPES.items():
        probes = ops.probe_arguments(name, dtype)
        inputs = [types[probe.dtype] for probe in probes if isinstance(probe, torch.Tensor)]
        outputs = [types[out_dtype] for _, out_dtype in OUTPUTS[name](*probes)]
        attrs = {arg: PyCustomOpDef.dt_float if kind == "float" else PyCustomOpDef.dt_int64
                 for arg, kind in ops.arguments(name) if kind != "Tensor"}
        onnx_op(op_type=node_type, inputs=inputs, outputs=outputs, attrs=attrs)(_runner(name))
    _registered[precision.name] = precision


def _runner(name: str) -> object:
    """The Python op for ``name``'s node: numpy in, ``torch.ops.atedm.<name>``, numpy out."""
    op = getattr(torch.ops.atedm, name)
    listed = ops.arguments(name)

    def run(*inputs: np.ndarray, **attrs: float | int) -> np.ndarray | tuple[np.ndarray, ...]:
        tensors = iter(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs)
        args = [next(tensors) if kind == "Tensor" else (float if kind == "float" else int)(attrs[argument])
                for argument, kind in listed]
        out = op(*args)
        if isinstance(out, torch.Tensor):
            return out.numpy()
        return tuple(t.contiguous().numpy() for t in out)

    run.__name__ = f"atedm_{name}"
    return run
