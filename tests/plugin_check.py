"""Runs ``compile/plugins.py``'s functions as ``tensorrt.plugin`` would call them, with no TensorRT: a recording
stand-in for the framework takes the registered functions, which are then called with descriptors of one static
shape per node. Prints one JSON line per plugin. Run with ``TRITON_INTERPRET`` unset (the kernels are compiled).

    python -m tests.plugin_check sm90
"""

from __future__ import annotations

import enum
import inspect
import json
import sys
from types import SimpleNamespace

import torch

from atedm_export.compile.plugins import register_plugins
from atedm_export.kernels import ops
from atedm_export.kernels.aot import compile_node
from atedm_export.kernels.nodes import DOMAIN, NODE_TYPES
from atedm_export.kernels.triton_kernels import LAUNCHES, sizes_of


class DataType(enum.Enum):
    HALF = 1
    BF16 = 2
    FLOAT = 3
    INT64 = 4


class Dim:
    def __init__(self, value: int) -> None:
        self.value = value

    def constant_value(self) -> int:
        return self.value


class TensorDesc:
    def __init__(self, shape: tuple[int, ...], dtype: DataType) -> None:
        self.shape_expr = [Dim(d) for d in shape]
        self.dtype = dtype


class KernelLaunchParams:
    def __init__(self) -> None:
        self.grid_x = self.grid_y = self.grid_z = self.block_x = 1
        self.shared_mem = 0


class SymIntExprs(list):
    @classmethod
    def from_tuple(cls, values: tuple) -> SymIntExprs:
        return cls(values)


def _framework() -> tuple[SimpleNamespace, dict]:
    registered: dict[str, dict] = {}

    def decorator(kind: str):  # noqa: ANN202
        return lambda plugin_id: lambda fn: registered.setdefault(plugin_id, {}).__setitem__(kind, fn) or fn

    trtp = SimpleNamespace(TensorDesc=TensorDesc, register=decorator("register"), aot_impl=decorator("aot_impl"),
                           from_shape_expr=lambda shape, dtype: TensorDesc(shape, dtype),
                           KernelLaunchParams=KernelLaunchParams, SymIntExprs=SymIntExprs, SymInt32=int)
    return trtp, registered


#: One static shape per op: batch 2, 300 tokens (remainders in every tile), 2 heads of 32, 111 kept.
B, N, H, D, KEEP = 2, 300, 2, 32, 111
SHAPES = {"q": (B, N, H, D), "k": (B, N, H, D), "v": (B, N, H, D), "lse": (B, H, N), "scores": (B, N),
          "attn_map": (B, N, N), "kept": (B, KEEP), "slot_of": (B, N)}
TYPES = {"lse": DataType.FLOAT, "scores": DataType.FLOAT, "attn_map": DataType.FLOAT,
         "kept": DataType.INT64, "slot_of": DataType.INT64}

ATTRIBUTES = {"scale": 0.125, "keep": KEEP}


def main(target: str) -> None:
    trtp, registered = _framework()
    ids = register_plugins(trtp, {t.name: t for t in DataType}, target)
    for name, node_type in NODE_TYPES.items():
        plugin = registered[f"{DOMAIN}::{node_type}"]
        describe, implement = plugin["register"], plugin["aot_impl"]
        params = inspect.signature(describe).parameters
        descs = {p: TensorDesc(SHAPES[p], TYPES.get(p, DataType.HALF)) for p in params if p in SHAPES}
        attrs = {p: ATTRIBUTES[p] for p in params if p not in SHAPES}
        outputs = describe(**descs, **attrs)
        meta = [torch.empty(SHAPES[p], dtype={DataType.HALF: torch.float16, DataType.FLOAT: torch.float32,
                                               DataType.INT64: torch.int64}[TYPES.get(p, DataType.HALF)], device="meta")
                if p in SHAPES else attrs[p] for p in params]
        expected = [[list(shape), str(dtype)] for shape, dtype in ops.OUTPUTS[name](*meta)]
        kernel, ptx, launch, extra = implement(**descs, **attrs, outputs=outputs, tactic=0)
        sizes = sizes_of(name, [SHAPES[p] for p in params if p in SHAPES], attrs)
        metadata = compile_node(name, target, "fp16", sizes, attrs.get("scale")).metadata
        entry = ptx[ptx.index(f".entry {kernel}("):]
        print(json.dumps({
            "plugin": f"{DOMAIN}::{node_type}", "registered": f"{DOMAIN}::{node_type}" in ids,
            "outputs": [[[d.constant_value() for d in o.shape_expr], o.dtype.name] for o in outputs],
            "expected_outputs": expected, "inputs": len(descs), "attributes": sorted(attrs),
            "kernel": kernel, "entry_params": entry[:entry.index(")")].count(".param"),
            "grid": [launch.grid_x, launch.grid_y, launch.grid_z], "block_x": launch.block_x,
            "shared_mem": launch.shared_mem, "extra": list(extra),
            "expected_grid": list(LAUNCHES[name].grid(sizes, LAUNCHES[name].tiles)),
            "expected_extra": [sizes[s] for s in LAUNCHES[name].sizes],
            "warps": LAUNCHES[name].tiles.num_warps,
            "scratch_bytes": [metadata.global_scratch_size, metadata.profile_scratch_size]}))


if __name__ == "__main__":
    main(sys.argv[1])
