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

How those options lay a self-attention's q/k/v weights out in the one tensor is stated here too
(``packed_qkv``): refit finds and rewrites the stacks by it, so the options and the layout change together.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .errors import RefitError
from .weights import KEY_BYTES, Region, RegionKey, StoredWeights, WeightStore, tensor_bytes, where

if TYPE_CHECKING:
    import torch

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


# --- the packed q/k/v weight: the layout fusion_options() makes onnxruntime write ------------------------------


def qkv_names(attention: str) -> list[str]:
    """The weights onnxruntime packs into one for a self-attention: its module's ``to_q``, ``to_k``, ``to_v``."""
    return [f"{attention}.to_{p}.weight" for p in "qkv"]


def qkv_attentions(names: Iterable[str]) -> list[str]:
    """The attention modules among parameter ``names`` (those with a ``to_q`` weight), sorted."""
    return sorted(n.removesuffix(".to_q.weight") for n in names if n.endswith(".to_q.weight"))


def qkv_parts(params: Mapping[str, torch.Tensor], attention: str) -> list[torch.Tensor] | None:
    """``attention``'s q, k, v weights where onnxruntime could pack them (2-D, one input width), else None."""
    names = qkv_names(attention)
    if not all(n in params for n in names):
        return None
    q, k, v = (params[n] for n in names)
    return [q, k, v] if q.dim() == 2 and q.shape[1] == k.shape[1] == v.shape[1] else None


def packed_qkv(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The one weight onnxruntime's ``Attention`` reads for a self-attention's q, k, v (``torch.nn.Linear`` weights,
    ``[out, in]``) with ``enable_packed_qkv`` off: ``np.stack((qw, kw, vw), axis=1)`` of the graph's ``[in, out]``
    (transposed) weights, ``[in, 3·out]``, each row q's, then k's, then v's (``[Wqᵀ | Wkᵀ | Wvᵀ]``). Packed q/k/v
    would interleave them head by head instead."""
    import torch

    return torch.cat([p.t() for p in parts], dim=1)


def packed_qkv_key(parts: Sequence[torch.Tensor]) -> RegionKey:
    """``weights.tensor_key`` of ``packed_qkv(parts)`` without packing the whole of it: its first and last rows are
    the packing of the parts' first and last columns."""
    row = sum(p.shape[0] for p in parts) * parts[0].element_size()
    take = -(-KEY_BYTES // row)  # rows enough for KEY_BYTES
    head = tensor_bytes(packed_qkv([p[:, :take] for p in parts])).tobytes()
    tail = tensor_bytes(packed_qkv([p[:, -take:] for p in parts])).tobytes()
    return sum(p.numel() * p.element_size() for p in parts), head[:KEY_BYTES], tail[-KEY_BYTES:]


def find_packed_qkv(params: Mapping[str, torch.Tensor], changed: set[str], weights: StoredWeights,
                    fused_only: set[Region]) -> tuple[dict[Region, str], set[Region]]:
    """The regions only fused graphs hold, as what the optimizer wrote: ``(the packed q/k/v weights of attentions
    with a ``changed`` weight: region → attention, every region accounted for)``.

    A region is accounted for when it is the packed weight of some self-attention (those with a changed weight
    compared exactly) or holds only zeros (the packed q/k/v biases the optimizer adds for attentions without any).
    """
    by_key = weights.index(fused_only)
    changed_stacks: dict[Region, str] = {}
    known: set[Region] = set()
    for attention in qkv_attentions(params):
        parts = qkv_parts(params, attention)
        if parts is None:
            continue
        candidates = by_key.get(packed_qkv_key(parts), [])
        if candidates and set(qkv_names(attention)) & changed:
            hits = _packed_hits(attention, parts, candidates, weights)
            changed_stacks.update(dict.fromkeys(hits, attention))
            known.update(hits)
        else:
            known.update(candidates)
    known.update(r for r in fused_only - known if not weights.view(r).any())
    return changed_stacks, known


def _packed_hits(attention: str, parts: list[torch.Tensor], candidates: list[Region],
                 weights: StoredWeights) -> list[Region]:
    """The one candidate region (or none) that is ``attention``'s packed weight, compared exactly; an error where
    two are."""
    data = tensor_bytes(packed_qkv(parts))
    hits = [r for r in candidates if np.array_equal(weights.view(r), data)]
    if len(hits) > 1:
        raise RefitError(f"the q/k/v stack of '{attention}' is stored {len(hits)} times ({where(hits)}) in "
                         "the onnxruntime graphs; refit cannot tell which it is")
    return hits


# --- fusing a graph ------------------------------------------------------------------------------------------


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
