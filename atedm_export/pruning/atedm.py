"""AT-EDM's block forward: rank the tokens with G-WPR on the first layer's self-attention map, run the rest
of the block on the top k, and recover the pruned positions by similarity copy (or skip).

The pair a method is (``methods.py``): *select* is G-WPR plus static top-k and a gather of the kept tokens;
*restore* is one gather of ``[B, N]`` source slots read from the same attention map. Steps, in order:

1. the first transformer layer's self-attention on all N tokens, also yielding its attention map;
2. G-WPR over that map and top-k: ``k`` static kept tokens per batch item;
3. the remaining layers on the ``[B, k, C]`` kept tokens (cross-attention and feed-forward included);
4. ``proj_out`` on the k tokens and recovery to ``[B, N, C]`` by similarity copy (or skip);
5. the block's residual, as the stock block does.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from ..kernels.nodes import launch
from .attention import MapPath, SelfMap, attention_with_map, attention_with_map_kernels, resolve_map_impl
from .block import BlockCall, BlockState, close_block, cross_and_ff, open_block
from .gwpr import cross_gwpr_scores, gwpr_scores, mapless_gwpr_scores, pooled_gwpr_scores
from .options import AtedmOptions
from .recover import copy_recover, recovery_sources, skip_recover
from .select import gather_tokens, select_tokens


def map_scores(self_map: SelfMap, opts: AtedmOptions, grid: tuple[int, int]) -> torch.Tensor:
    if self_map.factors is not None:
        return mapless_gwpr_scores(*self_map.factors, opts.iterations, opts.damping)
    if opts.map_pool == 1:
        return gwpr_scores(self_map.attn_map, opts.iterations, opts.damping, self_map.first_step)
    return pooled_gwpr_scores(self_map.attn_map, grid, opts.map_pool, opts.iterations, opts.damping)


def select(self_map: SelfMap, scores: torch.Tensor, keep: int,
           opts: AtedmOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kept tokens ``[B, k]`` and, from the kernels' one-pass selection, each token's slot ``[B, N]`` (−1 where
    pruned; None on the explicit path, whose recovery finds the kept positions' slots itself)."""
    if self_map.kernels:
        return launch.select_kept(scores.float(), keep)  # the kernel finds the k-th largest: no TopK, no limit on k
    return select_tokens(scores, keep, opts.selection), None


def map_sources(self_map: SelfMap, kept: torch.Tensor, slot_of: torch.Tensor | None,
                rows: torch.Tensor | None) -> torch.Tensor:
    """Every position's recovery slot ``[B, N]``, read from the map in the form ``self_map`` holds it."""
    if self_map.factors is not None:
        q, k, lse, scale = self_map.factors
        return launch.recovery_mapless(q, k, lse, kept, slot_of, scale)
    if self_map.kernels:
        return launch.recovery_sources(self_map.attn_map, kept, slot_of)
    return recovery_sources(self_map.attn_map, kept, rows)


def self_attention_map(attn: Attention, hidden: torch.Tensor, opts: AtedmOptions, grid: tuple[int, int],
                       impl: MapPath) -> tuple[torch.Tensor, SelfMap]:
    """The first layer's self-attention output and its head-combined map, as ``impl`` computes them."""
    if impl == "kernels":
        return attention_with_map_kernels(attn, hidden)
    out, self_map = attention_with_map(attn, hidden, None, opts.heads, opts.map_output, opts.map_pool, grid,
                                       opts.map_batch)
    return out, SelfMap(self_map)


def map_layer(attn: Attention, hidden: torch.Tensor, keep: int, opts: AtedmOptions,
              grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The map layer alone, as ``atedm_block`` runs it under ``opts`` (self importance): the self-attention's
    output ``[B, N, C]``, the kept tokens ``[B, k]`` and every position's recovery slot ``[B, N]``.
    What ``tools/gpu_bench.py`` times beside SDPA and the kernel tests compare across ``map_impl``."""
    impl = resolve_map_impl(opts.map_impl, opts.heads, opts.map_pool, hidden)
    out, self_map = self_attention_map(attn, hidden, opts, grid, impl)
    kept, slot_of = select(self_map, map_scores(self_map, opts, grid), keep, opts)
    return out, kept, map_sources(self_map, kept, slot_of, _map_rows(grid, opts.map_pool, hidden.device))


def _map_rows(grid: tuple[int, int], pool: int, device: torch.device) -> torch.Tensor | None:
    """The pooled map's row of each token (its patch), or None where the map has a row per token."""
    if pool == 1:
        return None
    height, width = grid
    index = torch.arange(height * width, device=device)
    return (index // width // pool) * (width // pool) + (index % width) // pool


def atedm_block(block: Transformer2DModel, state: BlockState, call: BlockCall) -> Transformer2DModelOutput:
    """One AT-EDM block (module docstring); the keep count is a Python int, so every shape is static."""
    opts: AtedmOptions = state.options
    encoder_hidden_states = call.encoder_hidden_states
    given = open_block(block, state, call)
    tokens, grid = given.tokens, given.grid
    first, rest = block.transformer_blocks[0], block.transformer_blocks[1:]

    impl = resolve_map_impl(opts.map_impl, opts.heads, opts.map_pool, tokens)
    attn_out, self_map = self_attention_map(first.attn1, first.norm1(tokens), opts, grid, impl)
    block_input, tokens = tokens, attn_out + tokens
    if opts.prune_point == "layer":
        if opts.importance == "cross":
            cross_out, cross_map = attention_with_map(first.attn2, first.norm2(tokens), encoder_hidden_states, opts.heads)
            tokens = cross_out + tokens
            tokens = first.ff(first.norm3(tokens)) + tokens
            scores = cross_gwpr_scores(cross_map, opts.iterations)
        else:
            tokens = cross_and_ff(first, tokens, encoder_hidden_states)
            scores = map_scores(self_map, opts, grid)
    else:
        scores = map_scores(self_map, opts, grid)
    rows = _map_rows(grid, opts.map_pool, tokens.device)

    kept, slot_of = select(self_map, scores, state.keep, opts)
    if opts.prune_point == "attn1":
        # The residual added after the gather (the same sum, on k tokens): the cross-attention's LayerNorm then
        # reads an Add, the form onnxruntime's optimizer fuses (after a Gather it leaves the attention unfused).
        x = gather_tokens(attn_out, kept) + gather_tokens(block_input, kept)
        x = cross_and_ff(first, x, encoder_hidden_states)
    else:
        x = gather_tokens(tokens, kept)
    for layer in rest:
        x = layer(x, encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=call.cross_attention_kwargs)

    if opts.recovery == "copy" and block.use_linear_projection:
        # proj_out is per token: run it on the k kept tokens, then copy into the N positions.
        batch, _, height, width = given.residual.shape
        out = copy_recover(block.proj_out(x), map_sources(self_map, kept, slot_of, rows))
        out = out.reshape(batch, height, width, given.inner_dim).permute(0, 3, 1, 2).contiguous() + given.residual
        return Transformer2DModelOutput(sample=out)
    if opts.recovery == "copy":
        full = copy_recover(x, map_sources(self_map, kept, slot_of, rows))
    else:
        full = skip_recover(tokens, x, kept)
    return Transformer2DModelOutput(sample=close_block(block, full, given))
