"""What each of the map layer's kernels costs: its FLOPs, the bytes it moves, and the kernels it launches.

The cost model (``costmodel.py``) records a ``torch.ops.atedm.*`` op as one op and cannot see inside it: its
inputs and outputs are not what the kernel reads and writes (``head_mean_map`` reads ``q`` and ``k`` per map
tile, ``recovery_sources`` reads only the kept columns of its map), and its FLOPs are in no torch formula.
Each op's formulas live here, beside the kernels, so a change to a kernel changes its price in the same
place: the three of a layer whose map is written (``attention_lse``, ``head_mean_map``, ``recovery_sources``)
and the two that stand in for the map where it is not (``gwpr_step``, ``recovery_mapless``). Every function
takes the op's arguments as the op does and its outputs as ``out`` (the way torch's own FLOP formulas are
called), as the recorder has them: ``meta`` tensors, of which only shapes and dtypes are read. The counts
follow ``triton_kernels.py`` and the launchers in ``ops.py``; this module imports neither, so the cost model
never needs triton.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: A DRAM read moves whole 32-byte sectors: 8 fp32 map entries.
SECTOR_FLOATS = 8


@dataclass(frozen=True)
class KernelCost:
    """One op's work: ``kind`` as the cost model's op kinds; ``fp32``: its products run on fp32 inputs."""

    kind: str  # matmul | attention | memory
    flops: int
    bytes: int
    launches: int
    fp32: bool


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
                  out: tuple[torch.Tensor, torch.Tensor]) -> KernelCost:
    """One flash pass: ``4·B·H·N·M·d`` FLOPs (``q·kᵀ`` and ``p·v``); ``q``, ``k``, ``v`` read, output and lse written.

    Priced like the fused SDPA it stands beside (kind ``attention``): on CUDA it is PyTorch's own flash
    kernel where that takes the inputs, the Triton flash kernel otherwise, one launch either way.
    """
    batch, tokens, heads, dim = q.shape
    flops = 4 * batch * heads * tokens * k.shape[1] * dim
    return KernelCost("attention", flops, _nbytes(q, k, v, *out), 1, q.dtype == torch.float32)


def head_mean_map(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, *,
                  out: tuple[torch.Tensor, torch.Tensor]) -> KernelCost:
    """``2·B·H·N·M·d`` FLOPs (one ``q·kᵀ`` per head) and ``B·H·N·M`` exps; ``q``, ``k``, lse read, the map written once.

    The kernel re-reads each ``q`` row tile once per key tile and each ``k`` tile once per row tile; those
    re-reads come from L2 in a tiled kernel, so they are counted once. The exps are counted as FLOPs at the
    tensor peak, which understates them: they run on the special-function units (about 3.9 T/s on an H100,
    per the FlashAttention-3 paper), 0.1 ms per 64×64 block at batch 2; the model has no such unit. The
    per-row-tile column sums it writes are added by the caller's torch op, recorded (and priced) on its own.
    """
    batch, tokens, heads, dim = q.shape
    products = batch * heads * tokens * k.shape[1]
    return KernelCost("matmul", 2 * products * dim + products, _nbytes(q, k, lse, *out), 1, q.dtype == torch.float32)


def select_kept(scores: torch.Tensor, keep: int, *, out: tuple[torch.Tensor, torch.Tensor]) -> KernelCost:
    """``select_kernel``: the scores read once (its 32 counts that find the k-th largest run on the row in
    registers), the kept tokens and each token's slot written, one launch."""
    return KernelCost("memory", 0, _nbytes(scores, *out), 1, False)


def recovery_sources(attn_map: torch.Tensor, kept: torch.Tensor, slot_of: torch.Tensor, *,
                     out: torch.Tensor) -> KernelCost:
    """The kept columns of each map row read, ``kept`` and each row's slot read, ``[B, N]`` sources written; no FLOPs.

    A row's kept columns are scattered over it, and memory moves in 32-byte sectors (8 fp32 entries): a
    sector is read where any of its entries is kept, ``1 − (1 − k/M)⁸`` of them for kept columns spread over
    the row (97% at SDXL's 37% kept), so the kernel reads nearly the whole map, not ``k/M`` of it. A kept
    row takes its own slot from ``slot_of`` in the same kernel: one launch.
    """
    batch, rows, keys = attn_map.shape
    keep = kept.shape[1]
    sectors = 1.0 - (1.0 - keep / keys) ** SECTOR_FLOATS
    map_read = int(batch * rows * keys * attn_map.element_size() * sectors)
    return KernelCost("memory", 0, map_read + _nbytes(kept, slot_of, out), 1, False)


def gwpr_step(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scores: torch.Tensor, scale: float, *,
              out: torch.Tensor) -> KernelCost:
    """One G-WPR step with no map: ``2·B·H·N·M·d`` FLOPs (one ``k·qᵀ`` per head) and, per map entry, an exp, a
    product by the score and a sum; ``q``, ``k``, lse and the scores read once (tiled, as ``head_mean_map``).

    It writes each head's step ``[B, H, M]``; the caller's mean over the heads is recorded on its own: one launch.
    """
    batch, tokens, heads, dim = q.shape
    products = batch * heads * tokens * k.shape[1]
    moved = _nbytes(q, k, lse, scores, out)
    return KernelCost("matmul", 2 * products * dim + 3 * products, moved, 1, q.dtype == torch.float32)


def recovery_mapless(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, kept: torch.Tensor, slot_of: torch.Tensor,
                     scale: float, *, out: torch.Tensor) -> KernelCost:
    """``recovery_sources`` with no map: ``2·B·H·N·k·d`` FLOPs and ``B·H·N·k`` exps for the kept keys only; ``q``,
    lse, the kept rows of ``k``, ``kept`` and each row's slot read, the sources written: one launch."""
    batch, tokens, heads, dim = q.shape
    keep = kept.shape[1]
    products = batch * heads * tokens * keep
    kept_keys = batch * keep * heads * dim * k.element_size()
    moved = _nbytes(q, lse, kept, slot_of, out) + kept_keys
    return KernelCost("matmul", 2 * products * dim + products, moved, 1, q.dtype == torch.float32)


#: The cost of each ``torch.ops.atedm.*`` op, by op name.
KERNEL_COSTS: dict[str, Callable[..., KernelCost]] = {
    "attention_lse": attention_lse,
    "head_mean_map": head_mean_map,
    "select_kept": select_kept,
    "recovery_sources": recovery_sources,
    "gwpr_step": gwpr_step,
    "recovery_mapless": recovery_mapless,
}


def kernel_cost(name: str, args: tuple, kwargs: dict, out: object) -> KernelCost:
    """The cost of the ``atedm`` op ``name`` called with ``args`` and ``kwargs``; an op without a formula is refused.

    Refused rather than priced from its tensors alone: that would miss what the kernel re-reads and computes.
    """
    if name not in KERNEL_COSTS:
        raise NotImplementedError(f"torch.ops.atedm.{name} has no cost formula in atedm_export/kernels/costs.py")
    return KERNEL_COSTS[name](*args, **kwargs, out=out)
