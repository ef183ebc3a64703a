"""Apply AT-EDM to a diffusers UNet for one stage plan, and remove it again (tomesd-style).

Each pruned ``Transformer2DModel`` has its class swapped for a subclass whose ``forward`` runs

1. the first transformer layer on all N tokens, its self-attention also yielding the attention map;
2. G-WPR over that map and rank-based top-k: ``k`` static kept tokens per batch item;
3. the remaining layers on the ``[B, k, C]`` kept tokens (cross-attention and feed-forward included);
4. ``proj_out`` on the k tokens and recovery to ``[B, N, C]`` by similarity copy (or skip);
5. the block's residual, as the stock block does.

The keep count is a Python int, so every shape in the pruned path is static and the module exports
to a fixed graph. Weights are never touched: removing the patch restores the stock module exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from ..errors import PlanError
from .attention import HeadReduce, MapOutput, attention_with_map, check_supported
from .gwpr import cross_gwpr_scores, gwpr_scores, pooled_gwpr_scores
from .recover import Recovery, copy_recover, recovery_sources, skip_recover
from .select import Selection, gather_tokens, select_tokens

PrunePoint = Literal["layer", "attn1"]
Importance = Literal["self", "cross"]


def default_prune_point(importance: str, recovery: str) -> PrunePoint:
    """``attn1`` where it gives the same output as ``layer`` (copy recovery, self-attention importance)."""
    return "attn1" if recovery == "copy" and importance == "self" else "layer"


def default_map_output(map_pool: int) -> MapOutput:
    """``reuse`` where each query has its map row (no second ``q·kᵀ``); a pooled map has none: ``fused``."""
    return "reuse" if map_pool == 1 else "fused"


@dataclass(frozen=True)
class PruneOptions:
    """The choices the paper leaves open, each with the default AT-EDM uses.

    ``prune_point``: prune right after the first layer's self-attention (``attn1``, the default) or after
    its feed-forward (``layer``, the paper's wording). Under copy recovery with self-attention importance
    both give the same output (the cross-attention and feed-forward act per token, and a pruned token
    takes a kept token's output), and ``attn1`` runs them on k tokens only; in one-layer blocks (SD 1.x/2.x)
    it is the only point that saves anything. ``importance``: rank with the self-attention map (``self``,
    the paper's choice) or the cross-attention map to the text (``cross``, needs ``prune_point=layer``
    because the cross-attention runs after ``attn1``).

    How the map layer is computed (each choice keeps the same tokens): ``selection``: ``TopK`` where k is
    within TensorRT's limit, rank-by-comparison above it (``auto``), or one of them always (``select.py``);
    ``map_output``: the map layer's output from each head's map (``reuse``: no second ``q·kᵀ``) or through
    the fused attention (``fused``: what a GPU's flash kernel runs without writing a map; ``attention.py``).
    ``map_pool`` > 1 is an approximation, never the default: the map's queries pooled over patches of
    ``map_pool×map_pool`` tokens (``gwpr.pooled_gwpr_scores``), a map ``map_pool²`` times cheaper.
    """

    iterations: int = 5
    heads: HeadReduce = "mean"
    damping: float = 1.0
    importance: Importance = "self"
    prune_point: PrunePoint | None = None  # None: attn1 where it is exact (copy recovery, self importance), else layer
    recovery: Recovery = "copy"
    selection: Selection = "auto"
    map_output: MapOutput | None = None  # None: reuse where the map has a row per query (map_pool 1), else fused
    map_pool: int = 1

    def __post_init__(self) -> None:
        if self.prune_point is None:
            object.__setattr__(self, "prune_point", default_prune_point(self.importance, self.recovery))
        if self.map_output is None:
            object.__setattr__(self, "map_output", default_map_output(self.map_pool))
        if self.map_pool not in (1, 2, 4):
            raise PlanError(f"map_pool must be 1, 2 or 4, got {self.map_pool}")
        if self.map_pool > 1 and (self.map_output != "fused" or self.importance != "self"):
            raise PlanError("map_pool > 1 needs map_output 'fused' and importance 'self' (a pooled map has no row per query)")
        if self.iterations < 1:
            raise PlanError(f"G-WPR iterations must be >= 1, got {self.iterations}")
        if not 0.0 < self.damping <= 1.0:
            raise PlanError(f"G-WPR damping must be in (0, 1], got {self.damping}")
        if self.importance == "cross" and self.prune_point != "layer":
            raise PlanError("importance 'cross' needs prune_point 'layer' (cross-attention runs after attn1)")


@dataclass(frozen=True)
class StagePlan:
    """What one static graph prunes: the keep count of each pruned block (blocks not named run stock).

    ``tokens``: each block's token count at the resolution the plan was made for. Where given, a call at
    another resolution is refused: the same keep count would keep another fraction of the tokens.
    """

    keep: Mapping[str, int] = field(default_factory=dict)
    options: PruneOptions = PruneOptions()
    tokens: Mapping[str, int] = field(default_factory=dict)


_ATTR = "_atedm"
_PATCHED: dict[type, type] = {}


@dataclass(frozen=True)
class _BlockState:
    name: str
    keep: int
    options: PruneOptions
    base: type
    tokens: int | None  # what the plan was made for; None: any resolution


def _patched_class(base: type) -> type:
    """One subclass per stock class, created once, so isinstance checks in diffusers still hold."""
    if base not in _PATCHED:
        _PATCHED[base] = type(f"ATEDM{base.__name__}", (base,), {"forward": _atedm_forward})
    return _PATCHED[base]


def transformer_blocks(unet: torch.nn.Module) -> dict[str, Transformer2DModel]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, Transformer2DModel)}


def apply_atedm(unet: UNet2DConditionModel, plan: StagePlan) -> UNet2DConditionModel:
    """Prune the blocks the plan names; blocks it does not name run stock. Applying again replaces the plan."""
    blocks = transformer_blocks(unet)
    unknown = sorted(set(plan.keep) - set(blocks))
    if unknown:
        raise PlanError(f"unknown attention block {unknown[0]!r}; the UNet has: {', '.join(blocks)}")
    for name, keep in plan.keep.items():
        if not isinstance(keep, int) or keep < 1:
            raise PlanError(f"keep count for {name} must be a positive integer, got {keep!r}")
        check_supported(name, blocks[name])
    remove_atedm(unet)
    for name, keep in plan.keep.items():
        block = blocks[name]
        setattr(block, _ATTR, _BlockState(name, keep, plan.options, type(block), plan.tokens.get(name)))
        block.__class__ = _patched_class(type(block))
    return unet


def remove_atedm(unet: torch.nn.Module) -> torch.nn.Module:
    """Restore every patched block to its stock class; a no-op on an unpatched UNet."""
    for block in transformer_blocks(unet).values():
        state: _BlockState | None = getattr(block, _ATTR, None)
        if state is not None:
            block.__class__ = state.base
            delattr(block, _ATTR)
    return unet


def set_plan(unet: UNet2DConditionModel, plan: StagePlan | None) -> UNet2DConditionModel:
    """Run ``unet`` on ``plan`` from now on; ``None`` (or a plan that prunes nothing) is the stock UNet."""
    return apply_atedm(unet, plan) if plan is not None and plan.keep else remove_atedm(unet)


@contextlib.contextmanager
def planned(unet: UNet2DConditionModel, plan: StagePlan | None) -> Iterator[UNet2DConditionModel]:
    """``unet`` on ``plan`` for the ``with`` body, stock again afterwards (also on errors)."""
    set_plan(unet, plan)
    try:
        yield unet
    finally:
        remove_atedm(unet)


def patched_blocks(unet: torch.nn.Module) -> dict[str, int]:
    """Keep count of each currently patched block."""
    return {n: getattr(m, _ATTR).keep for n, m in transformer_blocks(unet).items() if hasattr(m, _ATTR)}


def _cross_and_ff(layer: torch.nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The second half of a layer-norm ``BasicTransformerBlock``: cross-attention, then feed-forward."""
    x = layer.attn2(layer.norm2(x), encoder_hidden_states=context) + x
    return layer.ff(layer.norm3(x)) + x


def _self_scores(self_map: torch.Tensor, opts: PruneOptions, grid: tuple[int, int]) -> torch.Tensor:
    if opts.map_pool == 1:
        return gwpr_scores(self_map, opts.iterations, opts.damping)
    return pooled_gwpr_scores(self_map, grid, opts.map_pool, opts.iterations, opts.damping)


def _map_rows(grid: tuple[int, int], pool: int, device: torch.device) -> torch.Tensor | None:
    """The pooled map's row of each token (its patch), or None where the map has a row per token."""
    if pool == 1:
        return None
    height, width = grid
    index = torch.arange(height * width, device=device)
    return (index // width // pool) * (width // pool) + (index % width) // pool


def _atedm_forward(
    self: Transformer2DModel,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    timestep: torch.Tensor | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    class_labels: torch.Tensor | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    attention_mask: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    return_dict: bool = True,
) -> Transformer2DModelOutput | tuple[torch.Tensor]:
    state: _BlockState = getattr(self, _ATTR)
    opts = state.options
    if attention_mask is not None or encoder_attention_mask is not None:
        raise PlanError("AT-EDM blocks do not take attention masks (the stock SD and SDXL pipelines pass none)")
    batch, _, height, width = hidden_states.shape
    if state.tokens is not None and state.tokens != height * width:
        raise PlanError(
            f"the plan keeps {state.keep} of {state.name}'s {state.tokens} tokens, but this call gives the block "
            f"{height}x{width} = {height * width}: make the plan at the resolution the UNet runs at"
        )
    if state.keep > height * width:
        raise PlanError(f"keep count {state.keep} exceeds the block's {height * width} tokens")
    residual = hidden_states
    tokens, inner_dim = self._operate_on_continuous_inputs(hidden_states)
    first, rest = self.transformer_blocks[0], self.transformer_blocks[1:]

    grid = (height, width)
    attn_out, self_map = attention_with_map(first.attn1, first.norm1(tokens), None, opts.heads, opts.map_output,
                                            opts.map_pool, grid)
    block_input, tokens = tokens, attn_out + tokens
    if opts.prune_point == "layer":
        if opts.importance == "cross":
            normed = first.norm2(tokens)
            cross_out, cross_map = attention_with_map(first.attn2, normed, encoder_hidden_states, opts.heads)
            tokens = cross_out + tokens
            tokens = first.ff(first.norm3(tokens)) + tokens
            scores = cross_gwpr_scores(cross_map, opts.iterations)
        else:
            tokens = _cross_and_ff(first, tokens, encoder_hidden_states)
            scores = _self_scores(self_map, opts, grid)
    else:
        scores = _self_scores(self_map, opts, grid)
    rows = _map_rows(grid, opts.map_pool, hidden_states.device)

    kept = select_tokens(scores, state.keep, opts.selection)
    if opts.prune_point == "attn1":
        # The residual added after the gather (the same sum, on k tokens): the cross-attention's LayerNorm then
        # reads an Add, the form onnxruntime's optimizer fuses (after a Gather it leaves the attention unfused).
        x = gather_tokens(attn_out, kept) + gather_tokens(block_input, kept)
        x = _cross_and_ff(first, x, encoder_hidden_states)
    else:
        x = gather_tokens(tokens, kept)
    for layer in rest:
        x = layer(x, encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs)

    if opts.recovery == "copy" and self.use_linear_projection:
        # proj_out is per token: run it on the k kept tokens, then copy into the N positions.
        out = copy_recover(self.proj_out(x), recovery_sources(self_map, kept, rows))
        out = out.reshape(batch, height, width, inner_dim).permute(0, 3, 1, 2).contiguous() + residual
    else:
        full = copy_recover(x, recovery_sources(self_map, kept, rows)) if opts.recovery == "copy" else skip_recover(tokens, x, kept)
        out = self._get_output_for_continuous_inputs(full, residual, batch, height, width, inner_dim)
    return Transformer2DModelOutput(sample=out) if return_dict else (out,)
