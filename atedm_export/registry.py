"""The names a user types, listed once: engine libraries, build backends, runtime backends, deploy variants.

Plain strings with no imports, so the CLI can offer them as choices without importing torch. Every other
module reads its lists from here; adding a backend adds its name here and its code where it runs.
"""

from __future__ import annotations

#: Libraries that compile ONNX into engines (``compile/``), in the order ``build --library auto`` tries them.
ENGINE_LIBRARIES: tuple[str, ...] = ("tensorrt", "tensorrt-rtx")
#: What ``build --library`` takes: an engine library, ``onnx`` (graphs only) or ``auto``.
BUILD_LIBRARIES: tuple[str, ...] = ("auto", *ENGINE_LIBRARIES, "onnx")  # build --library: onnx builds no engines
#: What runs a build's graphs: the eager reference, onnxruntime, the engines. Each is a name a class of
#: ``runtime/backends.py`` declares (``backends.BACKENDS``, which checks it has these); listed here in the CLI's order.
RUNTIME_BACKENDS: tuple[str, ...] = ("onnxruntime", "eager", *ENGINE_LIBRARIES)
#: How ``deploy`` serves graphs on Triton: TensorRT plans, or the ONNX graphs on onnxruntime.
DEPLOY_VARIANTS: tuple[str, ...] = ("tensorrt", "onnxruntime")
#: Precisions a graph is exported in (the dtype of each lives in ``contract.PRECISIONS``).
PRECISION_NAMES: tuple[str, ...] = ("fp32", "fp16", "bf16")
#: Where the engine backend keeps stage engines' weights (``runtime/engines.py``): every stage's on the GPU,
#: or one stage's at a time, swapped in before it runs (TensorRT-RTX's deferred weight loading).
ENGINE_WEIGHTS: tuple[str, ...] = ("resident", "cycled")
#: Devices the cost model predicts for (``costmodel.DEVICES`` holds their peaks; ``cpu`` is measured here).
COST_DEVICES: tuple[str, ...] = ("h100", "h200", "a100", "l40s", "rtx4090", "cpu")
