"""The map layer's ``atedm`` nodes as TensorRT plugins, each embedding its op's Triton kernel compiled ahead of time.

TensorRT ≥ 10.9 takes quickly deployable plugins with an ahead-of-time implementation (``tensorrt.plugin``):
``register`` describes a node's outputs from its inputs, ``aot_impl`` returns one compiled kernel (PTX), its launch
grid and its integer arguments, which TensorRT embeds in the engine, so ``trtexec`` and Triton's ``tensorrt_plan``
backend run the engine with no Python. What each plugin embeds is the op's entry kernel
(``kernels/triton_kernels.py`` ``LAUNCHES``), compiled by ``kernels/aot.py`` for the GPU the engine is built on,
launched with the grid PyTorch launches it with: one kernel source for PyTorch and the engine.

The descriptions are built from the op's schema and its output table (``kernels/ops.py`` ``OUTPUTS``), so a plugin
takes exactly its node's inputs and attributes (``scale``, ``keep``). An engine is static (one profile, min = opt = max): every
shape a plugin sees is a constant, and its kernel is compiled for it.

Written against the ``tensorrt.plugin`` sources of the TensorRT 11.4 bindings (``tensorrt_cu13_bindings``), whose
names ``tests/test_trt_conformance.py`` checks; no TensorRT 10/11 library runs on the machines that wrote it, so no
engine holding these plugins has been built yet (docs/build.md).
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any

import torch

from ..kernels import ops
from ..kernels.nodes import DOMAIN, NODE_TYPES

_TORCH_TYPES = {"HALF": torch.float16, "BF16": torch.bfloat16, "FLOAT": torch.float32, "INT64": torch.int64}


def plugin_ids() -> list[str]:
    """The plugin of each ``atedm`` node, as TensorRT's parser looks it up (``namespace::name``, the node's domain)."""
    return [f"{DOMAIN}::{node_type}" for node_type in NODE_TYPES.values()]


def register_plugins(trtp: ModuleType, types: dict[str, Any], target: str) -> list[str]:  # noqa: ANN401
    """Register every ``atedm`` node's plugin with ``tensorrt.plugin`` (``trtp``), its outputs in the library's
    ``types`` (``api.tensor_types``), its kernels compiled for ``target`` (``sm90``…); returns the plugin ids.
    Idempotent within a process."""
    done = []
    for name, node_type in NODE_TYPES.items():
        plugin_id = f"{DOMAIN}::{node_type}"
        if plugin_id not in _registered:
            trtp.register(plugin_id)(_description(name, trtp, types))
            trtp.aot_impl(plugin_id)(_ahead_of_time(name, trtp, target))
            _registered.add(plugin_id)
        done.append(plugin_id)
    return done


_registered: set[str] = set()


def _signature(name: str, trtp: ModuleType, tail: list[inspect.Parameter], returns: Any) -> inspect.Signature:  # noqa: ANN401
    """``tensorrt.plugin`` reads a plugin's inputs and attributes from its function's annotated signature."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    annotations = {"Tensor": trtp.TensorDesc, "float": float, "int": int}
    params = [inspect.Parameter(argument, kind, annotation=annotations[typ]) for argument, typ in ops.arguments(name)]
    return inspect.Signature(params + tail, return_annotation=returns)


def _probes(name: str, descs: list[Any], scalars: dict[str, float | int]) -> list[Any]:  # noqa: ANN401
    """The op's arguments as meta tensors of the descriptors' (constant) shapes and types, scalars as given."""
    shapes = iter(descs)
    out = []
    for argument, kind in ops.arguments(name):
        if kind == "Tensor":
            desc = next(shapes)
            shape = [int(d.constant_value()) for d in desc.shape_expr]
            out.append(torch.empty(shape, dtype=_TORCH_TYPES[desc.dtype.name], device="meta"))
        else:
            out.append(scalars[argument])
    return out


def _description(name: str, trtp: ModuleType, types: dict[str, Any]):  # noqa: ANN202, ANN401
    """The plugin's ``register`` function: its outputs' shapes and types, from ``ops.OUTPUTS``."""
    names = {torch_type: type_name for type_name, torch_type in _TORCH_TYPES.items()}
    tensors, scalars = ops.tensor_and_scalar_names(name)
    count = len(ops.OUTPUTS[name](*ops.probe_arguments(name, torch.float16)))

    def describe(*args: Any, **kwargs: Any) -> tuple:  # noqa: ANN401
        bound = describe.__signature__.bind(*args, **kwargs)
        descs = [bound.arguments[t] for t in tensors]
        probes = _probes(name, descs, {s: bound.arguments[s] for s in scalars})
        return tuple(trtp.from_shape_expr(tuple(shape), dtype=types[names[dtype]])
                     for shape, dtype in ops.OUTPUTS[name](*probes))

    describe.__signature__ = _signature(name, trtp, [], tuple[(trtp.TensorDesc,) * count])
    describe.__name__ = f"{name}_description"
    return describe


def _ahead_of_time(name: str, trtp: ModuleType, target: str):  # noqa: ANN202
    """The plugin's ``aot_impl`` function: the entry kernel compiled for ``target`` at the node's shapes, the grid
    and sizes ``LAUNCHES`` gives (the torch launcher's), the scale compiled in."""
    from ..kernels.aot import compile_node
    from ..kernels.triton_kernels import LAUNCHES, sizes_of

    tensors, scalars = ops.tensor_and_scalar_names(name)
    spec = LAUNCHES[name]
    dtypes = {"HALF": "fp16", "BF16": "bf16", "FLOAT": "fp32"}

    def implement(*args: Any, **kwargs: Any) -> tuple:  # noqa: ANN401
        bound = implement.__signature__.bind(*args, **kwargs)
        descs = [bound.arguments[t] for t in tensors]
        shapes = [tuple(int(d.constant_value()) for d in desc.shape_expr) for desc in descs]
        sizes = sizes_of(name, shapes, {s: bound.arguments[s] for s in scalars})
        scale = float(bound.arguments["scale"]) if "scale" in scalars else None
        compiled = compile_node(name, target, dtypes.get(descs[0].dtype.name, "fp32"), sizes, scale)
        params = trtp.KernelLaunchParams()
        grid = spec.grid(sizes, spec.tiles)
        for axis, value in zip(("grid_x", "grid_y", "grid_z"), grid, strict=False):
            setattr(params, axis, value)
        params.block_x = spec.tiles.num_warps * 32
        params.shared_mem = int(compiled.metadata.shared)
        extra = trtp.SymIntExprs.from_tuple(tuple(trtp.SymInt32(sizes[size]) for size in spec.sizes))
        return compiled.metadata.name, compiled.asm["ptx"], params, extra

    tail = [inspect.Parameter("outputs", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=tuple[trtp.TensorDesc]),
            inspect.Parameter("tactic", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int)]
    implement.__signature__ = _signature(name, trtp, tail, inspect.Signature.empty)
    implement.__name__ = f"{name}_aot"
    return implement


