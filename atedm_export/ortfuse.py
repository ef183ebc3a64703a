"""onnxruntime's fused form of a finished graph, made by onnxruntime's own transformer optimizer.

The graphs of a build are plain ONNX (what TensorRT parses; its MHA fusion takes their attention as it
is). onnxruntime fuses attention only through its offline optimizer (``onnxruntime.transformers``,
model type ``unet``), which turns each ``explicit_attention`` of the graph into one ``com.microsoft``
kernel: ``Attention`` for a self-attention (its q/k/v weights stacked into one), ``MultiHeadAttention``
for a cross-attention. An attention whose map is read elsewhere (AT-EDM's map layer) does not match the
pattern and stays as it is. The options are the CPU-safe ones (no packed q/k/v or k/v inputs, no NHWC
GroupNorm or BiasSplitGelu: CUDA-only kernels), so one fused graph runs on onnxruntime's CPU and CUDA
providers alike.

The optimizer runs on the graph's skeleton; it reads only the attention weights it stacks, from the
build's weights file. The stacked weights are new tensors and go into that file once, shared by every
graph of the build (``WeightStore`` deduplicates them); the fused graph no longer reads the separate
q/k/v weights, so a session of it maps about as many weight bytes as one of the plain graph.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from collections.abc import Iterator
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
