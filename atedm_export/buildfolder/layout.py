"""Every folder and file name of a build folder, and the one spelling of a graph's id and label.

::

    BUILD/manifest.json                        the record (record.py)
    BUILD/onnx/weights.onnx.data               every graph's weights, stored once (weights.py)
    BUILD/onnx/weights.refit.onnx.data         a refit build's changed tensors, beside the base weights
    BUILD/onnx/<id>.onnx                       a graph's portable form; <id>.ort.onnx, <id>.plugin.onnx its others
    BUILD/engines/<id>.<library>.<target>.plan an engine

A graph's id is its name (``main``), with its shape's key in a multi-shape build (``main.1216x832-b2``): the
file stem in the build and the model name suffix in a Triton repository. Its label, in progress lines, tables
and errors, is ``main`` or ``main@1216x832-b2``.
"""

from __future__ import annotations

from pathlib import Path

from ..ortfuse import SUFFIX as ORT_SUFFIX  # onnxruntime's form is named where it is made

MANIFEST = "manifest.json"
GRAPHS_DIR = "onnx"  # every graph and the shared weights file: ONNX external data must not leave the folder
ENGINES_DIR = "engines"
WEIGHTS_FILE = "weights.onnx.data"
DELTA_FILE = "weights.refit.onnx.data"  # beside the base weights, in onnx/
FORM_SUFFIXES = {"portable": ".onnx", "onnxruntime": ORT_SUFFIX, "plugin": ".plugin.onnx"}


def graph_id(name: str, shape_key: str | None) -> str:
    """A graph's id: ``name``, or ``name.<shape key>`` where the build has several shapes (``shape_key`` given)."""
    return f"{name}.{shape_key}" if shape_key else name


def graph_label(name: str, shape_key: str | None) -> str:
    """A graph's label for people: ``name``, or ``name@<shape key>`` where the build has several shapes."""
    return f"{name}@{shape_key}" if shape_key else name


def graph_file(folder: Path, name: str, shape_key: str | None, form: str = "portable") -> Path:
    """Where a graph's file of ``form`` goes under ``folder`` (a build, or its hidden work folder)."""
    return folder / GRAPHS_DIR / (graph_id(name, shape_key) + FORM_SUFFIXES[form])


def engine_file(folder: Path, name: str, shape_key: str | None, library: str, target: str) -> Path:
    """Where a graph's engine for one library and target goes."""
    return folder / ENGINES_DIR / f"{graph_id(name, shape_key)}.{library}.{target}.plan"
