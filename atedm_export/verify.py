"""``atedm-export verify``: each built graph against the eager AT-EDM module, on the same random inputs.

The eager reference is the UNet the manifest names, with the same stage plan applied (the stock UNet
for the baseline graph). Runs go through polygraphy's ``Comparator``: onnxruntime through its own
runner, torch through a small CPU runner written to polygraphy's runner interface (polygraphy's
``PytRunner`` moves tensors to CUDA). Besides polygraphy's max absolute/relative errors, the cosine
similarity of the outputs is reported; pass/fail uses tolerances per precision.
"""

from __future__ import annotations

from collections import OrderedDict
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .contract import OUTPUT, PRECISIONS, UNetGraph
from .isolated import run_isolated
from .buildfolder import check_lora, first_view, read_manifest, view_at, views
from .models import load_unet
from .pruning import set_plan
from .shapes import Shape
from .userfiles import load_onnx


@dataclass(frozen=True)
class GraphCheck:
    graph: str
    backend: str
    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float
    atol: float
    rtol: float
    passed: bool
    reference: str = "eager"  # what the graph was run against: the eager module, or the portable graph (a form)

    def to_json(self) -> dict:
        return asdict(self)


def _torch_runner(graph: UNetGraph, name: str, feed: dict[str, np.ndarray]):  # noqa: ANN202 - polygraphy runner
    from polygraphy.backend.base import BaseRunner

    class TorchRunner(BaseRunner):
        """The eager (patched) module as a polygraphy runner, on the CPU."""

        def __init__(self) -> None:
            super().__init__(name=name, prefix="torch-runner")

        def activate_impl(self) -> None:
            pass

        def deactivate_impl(self) -> None:
            pass

        def get_input_metadata_impl(self):  # noqa: ANN202
            from polygraphy.common import TensorMetadata

            metadata = TensorMetadata()
            for input_name in graph.contract.input_names:
                metadata.add(input_name, feed[input_name].dtype, feed[input_name].shape)
            return metadata

        def infer_impl(self, feed_dict: dict) -> OrderedDict:
            args = [torch.from_numpy(np.asarray(feed_dict[n])) for n in graph.contract.input_names]
            with torch.no_grad():
                out = graph(*args)
            self.inference_time = 0.0
            return OrderedDict({OUTPUT: out.float().numpy()})

    return TorchRunner()


def _onnxrt_runner(path: Path, name: str):  # noqa: ANN202
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    load_onnx(path)  # a file that is not a model: one line naming it, not polygraphy's traceback
    return OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"]), name=name)


def _plugin_runner(path: Path, name: str):  # noqa: ANN202 - polygraphy runner
    """The plugin form in onnxruntime, each ``atedm`` node through its ``torch.ops.atedm`` op (``onnxruntime_ops.py``)."""
    import onnxruntime
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from .kernels.onnxruntime_ops import session_model, session_options

    model = load_onnx(path)
    precision = onnxruntime_precision(model)
    options = session_options(precision, path.parent)
    session = onnxruntime.InferenceSession(session_model(model).SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    return OnnxrtRunner(session, name=name)


def onnxruntime_precision(model) -> np.dtype:  # noqa: ANN001 - onnx.ModelProto
    """The precision of a graph's float inputs (``contract.py``: all of one), as numpy names it."""
    import onnx

    for tensor in model.graph.input:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.type.tensor_type.elem_type)
        if dtype.kind == "f":
            return dtype
    return np.dtype(np.float32)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def compare(reference, candidate, feed: dict[str, np.ndarray], graph: str, backend: str, precision: str) -> GraphCheck:
    """Run both runners on ``feed`` through polygraphy's comparator and summarize the one output."""
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    # An element passes when either bound of its precision holds (polygraphy's elementwise rule).
    atol, rtol = PRECISIONS[precision].atol, PRECISIONS[precision].rtol
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        results = Comparator.run([reference, candidate], data_loader=[feed])
        accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol))
    (_, iterations), = accuracy[0].items()  # one comparison function, one runner pair
    stats = iterations[0][OUTPUT]
    (_, ref_runs), (_, cand_runs) = results.items()
    ref_out, cand_out = ref_runs[0][OUTPUT], cand_runs[0][OUTPUT]
    return GraphCheck(graph, backend, stats.max_absdiff, stats.max_reldiff, stats.mean_absdiff,
                      _cosine(np.asarray(ref_out), np.asarray(cand_out)), atol, rtol, bool(stats))


def compare_plugin_form(portable: str, plugin: str, feed: dict[str, np.ndarray], name: str, precision: str) -> dict:
    """A graph's plugin form against its portable form, both in onnxruntime: what ``verify_build`` runs in a process
    of its own, in which Triton's interpreter is on from the start (triton reads it when first imported, and runs
    the nodes' kernels on the CPU only there)."""
    reference = _onnxrt_runner(Path(portable), f"onnxruntime-{name}")
    candidate = _plugin_runner(Path(plugin), f"onnxruntime-plugin-{name}")
    check = compare(reference, candidate, feed, name, "onnxruntime-plugin", precision)
    return dataclasses.replace(check, reference="portable").to_json()


def verify_build(folder: str | Path, seed: int = 0, graphs: list[str] | None = None,
                 shapes: list[Shape] | None = None) -> list[GraphCheck]:
    """Every graph of a build (or the named ones, at the given shapes) in onnxruntime, plain and fused, against
    eager AT-EDM on random inputs of each graph's shape. In a multi-shape build a graph is named ``main@1216x832-b2``."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    checked = [view_at(manifest, s) for s in shapes] if shapes else views(manifest)
    spec = first_view(manifest).graph_spec
    for lora in manifest.loras:
        check_lora(lora)  # the reference is the build's model only with the LoRA files it fused
    unet = load_unet(spec.model, dtype=spec.dtype, seed=spec.seed, loras=manifest.loras)
    checks = []
    for view in checked:
        contract = view.contract
        feed = {k: v.numpy() for k, v in contract.example_feed(seed=seed).items()}
        for entry in view.graphs():
            if graphs and entry.name not in graphs:
                continue
            name = view.label(entry.name)
            set_plan(unet, view.plan(entry))
            reference = _torch_runner(contract.module(unet).eval(), f"eager-{name}", feed)
            candidate = _onnxrt_runner(folder / entry.onnx.path, f"onnxruntime-{name}")
            checks.append(compare(reference, candidate, feed, name, "onnxruntime", spec.precision))
            if entry.ort_onnx is not None:  # the fused form the onnxruntime backend runs
                fused = _onnxrt_runner(folder / entry.ort_onnx.path, f"onnxruntime-fused-{name}")
                checks.append(compare(reference, fused, feed, name, "onnxruntime-fused", spec.precision))
            if entry.plugin_onnx is not None:  # the plugin form, against the portable form it stands in for
                checks.append(GraphCheck(**run_isolated(
                    compare_plugin_form, str(folder / entry.onnx.path), str(folder / entry.plugin_onnx.path), feed,
                    name, spec.precision, what="plugin-form check", env={"TRITON_INTERPRET": "1"}).result))
    set_plan(unet, None)
    return checks
