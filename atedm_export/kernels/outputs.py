"""Each map-layer op's outputs (shape, dtype) from its inputs: the one table the op's fake implementation
(``ops.py``), its Triton launcher (``triton_kernels.run``), its node in a graph (``nodes.py``), onnxruntime's Python op
(``onnxruntime_ops.py``) and its TensorRT plugin (``compile/plugins.py``) read. Importable without triton.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .tiles import row_tiles

Outputs = list[tuple[tuple[int, ...], torch.dtype]]


def _attention_lse_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Outputs:
    batch, tokens, heads, _ = q.shape
    return [(tuple(q.shape), q.dtype), ((batch, heads, tokens), torch.float32)]


def _head_mean_map_outputs(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> Outputs:
    batch, tokens, keys = q.shape[0], q.shape[1], k.shape[1]
    return [((batch, tokens, keys), torch.float32), ((batch, row_tiles(tokens), keys), torch.float32)]


def _select_kept_outputs(scores: torch.Tensor, keep: int) -> Outputs:
    return [((scores.shape[0], keep), torch.int64), (tuple(scores.shape), torch.int64)]


def _recovery_sources_outputs(attn_map: torch.Tensor, kept: torch.Tensor, slot_of: torch.Tensor) -> Outputs:
    return [(tuple(attn_map.shape[:2]), torch.int64)]


def _gwpr_step_outputs(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scores: torch.Tensor, scale: float) -> Outputs:
    return [((q.shape[0], q.shape[2], k.shape[1]), torch.float32)]


def _recovery_mapless_outputs(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, kept: torch.Tensor,
                              slot_of: torch.Tensor, scale: float) -> Outputs:
    return [(tuple(q.shape[:2]), torch.int64)]


#: Each op's outputs (shape, dtype) from its arguments, in ``ops.py``'s order.
OUTPUTS = {
    "attention_lse": _attention_lse_outputs,
    "head_mean_map": _head_mean_map_outputs,
    "select_kept": _select_kept_outputs,
    "recovery_sources": _recovery_sources_outputs,
    "gwpr_step": _gwpr_step_outputs,
    "recovery_mapless": _recovery_mapless_outputs,
}


def allocate(name: str, args: Sequence[object]) -> tuple[torch.Tensor, ...]:
    """Empty tensors of op ``name``'s outputs for its arguments ``args``, on the device of their first tensor."""
    device = next(a for a in args if isinstance(a, torch.Tensor)).device
    return tuple(torch.empty(shape, dtype=dtype, device=device) for shape, dtype in OUTPUTS[name](*args))
