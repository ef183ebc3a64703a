"""onnxruntime's fused form of a finished graph, made by onnxruntime's own transformer optimizer.

The graphs of a build are plain ONNX (what TensorRT parses; its MHA fusion takes their attention as it
is). onnxruntime fuses attention only through its offline optimizer (``onnxruntime.transformers``,
model type ``unet``), which turns each ``explicit_attention`` of the graph into one ``com.microsoft``
kernel: ``Attention`` for a self-attention (its q/k/v weights stacked into one), ``MultiHeadAttention``
for a cross-attention. An attention whose map is read elsewhere (AT-EDM's map layer) does not match the
pattern and stays as it is. The options are the CPU-safe ones (no packed q/k/v or k/v inputs, no NHWC
GroupNorm or BiasSplitGelu: CUDA-only kernels), so one fused graph runs on onnxruntime's CPU and CUDA
providers alike.

The graphs scale ``q`` and ``k`` by ``√s`` before their product, as TensorRT's fusion asks;
onnxruntime's matcher wants ``(q·kᵀ)·s``, so ``scale_after_product`` first moves the two scalars past
the product (the same value, one multiply instead of two). The optimizer runs on the graph's skeleton;
it reads only the attention weights it stacks, from the build's weights file. The stacked weights are new tensors and go into that file once, shared by every
graph of the build (``WeightStore`` deduplicates them); the fused graph no longer reads the separate
q/k/v weights, so a session of it maps about as many weight bytes as one of the plain graph.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx

from .weights import WeightStore

SUFFIX = ".ort.onnx"  # graphs/<name>.onnx → graphs/<name>.ort.onnx
FUSED_OPS = ("Attention", "MultiHeadAttention")


def fusion_options():  # noqa: ANN201 - onnxruntime.transformers.fusion_options.FusionOptions
    """The UNet options of onnxruntime's optimizer that hold on its CPU provider too (module docstring)."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("unet")
    options.enable_packed_qkv = False  # CPU MultiHeadAttention takes no packed q/k/v
    options.enable_packed_kv = False
    options.enable_group_norm = False  # NHWC GroupNorm, BiasSplitGelu, BiasAdd, NhwcConv: CUDA kernels only
    options.enable_skip_group_norm = False
    options.enable_bias_splitgelu = False
    options.enable_bias_add = False
    options.enable_nhwc_conv = False
    options.enable_shape_inference = False  # every shape is already static and annotated
    return options


def fused_path(graph: Path) -> Path:
    return graph.with_name(graph.name.removesuffix(".onnx") + SUFFIX)


@contextlib.contextmanager
def _weights_readable(folder: Path) -> Iterator[None]:
    """The optimizer reads external weights relative to the working directory; run it from the graph's."""
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def fuse(graph: Path, store: WeightStore) -> tuple[Path, dict[str, int]]:
    """Write the fused form of ``graph`` (its weights in ``store``) beside it; return its path and fused op counts."""
    from onnxruntime.transformers import optimizer

    model = onnx.load(str(graph), load_external_data=False)
    scale_after_product(model)
    store.flush()
    quiet = logging.getLogger("onnxruntime.transformers")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        with _weights_readable(graph.parent), open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            fused = optimizer.optimize_model(model, model_type="unet", opt_level=0, use_gpu=False,
                                             optimization_options=fusion_options()).model
    finally:
        quiet.level = level
    del model
    if not any(o.domain == "com.microsoft" for o in fused.opset_import):
        fused.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))  # what the optimizer adds on save
    store.move_initializers(fused, graph.parent)
    out = fused_path(graph)
    onnx.save_model(fused, str(out))
    return out, fused_op_counts(fused)


def fused_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many attentions are fused kernels, and how many ``Softmax`` are left (each a map in memory)."""
    counts = collections.Counter(n.op_type for n in model.graph.node)
    return {op: counts[op] for op in (*FUSED_OPS, "Softmax")}


@dataclass(frozen=True)
class ScaledProduct:
    """``softmax((q·a) @ Transpose(k·b))``: an attention's first product in the form TensorRT fuses."""

    product: onnx.NodeProto  # the MatMul, read by one Softmax only
    softmax: onnx.NodeProto
    transpose: onnx.NodeProto
    scales: tuple[onnx.NodeProto, onnx.NodeProto]  # the Mul of q and of k
    q: str
    k: str
    scale: float  # a·b
    dtype: int


def scaled_products(model: onnx.ModelProto) -> list[ScaledProduct]:
    """Every attention product of ``model`` scaled before it (``explicit_attention``'s form).

    The map layer's products (per-head slices of an already scaled ``q``, their softmax read by a sum
    over heads) do not match: what matches is what a fuser can run without writing a map.
    """
    from onnx import numpy_helper

    nodes = list(model.graph.node)
    producer = {out: node for node in nodes for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in nodes:
        for name in node.input:
            consumers[name].append(node)
    constants = {t.name: t for t in model.graph.initializer}

    def scaled(name: str) -> tuple[onnx.NodeProto, str, float, int] | None:
        """``(Mul node, its other input, the scalar, its data type)`` where ``name`` is a tensor times a constant."""
        node = producer.get(name)
        if node is None or node.op_type != "Mul" or len(consumers[name]) != 1:
            return None
        for mine, other in ((0, 1), (1, 0)):
            tensor = constants.get(node.input[other])
            if tensor is not None and numpy_helper.to_array(tensor).size == 1:
                return node, node.input[mine], float(numpy_helper.to_array(tensor).reshape(())), tensor.data_type
        return None

    found = []
    for node in nodes:
        readers = consumers[node.output[0]] if node.op_type == "MatMul" else []
        if [r.op_type for r in readers] != ["Softmax"] or [r.op_type for r in consumers[readers[0].output[0]]] != ["MatMul"]:
            continue
        transpose = producer.get(node.input[1])
        left = scaled(node.input[0])
        right = scaled(transpose.input[0]) if transpose is not None and transpose.op_type == "Transpose" else None
        if left is not None and right is not None:
            found.append(ScaledProduct(node, readers[0], transpose, (left[0], right[0]), left[1], right[1],
                                       left[2] * right[2], left[3]))
    return found


def scale_after_product(model: onnx.ModelProto) -> int:
    """Rewrite each ``softmax((q·a) @ Transpose(k·b))`` as ``softmax((q @ Transpose(k))·ab)`` in place; how many.

    The same value with one multiply instead of two, in the form onnxruntime's UNet fusion matches.
    """
    products = scaled_products(model)
    after: dict[str, onnx.NodeProto] = {}  # product's output → its new scale node
    dropped: set[str] = set()  # outputs of the scales moved
    for found in products:
        product = found.product.output[0]
        found.product.input[0], found.transpose.input[0] = found.q, found.k
        scaled = f"{product}_scaled"
        scale = onnx.helper.make_tensor(f"{scaled}_by", found.dtype, [], [found.scale])
        model.graph.initializer.append(scale)
        found.softmax.input[0] = scaled
        after[product] = onnx.helper.make_node("Mul", [product, scale.name], [scaled], name=scaled)
        dropped |= {found.scales[0].output[0], found.scales[1].output[0]}
    ordered = []  # each scale right after its product: the graph stays topologically sorted
    for node in model.graph.node:
        if node.output[0] not in dropped:
            ordered += [node, *([after[node.output[0]]] if node.output[0] in after else [])]
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return len(products)
