"""Attention in the forms the backends fuse, and the one attention that also pays for a map.

Every attention of an exported graph is written as ``explicit_attention``: ``q·√s`` and ``k·√s`` into
``MatMul → Softmax → MatMul`` over ``[B·heads, N, d]``, the head split as ``Reshape → Transpose →
Reshape``. TensorRT's fused-attention documentation asks for exactly this: the scale applied to Q and K
(or both by ``√s``) before the first product, and a softmax read by the second product only.
onnxruntime's UNet optimizer (``onnxruntime.transformers``, ``FusionAttentionUnet``) matches the same
ops with the scale after the first product (the form diffusers' ``AttnProcessor`` exports); ``ortfuse.py``
moves the scale there before it runs the optimizer. PyTorch's SDPA exports with ``√s`` computed from
shapes, which the graph cleaner folds into constants, after which neither optimizer's matcher applies.

``attn1`` of a pruned block's first layer also returns its head-combined probability map ``[B, N, M]``
(fp32). By default (``map_batch="head"``) the map is built one head at a time, so no ``[B, heads, N, M]``
fp32 tensor is ever held; ``map_batch="all"`` builds every head's map in one batched product (the same
values to rounding and far fewer ops, which a GPU engine pays per kernel: SDXL's main stage runs 2,445 kernels
instead of 3,048; for ``heads`` times the memory). Each head's
probabilities either also give that head's output (``map_output="reuse"``: no second
``q·kᵀ``) or the output runs through the fused attention (``"fused"``: the map path only reads ``q`` and
``k``; a GPU's fused kernel then never writes the output's map to memory).

The same layer also runs as the Triton kernels of ``atedm_export/kernels`` (``map_impl``, ``resolve_map_impl``):
one flash pass gives the output and each head's log-sum-exp, one more writes the head-mean map from the fp16
``q`` and ``k`` with G-WPR's first step beside it. An export always takes the explicit form above.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from ..errors import ModelError
from ..kernels import ops as kernel_ops  # noqa: F401 - registers torch.ops.atedm.* (no triton until they run)
from ..kernels.nodes import exporting_plugin_form, launch
from ..kernels.runnable import auto_takes_kernels, require_runnable
from .options import MapBatch

_STOCK_PROCESSORS = (AttnProcessor, AttnProcessor2_0)
HeadReduce = Literal["mean", "max"]
MapOutput = Literal["reuse", "fused"]
MapPath = Literal["explicit", "kernels"]  # what map_impl resolves to for a call (auto is no path)


def explicit_attention(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``softmax(q·kᵀ·scale)·v`` for ``[B, N, heads·d]`` projections, in the fusable form (module docstring)."""
    q, k, v = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
    root = attn.scale**0.5
    probs = ((q * root) @ (k * root).transpose(-1, -2)).softmax(dim=-1)
    return attn.batch_to_head_dim(probs @ v)


def fused_attention(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The same attention as one kernel: SDPA when run, ``explicit_attention`` when exported (for the fusers)."""
    if torch.onnx.is_in_onnx_export():
        return explicit_attention(attn, query, key, value)
    batch, tokens, inner = query.shape
    head_dim = inner // attn.heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(split(query), split(key), split(value), scale=attn.scale)
    return out.transpose(1, 2).reshape(batch, tokens, inner)


def _is_plain(attn: Attention, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """True where ``explicit_attention`` is exactly what the stock processor computes."""
    extras = (attn.norm_q, attn.norm_k, attn.norm_cross, attn.group_norm, attn.spatial_norm)
    return (hidden.ndim == 3 and attention_mask is None and all(e is None for e in extras)
            and not attn.residual_connection and attn.rescale_output_factor == 1.0)


class FusableAttnProcessor:
    """diffusers' attention as ``fused_attention`` (explicit in an export); the stock processor's elsewhere."""

    def __init__(self) -> None:
        self._stock = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: object, **kwargs: object) -> torch.Tensor:
        if not _is_plain(attn, hidden_states, attention_mask):
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out = fused_attention(attn, attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context))
        return attn.to_out[1](attn.to_out[0](out))


@contextlib.contextmanager
def fusable_attention(unet: torch.nn.Module) -> Iterator[None]:
    """Every stock attention of ``unet`` in the fusable form for the ``with`` body (an export), then as before."""
    saved = {name: module.processor for name, module in unet.named_modules() if isinstance(module, Attention)}
    try:
        for name, module in unet.named_modules():
            if isinstance(module, Attention) and isinstance(module.processor, _STOCK_PROCESSORS):
                module.set_processor(FusableAttnProcessor())
        yield
    finally:
        for name, module in unet.named_modules():
            if name in saved:
                module.set_processor(saved[name])


def attention_with_map(
    attn: Attention, hidden: torch.Tensor, context: torch.Tensor | None = None,
    heads: HeadReduce = "mean", map_output: MapOutput = "reuse", pool: int = 1, grid: tuple[int, int] | None = None,
    batch: MapBatch = "head",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``attn`` as its stock processor would; also return its fp32 probabilities combined over heads.

    ``heads="mean"`` averages the rows (still stochastic); ``"max"`` takes the strongest head per edge and
    renormalizes the rows, so the map stays a transition matrix. ``pool`` > 1 (an approximation, with the
    output ``fused``): the map's rows are the queries averaged over ``pool×pool`` patches of the token
    ``grid`` (height, width), a ``[B, N/pool², M]`` map that costs ``pool²`` times less to build and read.
    ``batch``: each head's map in turn (``head``) or all at once (``all``), the module docstring's trade.
    """
    if pool > 1 and map_output != "fused":
        raise ValueError("a pooled map has no row per query to take the output from: use map_output 'fused'")
    if heads not in ("mean", "max"):
        raise ValueError(f"head reduction must be 'mean' or 'max', got {heads!r}")
    context = hidden if context is None else context
    query, key, value = attn.to_q(hidden), attn.to_k(context), attn.to_v(context)
    batch_size, tokens, inner = query.shape
    head_dim = inner // attn.heads
    # The logits themselves in fp32, not only the softmax: fp16 rounding of q·kᵀ differs between
    # backends (torch CPU, onnxruntime, TensorRT), and near-equal G-WPR scores then keep other tokens.
    q32 = (query.float() * attn.scale).view(batch_size, tokens, attn.heads, head_dim)
    if pool > 1:
        q32 = pool_grid(q32, grid, pool, dim=1)
    k32 = key.float().view(batch_size, -1, attn.heads, head_dim)
    # reuse: each head's fp32 map times v in fp32, so the [B, N, M] map is never cast (a full pass over it)
    v32 = value.float().view(batch_size, -1, attn.heads, head_dim) if map_output == "reuse" else None
    if batch == "all":
        combined, out = _all_heads_map(q32, k32, v32, heads)
    elif batch == "head":
        combined, out = _each_heads_map(q32, k32, v32, heads)
    else:
        raise ValueError(f"map batch must be 'head' or 'all', got {batch!r}")
    if heads == "max":
        combined = combined / combined.sum(dim=-1, keepdim=True)
    if map_output == "reuse":
        out = out.to(value.dtype)
    elif map_output == "fused":
        out = fused_attention(attn, query, key, value)
    else:
        raise ValueError(f"map output must be 'reuse' or 'fused', got {map_output!r}")
    return attn.to_out[1](attn.to_out[0](out)), combined


def _each_heads_map(q32: torch.Tensor, k32: torch.Tensor, v32: torch.Tensor | None,
                    heads: HeadReduce) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head-combined map (``max``: not yet renormalized) and, given ``v32``, the fp32 output ``[B, N, H·d]``,
    one head's ``[B, N, M]`` map at a time: the least memory."""
    combined, outs = None, []
    for h in range(q32.shape[2]):
        probs = (q32[:, :, h] @ k32[:, :, h].transpose(-1, -2)).softmax(dim=-1)  # [B, N, M], this head only
        if v32 is not None:
            outs.append(probs @ v32[:, :, h])
        combined = probs if combined is None else (combined + probs if heads == "mean" else torch.maximum(combined, probs))
    if heads == "mean":
        combined = combined / q32.shape[2]
    return combined, torch.cat(outs, dim=-1) if v32 is not None else None


#: The most fp32 map bytes ``map_batch="all"`` puts in one product: SDXL's 64×64 blocks at 1024² and batch 2 take
#: all 10 heads at once (1.3 GB), its 2048² blocks (2.1 GB a head) one at a time, as ``head`` does.
MAP_BATCH_BYTES = 2 << 30


def _all_heads_map(q32: torch.Tensor, k32: torch.Tensor, v32: torch.Tensor | None,
                   heads: HeadReduce) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``_each_heads_map`` with the heads' maps in ``[B, g, N, M]`` products, softmaxes and reductions: all ``H``
    heads in one where their maps take at most ``MAP_BATCH_BYTES``, else groups of as many as fit."""
    batch, tokens, count, _ = q32.shape
    per_head = batch * tokens * k32.shape[1] * 4
    group = max(1, min(count, MAP_BATCH_BYTES // per_head))
    q, k = q32.transpose(1, 2), k32.transpose(1, 2)  # [B, H, N, d], [B, H, M, d]
    v = v32.transpose(1, 2) if v32 is not None else None
    spans = [slice(None)] if group == count else [slice(start, start + group) for start in range(0, count, group)]
    combined, outs = None, []
    for span in spans:  # one span, the whole head axis, where all fit: no slicing in the graph
        probs = (q[:, span] @ k[:, span].transpose(-1, -2)).softmax(dim=-1)
        part = probs.amax(dim=1) if heads == "max" else probs.mean(dim=1) if len(spans) == 1 else probs.sum(dim=1)
        combined = part if combined is None else (combined + part if heads == "mean" else torch.maximum(combined, part))
        if v is not None:
            outs.append(probs @ v[:, span])  # [B, g, N, d]
    if heads == "mean" and len(spans) > 1:
        combined = combined / count  # the groups' sums, then one division: the mean of all heads
    if v is None:
        return combined, None
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return combined, out.transpose(1, 2).reshape(batch, tokens, -1)


def resolve_map_impl(choice: str, heads: HeadReduce, pool: int, x: torch.Tensor) -> MapPath:
    """The map layer's implementation for tensors like ``x`` under the option ``map_impl=choice``.

    An ONNX export is ``explicit`` (the portable form: standard ops), except the plugin form's, which writes the
    kernels as ``atedm`` nodes wherever they compute the options' map, whatever ``map_impl`` says for eager runs
    (``kernels/nodes.py``); ``kernels`` where the kernels cannot run on ``x``'s device is a one-line
    ``KernelUnavailable``; ``auto`` takes the kernels on CUDA tensors where they compute the options' map (head
    mean, no pooling) and triton is installed, the explicit path elsewhere.
    """
    if torch.onnx.is_in_onnx_export():
        return "kernels" if exporting_plugin_form() and heads == "mean" and pool == 1 else "explicit"
    if choice == "explicit":
        return "explicit"
    if choice == "kernels":
        require_runnable(x.device)
        return "kernels"
    return "kernels" if heads == "mean" and pool == 1 and auto_takes_kernels(x.device) else "explicit"


@dataclass(frozen=True)
class SelfMap:
    """The first layer's self-attention map as the map layer's implementation holds it.

    ``attn_map``: the head-combined map ``[B, N, M]`` (fp32), from the explicit path or the map kernel, which also
    sums G-WPR's first step from uniform scores as it writes the map (``first_step``, ``[B, M]``). Where the
    kernels write no map (``kernels.ops.materializes``), ``factors`` are what define it: ``q``, ``k``
    (``[B, N, H, d]`` views of the projections), each head's log-sum-exp ``[B, H, N]`` and the scale.
    """

    attn_map: torch.Tensor | None
    first_step: torch.Tensor | None = None
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None
    kernels: bool = False


def attention_with_map_kernels(attn: Attention, hidden: torch.Tensor) -> tuple[torch.Tensor, SelfMap]:
    """``attention_with_map``'s self-attention (head mean, no pooling) on the kernels: the output, and the map
    (with G-WPR's first step) where it fits, else its factors."""
    query, key, value = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
    batch, tokens, inner = query.shape
    split = (batch, -1, attn.heads, inner // attn.heads)  # views of the projections: the kernels read them strided
    q, k, v = query.view(split), key.view(split), value.view(split)
    out, lse = launch.attention_lse(q, k, v, attn.scale)
    out = attn.to_out[1](attn.to_out[0](out.reshape(batch, tokens, inner)))
    if not kernel_ops.materializes(batch, tokens, k.shape[1]):
        return out, SelfMap(None, factors=(q, k, lse, attn.scale), kernels=True)
    attn_map, column_sums = launch.head_mean_map(q, k, lse, attn.scale)
    return out, SelfMap(attn_map, column_sums.sum(dim=1), kernels=True)


def pool_grid(x: torch.Tensor, grid: tuple[int, int] | None, pool: int, dim: int, how: str = "mean") -> torch.Tensor:
    """Average (or sum) ``x``'s token axis ``dim`` (a row-major ``grid``) over ``pool×pool`` patches."""
    if grid is None or grid[0] % pool or grid[1] % pool:
        raise ValueError(f"pooling by {pool} needs a token grid divisible by it, got {grid}")
    height, width = grid
    shape = (*x.shape[:dim], height // pool, pool, width // pool, pool, *x.shape[dim + 1:])
    patches = x.reshape(shape)
    reduced = patches.mean(dim=(dim + 1, dim + 3)) if how == "mean" else patches.sum(dim=(dim + 1, dim + 3))
    return reduced.reshape(*x.shape[:dim], -1, *x.shape[dim + 1:])


def check_supported(name: str, block: Transformer2DModel) -> None:
    """Refuse, with the reason, a block whose first layer ``attention_with_map`` would not reproduce."""
    if not block.is_input_continuous:
        raise ModelError(f"attention block {name} does not take continuous (image) input; AT-EDM needs the continuous-input blocks of SD 1.x/2.x and SDXL")
    first = block.transformer_blocks[0]
    if not isinstance(first, BasicTransformerBlock) or first.norm_type != "layer_norm":
        raise ModelError(f"attention block {name}: first layer is not a layer-norm BasicTransformerBlock")
    if first.pos_embed is not None or first.only_cross_attention or first.attn2 is None:
        raise ModelError(f"attention block {name}: first layer needs self-attention then cross-attention, no pos_embed")
    for label, attn in (("attn1", first.attn1), ("attn2", first.attn2)):
        if not isinstance(attn.processor, (*_STOCK_PROCESSORS, FusableAttnProcessor)):
            raise ModelError(
                f"attention block {name}: {label} uses {type(attn.processor).__name__}; "
                "AT-EDM needs the stock AttnProcessor (remove LoRA/IP-adapter processors first)"
            )
        extras = (attn.norm_q, attn.norm_cross, attn.group_norm, attn.spatial_norm)
        if any(e is not None for e in extras) or attn.residual_connection or attn.rescale_output_factor != 1.0:
            raise ModelError(f"attention block {name}: {label} uses norms or rescaling AT-EDM does not reproduce")
