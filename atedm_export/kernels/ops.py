"""The map layer's kernels as torch custom ops (``torch.ops.atedm.*``), so CUDA graphs and ``torch.compile`` take
the pruned UNet: each op is opaque to the compiler and has a fake (meta) implementation that gives its outputs'
shapes, which ``torch.compile``, ``torch.export`` and the cost model (on the ``meta`` device) run instead.

Triton is imported when an op first runs, not when this module is imported: the explicit path, the exporter
and the cost model never need it. On CUDA the output and log-sum-exp come from PyTorch's own flash attention
(``aten._scaled_dot_product_flash_attention``, which returns the log-sum-exp) where it takes the inputs (fp16 or
bf16, head dim a multiple of 8 up to 256), else from the Triton flash kernel, which is also what Triton's
interpreter runs on CPU tensors.
"""

from __future__ import annotations

import torch

from .runnable import require_runnable


@torch.library.custom_op("atedm::attention_lse", mutates_args=())
def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q·kᵀ·scale)·v`` ``[B, N, H, d]`` and each head's log-sum-exp ``[B, H, N]`` (fp32), one pass."""
    require_runnable(q.device)
    if _takes_aten_flash(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)[:2]
        return out.transpose(1, 2).contiguous(), lse[..., : q.shape[1]].float().contiguous()
    from . import triton_kernels

    return triton_kernels.attention_lse(q, k, v, scale)


@attention_lse.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, tokens, heads, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((batch, heads, tokens), dtype=torch.float32)


@torch.library.custom_op("atedm::head_mean_map", mutates_args=())
def head_mean_map(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = mean_h exp(q_h·k_hᵀ·scale − lse_h)`` ``[B, N, M]`` fp32 and G-WPR's first step ``(1/N)·1ᵀA`` ``[B, M]``."""
    require_runnable(q.device)
    from . import triton_kernels

    return triton_kernels.head_mean_map(q, k, lse, scale)


@head_mean_map.register_fake
def _(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, tokens, _, _ = q.shape
    keys = k.shape[1]
    return q.new_empty((batch, tokens, keys), dtype=torch.float32), q.new_empty((batch, keys), dtype=torch.float32)


@torch.library.custom_op("atedm::select_kept", mutates_args=())
def select_kept(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` highest-scoring tokens ``[B, keep]`` in index order (ties to the lower index, the set of
    ``select.topk_keep_indices``) and each token's slot ``[B, N]``, −1 where it is pruned."""
    require_runnable(scores.device)
    from . import triton_kernels

    return triton_kernels.select(scores, keep)


@select_kept.register_fake
def _(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    return scores.new_empty((scores.shape[0], keep), dtype=torch.int64), scores.new_empty(scores.shape, dtype=torch.int64)


@torch.library.custom_op("atedm::recovery_sources", mutates_args=())
def recovery_sources(attn_map: torch.Tensor, kept: torch.Tensor, slot_of: torch.Tensor) -> torch.Tensor:
    """Each position's source slot ``argmax_{j} A[i, kept[j]]`` ``[B, N]``, a kept position its own slot (``slot_of``)."""
    require_runnable(attn_map.device)
    from . import triton_kernels

    return triton_kernels.recovery_sources(attn_map, kept, slot_of)


@recovery_sources.register_fake
def _(attn_map: torch.Tensor, kept: torch.Tensor, slot_of: torch.Tensor) -> torch.Tensor:
    return attn_map.new_empty(attn_map.shape[:2], dtype=torch.int64)


@torch.library.custom_op("atedm::gwpr_step", mutates_args=())
def gwpr_step(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scores: torch.Tensor, scale: float) -> torch.Tensor:
    """One G-WPR step ``s·A`` ``[B, M]`` of the head-mean map ``q``, ``k`` and lse define, with no map in memory."""
    require_runnable(q.device)
    from . import triton_kernels

    return triton_kernels.gwpr_step(q, k, lse, scores, scale)


@gwpr_step.register_fake
def _(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scores: torch.Tensor, scale: float) -> torch.Tensor:
    return q.new_empty((q.shape[0], k.shape[1]), dtype=torch.float32)


@torch.library.custom_op("atedm::recovery_mapless", mutates_args=())
def recovery_mapless(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, kept: torch.Tensor, slot_of: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """``recovery_sources`` of the map ``q``, ``k`` and lse define, computed for the kept keys only."""
    require_runnable(q.device)
    from . import triton_kernels

    return triton_kernels.recovery_mapless(q, k, lse, kept, slot_of, scale)


@recovery_mapless.register_fake
def _(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, kept: torch.Tensor, slot_of: torch.Tensor,
      scale: float) -> torch.Tensor:
    return q.new_empty(q.shape[:2], dtype=torch.int64)


def materializes(batch: int, tokens: int, keys: int) -> bool:
    """Whether the kernels write this layer's head-mean map (one ``q·kᵀ`` pass, then passes over the map) or keep
    none (one ``q·kᵀ`` pass per G-WPR step): the map while its fp32 bytes stay within ``MAP_BYTES_LIMIT``."""
    return 4 * batch * tokens * keys <= MAP_BYTES_LIMIT


#: The largest head-mean map the kernels write: 1 GiB. SDXL at 1024² (4096 tokens, batch 2) writes 128 MiB and
#: reads it four more times, cheaper than four more ``q·kᵀ`` passes (costs.py, docs/benchmarks.md); at 2048²
#: (16,384 tokens) or SD 1.5 at 1024² the map would be 2 GiB, and the mapless form keeps that memory free.
MAP_BYTES_LIMIT = 1 << 30


def _takes_aten_flash(q: torch.Tensor) -> bool:
    head_dim = q.shape[-1]
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256
