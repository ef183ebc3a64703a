"""One static-shape ONNX graph per DSAP stage, cleaned with the ONNX ecosystem's own tools.

The graph's inputs and output (names, shapes, dtypes) are the family's ``GraphContract`` (contract.py).

Two exporters, chosen by what the machine can afford:

* TorchScript tracing (``dynamo=False``) for small models: 9 s for a tiny graph. It runs one real
  forward pass and builds the whole ONNX proto, weights included, in memory.
* The dynamo exporter (``torch.export`` on fake tensors, then onnxscript's optimizer, which TensorRT needs
  to lose ``SplitToSequence``) for fp16 on a CPU and for models over 2 GB of weights: it never runs the
  model and writes weights straight from torch. CPU fp16 matmuls run at 0.2 GFLOP/s on our machines (a
  full-SDXL fp16 trace would take hours), and a TorchScript export of fp32 SDXL would hold 10 GB of
  weights twice. Dynamo takes ~80-120 s a graph whatever the width.

Both give graphs within 1.5e-6 of eager in onnxruntime on the tiny model. onnx-graphsurgeon then folds
constants and shape computations and removes dead nodes, and ``onnx.shape_inference`` annotates every
tensor. The cleaner sees a weight-free skeleton; the weights then move, once and deduplicated, into the
build's one shared external-data file (``weights.py``), so every graph of a build is a small file of nodes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import onnx
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401 - ir.passes.common
import torch
from diffusers import UNet2DConditionModel
from onnx.external_data_helper import uses_external_data
from onnxscript import optimizer

from .contract import OUTPUT, GraphContract, UNetGraph
from .kernels.nodes import plugin_form
from .pruning import StagePlan, planned
from .pruning.attention import fusable_attention
from .weights import WeightStore

OPSET = 18  # LayerNormalization is opset 17; TensorRT 10 and TensorRT-RTX parse 18
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; leave room for the graph itself
FOLD_BYTES = 1 << 20  # the cleaner folds constants up to this size; larger tensors are weights, never folded


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``onnx.shape_inference`` on a graph of any size, annotating ``model`` in place.

    In-memory inference serializes the model, which protobuf refuses past 2 GiB, and copying a 5 GB
    graph costs 5 GB. Shapes only need the weights' dims, so inference runs on a skeleton: the same
    nodes, with large initializers reduced to name, type and dims. Only the inferred shapes come back. The
    outputs of nodes ONNX has no schema for (the plugin form's ``atedm`` nodes) keep the types the exporter gave
    them: inference cannot know them, and the shapes after them follow from them.
    """
    skeleton = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name)
    skeleton.opset_import.extend(model.opset_import)
    graph = skeleton.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    opaque = {name for node in model.graph.node if node.domain not in ("", "ai.onnx") for name in node.output}
    graph.value_info.extend(v for v in model.graph.value_info if v.name in opaque)
    for tensor in model.graph.initializer:
        if tensor.ByteSize() > (1 << 20) or uses_external_data(tensor):
            graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        else:
            graph.initializer.append(tensor)
    shaped = onnx.shape_inference.infer_shapes(skeleton)
    del model.graph.value_info[:]
    model.graph.value_info.extend(shaped.graph.value_info)
    return model


def _detach_weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Turn the weights (external or over ``FOLD_BYTES``) into graph inputs; return them by name.

    The graph cleaner then sees a weight-free skeleton: it cannot fold a weight into a new constant
    (a transposed or cast copy would be a second copy of the weights, in memory and on disk), and it
    never holds the weights' bytes, which stay in the exporter's file until the store copies them.
    """
    weights = {t.name: t for t in model.graph.initializer if uses_external_data(t) or t.ByteSize() > FOLD_BYTES}
    kept = [t for t in model.graph.initializer if t.name not in weights]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for name, tensor in weights.items():
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    return weights


def _attach_weights(model: onnx.ModelProto, weights: dict[str, onnx.TensorProto]) -> None:
    """Undo ``_detach_weights`` for the weights the cleaned graph still uses."""
    used = {name for node in model.graph.node for name in node.input}
    inputs = [v for v in model.graph.input if v.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.graph.initializer.extend(t for name, t in weights.items() if name in used)


CLEANUP_ROUNDS = 40


def cleanup(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants and shape computations, drop dead nodes, sort topologically (onnx-graphsurgeon).

    Shapes are inferred first so that ``Shape → Reshape`` chains (GroupNorm, attention head splits)
    fold into constants: every shape in the saved graph is then a number, as TensorRT wants. The
    weights take no part (``_detach_weights``): the cleaner works on a graph of a few megabytes.
    """
    import onnx_graphsurgeon as gs

    weights = _detach_weights(model)
    # Each round folds what the previous round's shapes made static; rounds go on while Shape ops are left
    # and the graph shrinks
    # (two suffice at batch 2; at batch 1 each round frees one more block's GroupNorm Shape: a round per block).
    nodes = None
    for _ in range(CLEANUP_ROUNDS):
        graph = gs.import_onnx(infer_shapes(model))
        del model
        graph.fold_constants(size_threshold=FOLD_BYTES)
        graph.cleanup().toposort()
        model = gs.export_onnx(graph)
        del graph
        shapes_left = any(node.op_type == "Shape" for node in model.graph.node)
        if not shapes_left or len(model.graph.node) == nodes:
            break
        nodes = len(model.graph.node)
    _attach_weights(model, weights)
    return infer_shapes(model)


Form = Literal["portable", "plugin"]
#: A graph's forms: ``portable`` (standard ONNX ops: onnxruntime, TensorRT-RTX, ``verify`` against eager) and, for
#: a pruned stage, ``plugin`` (the map layer as the kernels' ``atedm`` nodes, ``kernels/nodes.py``).
FORMS: tuple[Form, ...] = ("portable", "plugin")


def export_raw(unet: UNet2DConditionModel, plan: StagePlan | None, contract: GraphContract, raw: Path,
               form: Form = "portable") -> None:
    """Export ``unet`` with ``plan`` applied (None: the stock UNet) to ``raw``, as the exporter writes it.

    The plan is removed again afterwards, so one loaded UNet can serve several stages. Every attention
    is exported in the form the backends fuse (``pruning.attention.explicit_attention``). The plugin form
    goes through the dynamo exporter whatever the model's size: only it writes nodes of another domain.
    """
    graph = contract.module(unet).eval()
    args = graph.args(contract.example_feed(device=unet.device))
    nodes = plugin_form() if form == "plugin" else contextlib.nullcontext()
    exporter = "dynamo" if form == "plugin" else exporter_for(unet)
    with planned(unet, plan), fusable_attention(unet), nodes, warnings.catch_warnings(), torch.no_grad(), _quiet():
        warnings.simplefilter("ignore")
        _torch_export(graph, args, raw, exporter, rewrite=form != "plugin")


def export_graph(model: str, seed: int, plan: StagePlan | None, contract: GraphContract, raw: Path,
                 loras: tuple = (), form: Form = "portable") -> None:
    """Load the UNet (``loras`` fused into it, ``lora.py``) and export one graph to ``raw``: what a build runs in a
    process of its own."""
    from .models import load_unet

    export_raw(load_unet(model, dtype=contract.dtype, seed=seed, loras=loras), plan, contract, raw, form)


def finalize(raw: Path, path: Path, store: WeightStore) -> Path:
    """Clean the exporter's graph and save it at ``path``, its weights moved into the build's shared ``store``.

    The exporter's file is read without its external data: only the store ever reads those bytes.
    """
    model = cleanup(onnx.load(str(raw), load_external_data=False))
    model.producer_name = "atedm-export"
    store.move_initializers(model, raw.parent)
    onnx.save_model(model, str(path))
    return path


def exporter_for(unet: UNet2DConditionModel) -> str:
    """``dynamo`` where a real trace is unaffordable (fp16 on a CPU, weights over 2 GB), else ``torchscript``."""
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    cpu_fp16 = unet.dtype == torch.float16 and unet.device.type == "cpu"
    return "dynamo" if cpu_fp16 or weights > EXTERNAL_DATA_BYTES else "torchscript"


def _torch_export(graph: UNetGraph, args: tuple[torch.Tensor, ...], raw: Path, exporter: str,
                  rewrite: bool = True) -> None:
    """Export to ``raw``. ``rewrite=False`` (the plugin form) runs onnxscript's optimizer without its rewrite rules:
    their pattern matching took 45 of the tiny plugin form's 67 s, and ``cleanup`` folds what is left."""
    names = {"input_names": list(graph.contract.input_names), "output_names": [OUTPUT], "opset_version": OPSET}
    if exporter == "torchscript":
        torch.onnx.export(graph, args, str(raw), dynamo=False, do_constant_folding=True, **names)
        return
    program = torch.onnx.export(graph, args, dynamo=True, optimize=rewrite, verbose=False, **names)
    if not rewrite:
        _fold(program.model)
    program.save(str(raw), external_data=True)


def _fold(model: ir.Model) -> None:
    """onnxscript's optimizer, its rewrite rules left out: functions inlined, constants folded (which turns the
    exporter's ``SplitToSequence`` into ``Split``, as TensorRT needs), what is unused removed, constants lifted."""
    optimizer.inline(model)
    optimizer.fold_constants(model)
    optimizer.remove_unused_nodes(model)
    optimizer.remove_unused_functions(model)
    # Constants become typed initializers, as the full optimizer leaves them: the graph cleaner reads a list-valued
    # Constant (``value_floats``, a Resize's scales) as float64 and would write it back as a double tensor.
    ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter narrates each phase on stdout; the build has its own progress display."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        previous = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch.onnx").setLevel(previous)


def check_onnx(path: Path) -> None:
    """``onnx.checker`` on the saved graph (by path, so graphs with external data are checked too)."""
    onnx.checker.check_model(str(path), full_check=False)
