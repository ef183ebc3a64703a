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

from .outputs import OUTPUTS, allocate
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

    return triton_kernels.run("attention_lse", q, k, v, scale)



@torch.library.custom_op("atedm::head_mean_map", mutates_args=())
def head_mean_map(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = mean_h exp(q_h·k_hᵀ·scale − lse_h)`` ``[B, N, M]`` fp32 and its column sums per row tile ``[B, T, M]``
    (``tiles.row_tiles``), each divided by N: summed over T, G-WPR's first step ``(1/N)·1ᵀA``."""
    require_runnable(q.device)
    from . import triton_kernels

    return triton_kernels.run("head_mean_map", q, k, lse, scale)



@torch.library.custom_op("atedm::select_kept", mutates_args=())
def select_kept(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` highest-scoring tokens ``[B, keep]`` (fp32 ``scores`` ``[B, N]``) in index order (ties to the lower
    index, the set of ``select.topk_keep_indices``) and each token's slot ``[B, N]``, −1 where it is pruned. One
    kernel finds the k-th largest itself: no ``TopK`` before it, so no limit on ``keep`` (TensorRT's is 3840)."""
    require_runnable(scores.device)
    from . import triton_kernels

    return triton_kernels.run("select_kept", scores, keep)



@torch.library.custom_op("atedm::recovery_sources", mutates_args=())
def recovery_sources(attn_map: torch.Tensor, kept: torch.Tensor, slot_of: torch.Tensor) -> torch.Tensor:
    """Each position's source slot ``argmax_{j} A[i, kept[j]]`` ``[B, N]``, a kept position its own slot (``slot_of``)."""
    require_runnable(attn_map.device)
    from . import triton_kernels

    return triton_kernels.run("recovery_sources", attn_map, kept, slot_of)



@torch.library.custom_op("atedm::gwpr_step", mutates_args=())
def gwpr_step(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scores: torch.Tensor, scale: float) -> torch.Tensor:
    """Each head's G-WPR step ``s·A_h`` ``[B, H, M]`` of the map ``q``, ``k`` and lse define, with no map in memory:
    their mean over the heads is the head-mean map's step."""
    require_runnable(q.device)
    from . import triton_kernels

    return triton_kernels.run("gwpr_step", q, k, lse, scores, scale)



@torch.library.custom_op("atedm::recovery_mapless", mutates_args=())
def recovery_mapless(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, kept: torch.Tensor, slot_of: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """``recovery_sources`` of the map ``q``, ``k`` and lse define, computed for the kept keys only."""
    require_runnable(q.device)
    from . import triton_kernels

    return triton_kernels.run("recovery_mapless", q, k, lse, kept, slot_of, scale)



def _register_fake(name: str) -> None:
    """The op's fake implementation: empty tensors of ``OUTPUTS``' shapes, on the inputs' device."""
    def fake(*args: object) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outs = allocate(name, args)
        return outs[0] if len(outs) == 1 else outs

    torch.library.register_fake(f"atedm::{name}", fake)


for _name in OUTPUTS:
    _register_fake(_name)


def arguments(name: str) -> list[tuple[str, str]]:
    """Op ``name``'s arguments in order, each (name, type): ``Tensor`` for an input (a node's input), ``float`` or
    ``int`` for a scalar (a node's attribute). The one reading of the ops' schemas the graph nodes, onnxruntime's
    Python ops and the TensorRT plugins share."""
    schema = getattr(torch.ops.atedm, name).default._schema
    return [(argument.name, str(argument.type)) for argument in schema.arguments]


def tensor_and_scalar_names(name: str) -> tuple[list[str], list[str]]:
    """Op ``name``'s tensor inputs and its scalars, by name, each in order."""
    listed = arguments(name)
    return [n for n, kind in listed if kind == "Tensor"], [n for n, kind in listed if kind != "Tensor"]


def probe_arguments(name: str, dtype: torch.dtype) -> list[torch.Tensor | float | int]:
    """Stand-ins for op ``name``'s arguments, projections in ``dtype``: meta tensors of consistent shapes (any) and
    scalars of the right type. What registering the op elsewhere needs: its inputs' and outputs' types, their count."""
    return [_probe(argument, dtype) for argument, _ in arguments(name)]


def _probe(argument: str, dtype: torch.dtype) -> torch.Tensor | float | int:
    """A stand-in for one argument of an op (by its name in the schema) whose projections are ``dtype``: meta
    tensors of the right dtype (the shapes are any consistent ones), or a scalar of the right type."""
    batch, tokens, heads, dim, keep = 1, 4, 1, 8, 2
    projections = torch.empty(batch, tokens, heads, dim, dtype=dtype, device="meta")
    probes = {"q": projections, "k": projections, "v": projections, "scale": 1.0, "keep": keep,
              "lse": torch.empty(batch, heads, tokens, device="meta"),
              "scores": torch.empty(batch, tokens, device="meta"),
              "attn_map": torch.empty(batch, tokens, tokens, device="meta"),
              "kept": torch.empty(batch, keep, dtype=torch.int64, device="meta"),
              "slot_of": torch.empty(batch, tokens, dtype=torch.int64, device="meta")}
    return probes[argument]


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
