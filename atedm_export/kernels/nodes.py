"""The map layer's kernels as nodes of a graph: the *plugin form* of a pruned graph.

A pruned graph's portable form (what onnxruntime runs and ``verify`` checks against eager) writes the map layer
as standard ONNX ops in fp32 (``map_batch``: one head at a time, or all in one product). Its plugin form is the
same graph with the map layer as one node per ``torch.ops.atedm`` op, in the ``atedm`` domain: ``AttentionLse``,
``HeadMeanMap``, ``SelectKept`` and ``RecoverySources`` (``GwprStep`` and ``RecoveryMapless`` where the map would
pass ``ops.MAP_BYTES_LIMIT``), with G-WPR's remaining steps as standard ``MatMul``s between them. Each node means
exactly what its op computes, so one kernel source serves PyTorch, the graph and whatever runs the graph's nodes
(onnxruntime through ``onnxruntime_ops.py``; a TensorRT plugin per node, docs/build.md).

Why several nodes and not one: TensorRT's ahead-of-time plugins (``tensorrt.plugin.aot_impl``, TensorRT ≥ 10.9)
embed exactly one compiled kernel per plugin, launched on the plugin's inputs, then scalar arguments, then its
outputs. The map layer is several kernels with a reduction between them, so it is several nodes.

The nodes are written by the dynamo exporter (``torch.onnx.ops.symbolic_multi_out``, which records a node of any
domain with the shapes and dtypes given, from ``outputs.OUTPUTS``); TorchScript tracing has no such op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import ops
from .outputs import OUTPUTS

DOMAIN = "atedm"
VERSION = 1

#: Each op's node type in the ``atedm`` domain.
NODE_TYPES = {
    "attention_lse": "AttentionLse",
    "head_mean_map": "HeadMeanMap",
    "select_kept": "SelectKept",
    "recovery_sources": "RecoverySources",
    "gwpr_step": "GwprStep",
    "recovery_mapless": "RecoveryMapless",
}
assert set(NODE_TYPES) == set(OUTPUTS)

_exporting_plugin_form = False


@contextlib.contextmanager
def plugin_form() -> Iterator[None]:
    """Within the ``with`` body, an ONNX export writes each pruned block's map layer as ``atedm`` nodes."""
    global _exporting_plugin_form
    previous, _exporting_plugin_form = _exporting_plugin_form, True
    try:
        yield
    finally:
        _exporting_plugin_form = previous


def exporting_plugin_form() -> bool:
    """Whether the ONNX export under way writes the plugin form (``plugin_form``)."""
    return _exporting_plugin_form and torch.onnx.is_in_onnx_export()


def attributes(name: str, args: tuple) -> tuple[list[torch.Tensor], dict[str, float | int]]:
    """The op's tensor inputs, in order, and its scalars by their names in the op's schema (the node's attributes)."""
    tensors, attrs = [], {}
    for (argument, kind), value in zip(ops.arguments(name), args, strict=True):
        if kind == "Tensor":
            tensors.append(value)
        else:
            attrs[argument] = value
    return tensors, attrs


class _Launch:
    """``launch.<op>(...)``: ``torch.ops.atedm.<op>(...)``, or in a plugin-form export that op's ``atedm`` node."""

    def __getattr__(self, name: str):  # noqa: ANN204
        op = getattr(torch.ops.atedm, name)

        def call(*args: object) -> torch.Tensor | tuple[torch.Tensor, ...]:
            if not exporting_plugin_form():
                return op(*args)
            return _node(name, args)

        return call


launch = _Launch()


def _node(name: str, args: tuple) -> torch.Tensor | tuple[torch.Tensor, ...]:
    tensors, attrs = attributes(name, args)
    outputs = OUTPUTS[name](*args)
    shapes = [shape for shape, _ in outputs]
    dtypes = [dtype for _, dtype in outputs]
    domain_op = f"{DOMAIN}::{NODE_TYPES[name]}"
    if len(outputs) == 1:
        return torch.onnx.ops.symbolic(domain_op, tensors, attrs, dtype=dtypes[0], shape=shapes[0], version=VERSION)
    return tuple(torch.onnx.ops.symbolic_multi_out(domain_op, tensors, attrs, dtypes=dtypes, shapes=shapes,
                                                   version=VERSION))
