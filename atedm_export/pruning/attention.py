"""The one attention that pays for an explicit probability map: ``attn1`` of a block's first layer.

Every other attention keeps diffusers' fused kernel. Here the softmax runs in fp32 so the map that
ranks and matches tokens is the same whether the model runs in fp32, fp16 or bf16.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from ..errors import ModelError

_STOCK_PROCESSORS = (AttnProcessor, AttnProcessor2_0)


def attention_with_map(
    attn: Attention, hidden: torch.Tensor, context: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``attn`` as its stock processor would and also return the fp32 probabilities ``[B, heads, N, M]``."""
    context = hidden if context is None else context
    query, key, value = attn.to_q(hidden), attn.to_k(context), attn.to_v(context)
    batch, tokens, inner = query.shape
    heads = attn.heads
    head_dim = inner // heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, -1, heads, head_dim).transpose(1, 2)

    query, key, value = split(query), split(key), split(value)
    # The logits themselves in fp32, not only the softmax: fp16 rounding of q·kᵀ differs between
    # backends (torch CPU, onnxruntime, TensorRT), and near-equal G-WPR scores then keep other tokens.
    logits = (query.float() * attn.scale) @ key.float().transpose(-1, -2)
    probs = logits.softmax(dim=-1)
    out = (probs.to(value.dtype) @ value).transpose(1, 2).reshape(batch, tokens, inner)
    out = attn.to_out[1](attn.to_out[0](out))
    return out, probs


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
        if not isinstance(attn.processor, _STOCK_PROCESSORS):
            raise ModelError(
                f"attention block {name}: {label} uses {type(attn.processor).__name__}; "
                "AT-EDM needs the stock AttnProcessor (remove LoRA/IP-adapter processors first)"
            )
        extras = (attn.norm_q, attn.norm_cross, attn.group_norm, attn.spatial_norm)
        if any(e is not None for e in extras) or attn.residual_connection or attn.rescale_output_factor != 1.0:
            raise ModelError(f"attention block {name}: {label} uses norms or rescaling AT-EDM does not reproduce")
