"""What every method's block forward shares: the stock block's way in and out, and the per-layer sublayers.

A pruned ``Transformer2DModel`` runs the stock prologue (norm, ``proj_in``, tokens ``[B, N, C]``), its method's
layers, and the stock epilogue (``proj_out``, back to the ``[B, C, H, W]`` map, the residual). Only the middle
differs between methods, so each method's forward reads like the paper's description of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from ..errors import PlanError


@dataclass(frozen=True)
class BlockState:
    """What a patched block remembers: its name, keep count, method options, stock class and planned size."""

    name: str
    keep: int
    options: Any  # the method's option model (options.py)
    base: type
    tokens: int | None  # what the plan was made for; None: any resolution


@dataclass(frozen=True)
class BlockCall:
    """The arguments of one ``Transformer2DModel`` call that a method's forward reads."""

    hidden_states: torch.Tensor  # [B, C, H, W]
    encoder_hidden_states: torch.Tensor | None
    cross_attention_kwargs: dict[str, Any] | None = None
    attention_mask: torch.Tensor | None = None
    encoder_attention_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class BlockInput:
    """The block's input as tokens, with what the epilogue needs to rebuild the feature map."""

    tokens: torch.Tensor  # [B, N, C] after proj_in
    residual: torch.Tensor  # [B, C, H, W] the block's input
    inner_dim: int

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.residual.shape[2:])  # type: ignore[return-value]


def open_block(block: Transformer2DModel, state: BlockState, call: BlockCall) -> BlockInput:
    """Refuse what the plan cannot serve (masks, another resolution, too few tokens), then the stock prologue."""
    hidden_states = call.hidden_states
    if call.attention_mask is not None or call.encoder_attention_mask is not None:
        raise PlanError("pruned blocks do not take attention masks (the stock SD and SDXL pipelines pass none)")
    _, _, height, width = hidden_states.shape
    if state.tokens is not None and state.tokens != height * width:
        raise PlanError(
            f"the plan keeps {state.keep} of {state.name}'s {state.tokens} tokens, but this call gives the block "
            f"{height}x{width} = {height * width}: make the plan at the resolution the UNet runs at"
        )
    if state.keep > height * width:
        raise PlanError(f"keep count {state.keep} exceeds the block's {height * width} tokens")
    tokens, inner_dim = block._operate_on_continuous_inputs(hidden_states)
    return BlockInput(tokens, hidden_states, inner_dim)


def close_block(block: Transformer2DModel, tokens: torch.Tensor, given: BlockInput) -> torch.Tensor:
    """The stock epilogue on full ``[B, N, C]`` tokens: ``proj_out``, back to the map, plus the residual."""
    batch, _, height, width = given.residual.shape
    return block._get_output_for_continuous_inputs(tokens, given.residual, batch, height, width, given.inner_dim)


def cross_and_ff(layer: torch.nn.Module, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """The second half of a layer-norm ``BasicTransformerBlock``: cross-attention, then feed-forward."""
    x = layer.attn2(layer.norm2(x), encoder_hidden_states=context) + x
    return layer.ff(layer.norm3(x)) + x
