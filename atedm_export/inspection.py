"""What ``inspect`` and ``build`` show about a build: per-graph figures, schedule totals, op histograms."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .buildfolder import GraphEntry, Manifest, ShapeView, first_view, views
from .kernels.onnxruntime_ops import plugin_nodes
from .userfiles import load_onnx


def op_histogram(path: Path) -> dict[str, int]:
    """Node count per ONNX op type (the graph only, never the weights)."""
    graph = load_onnx(path).graph
    return dict(Counter(node.op_type for node in graph.node).most_common())


def attention_forms(folder: Path, entry: GraphEntry) -> dict[str, int]:
    """A graph's attentions by what a fuser does with them.

    ``fusable``: scale before the first product, the softmax read by the second only (TensorRT's fused-
    attention form); ``map``: any other softmax (the map layer's per-head maps, read by their sum);
    ``onnxruntime_fused``: the ``Attention``/``MultiHeadAttention`` kernels of the graph's onnxruntime form;
    ``plugin_nodes``: the ``atedm`` nodes of its plugin form (the map layer's kernels).
    """
    from .ortfuse import FUSED_OPS, scaled_products

    model = load_onnx(folder / entry.onnx.path)
    fusable = len(scaled_products(model))
    forms = {"fusable": fusable, "map": sum(n.op_type == "Softmax" for n in model.graph.node) - fusable}
    if entry.ort_onnx is not None:
        fused = op_histogram(folder / entry.ort_onnx.path)
        forms["onnxruntime_fused"] = sum(fused.get(op, 0) for op in FUSED_OPS)
    if entry.plugin_onnx is not None:
        forms["plugin_nodes"] = len(plugin_nodes(load_onnx(folder / entry.plugin_onnx.path)))
    return forms


def graph_summary(view: ShapeView, entry: GraphEntry) -> dict:
    kept = sum(entry.keep.values())
    tokens = sum(view.tokens.values())
    base = view.baseline.graph_tflops
    return {
        "name": entry.name,
        "steps": entry.steps,
        "until": entry.until,
        "pruned_blocks": sum(k < view.tokens[b] for b, k in entry.keep.items()),
        "kept_fraction": kept / tokens,
        "graph_tflops": entry.graph_tflops,
        "module_tflops": entry.module_tflops,
        "saving": 1 - entry.graph_tflops / base,
        "onnx_bytes": entry.onnx.bytes,  # the graph file; its weights are the build's shared file
        "engine_bytes": entry.engine.bytes if entry.engine else None,
        "export_seconds": entry.export_seconds,
        "compile_seconds": entry.compile_seconds,
        "same_as": entry.same_as,
        "forms": {form: item.path for form, item in entry.form_files().items()},
    }


def schedule_totals(view: ShapeView) -> dict | None:
    """Step-weighted average FLOPs over the spec's steps; None when the build holds only some stages."""
    if not view.manifest.complete:
        return None
    steps = view.graph_spec.steps
    tflops = sum(s.graph_tflops * s.step_count for s in view.stages) / steps
    return {"steps": steps, "graph_tflops": tflops, "saving": 1 - tflops / view.baseline.graph_tflops}


def shape_summary(view: ShapeView) -> dict:
    """One shape of a build: its I/O, tokens, graphs and schedule totals."""
    shape = view.shape
    return {
        "shape": shape.key, "batch": shape.batch, "height": shape.height, "width": shape.width,
        "inputs": [t.model_dump() for t in view.inputs],
        "outputs": [t.model_dump() for t in view.outputs],
        "tokens": view.tokens,
        "graphs": [{**graph_summary(view, e), "keep": e.keep, "onnx": e.onnx.path,
                    "engine": e.engine.path if e.engine else None} for e in view.graphs()],
        "schedule": schedule_totals(view),
    }


def inspect_build(folder: Path, manifest: Manifest) -> dict:
    """The JSON of ``atedm-export inspect``: the first shape's figures at the top level (as a single-shape build
    has them), every shape under ``shapes``, and the files of all of them."""
    unique = {e.onnx.path: e for e in manifest.all_graphs()}
    labels = {e.onnx.path: view.label(e.name) for view in views(manifest) for e in view.graphs()}
    weights = sum(f.bytes for f in manifest.weight_files)  # a refit build's base and its changed tensors
    graph_bytes = sum(e.onnx.bytes for e in unique.values())
    first = shape_summary(first_view(manifest))
    return {
        "folder": str(folder),
        "method": manifest.full_spec.method,
        "spec": manifest.spec,
        "engine": manifest.engine.model_dump(),
        **{key: first[key] for key in ("inputs", "outputs", "tokens", "graphs", "schedule")},
        "shapes": [shape_summary(view) for view in views(manifest)],
        "ops": {labels[path]: op_histogram(folder / path) for path in unique},
        "attention": {labels[path]: attention_forms(folder, e) for path, e in unique.items()},
        "weights": {"path": manifest.weights.path, "bytes": weights, "graphs_sharing": len(unique),
                    "files": [f.model_dump() for f in manifest.weight_files]},
        "loras": [lora.model_dump() for lora in manifest.loras],
        "refit": manifest.refit.model_dump() if manifest.refit else None,
        # what the graphs would take with a copy of the weights each, against what they take on disk
        "onnx_bytes": {"on_disk": weights + graph_bytes, "unshared": len(unique) * weights + graph_bytes},
        "total_bytes": sum(f.bytes for f in manifest.files()),
        "versions": manifest.versions,
        "build_seconds": manifest.build_seconds,
    }
