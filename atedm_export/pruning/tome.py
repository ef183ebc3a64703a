"""ToMe for SD (tomesd 0.1.3's bipartite soft matching) in static form, and its block forward.

The pair a method is (``methods.py``): *select* merges the N tokens into ``N − r`` (the unmerged sources,
then the destinations, each destination the mean of itself and the sources merged into it); *restore*
unmerges by copy, one gather of ``[B, N]`` slots, the same operation as AT-EDM's recovery.

As tomesd computes it, with its randomness off: the destinations are the top-left token of every
``stride×stride`` cell of the token grid, the sources all others; each source's match is the destination
of highest cosine similarity (on the layer's input); the ``r`` sources with the best matches merge. Every
shape is static for a given ``r``: the partition is a pair of ``[N]``-sized index constants, the ``r`` best
matches a static top-k (``select.select_tokens``: ties to the lower index, within TensorRT's TopK limit or
by rank), the means a product with a one-hot of the matches (``Merge.reduce``). The similarities are computed in fp32, so an fp16 graph
merges the tokens the fp32 module merges.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from ..errors import ModelError, PlanError
from .block import BlockCall, BlockState, close_block, open_block
from .options import ToMeOptions
from .select import gather_tokens, select_tokens


def partition(grid: tuple[int, int], stride: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(destinations, sources)``: token indices of the top-left token of each full ``stride×stride`` cell,
    and of every other token, each ascending (tomesd's ``no_rand`` partition; a ragged edge is all sources).

    Built from Python ints, so an export records two ``[N]``-sized constants rather than index arithmetic;
    made once per grid and device, so an eager call spends no time on them."""
    return _partition((int(grid[0]), int(grid[1])), stride, device)


@functools.lru_cache(maxsize=256)
def _partition(grid: tuple[int, int], stride: int, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
    height, width = grid
    rows, cols = height // stride * stride, width // stride * stride
    dests = [i * width + j for i in range(0, rows, stride) for j in range(0, cols, stride)]
    taken = set(dests)
    sources = [t for t in range(height * width) if t not in taken]
    return torch.tensor(dests, device=device), torch.tensor(sources, device=device)


@functools.lru_cache(maxsize=256)
def _slots(kept: int, dests: int, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots of the unmerged sources (``0..kept-1``) and of the destinations after them, as constants."""
    return (torch.tensor(range(kept), dtype=torch.int64, device=device),
            torch.tensor(range(kept, kept + dests), dtype=torch.int64, device=device))


def destinations(grid: tuple[int, int], stride: int) -> int:
    """How many destination tokens the grid has: the most tokens a merge can leave."""
    return (grid[0] // stride) * (grid[1] // stride)


@dataclass(frozen=True)
class Merge:
    """One layer's matching: merge ``[B, N, C]`` → ``[B, N − r, C]`` and unmerge back by copy.

    ``joins`` and ``counts`` are made once per matching: a layer merges before up to three sublayers."""

    sources: torch.Tensor  # [Ns] token index of each source
    dests: torch.Tensor  # [Nd] token index of each destination
    unmerged: torch.Tensor  # [B, Ns − r] source slots that stay
    merged: torch.Tensor  # [B, r] source slots that merge
    into: torch.Tensor  # [B, r] the destination slot each merged source joins
    joins: torch.Tensor  # [B, Nd, r] one-hot of ``into``: merged source j joins destination i
    counts: torch.Tensor  # [B, Nd, 1] 1 + the sources joining each destination: what its mean divides by
    slots: torch.Tensor  # [B, N] each token's slot in the merged sequence [unmerged | destinations]

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """tomesd's ``merge(x, mode="mean")``: the unmerged sources, then each destination averaged with its sources.

        The sums are a product with the ``[B, Nd, r]`` one-hot of who joins whom, not tomesd's
        ``scatter_reduce``: TensorRT's ONNX parser takes no ``ScatterElements`` reduction. It costs
        ``2·Nd·r·C`` FLOPs per merge, which the graph's FLOPs count includes."""
        src, dst = x[:, self.sources], x[:, self.dests]
        means = (dst + self.joins @ gather_tokens(src, self.merged)) / self.counts
        if self.unmerged.shape[1] == 0:  # every source merged: no empty tensor in the graph (exporters mis-shape them)
            return means
        return torch.cat([gather_tokens(src, self.unmerged), means], dim=1)

    def restore(self, y: torch.Tensor) -> torch.Tensor:
        """tomesd's ``unmerge``: every token takes its slot's value (a merged source, its destination's)."""
        return gather_tokens(y, self.slots)


def bipartite_merge(metric: torch.Tensor, grid: tuple[int, int], stride: int, r: int) -> Merge:
    """The static matching of ``r`` sources into destinations, from ``metric`` ``[B, N, C]`` (the layer's input)."""
    grid = (int(grid[0]), int(grid[1]))
    dests, sources = partition(grid, stride, metric.device)
    if not 1 <= r <= len(sources):
        raise PlanError(f"ToMe merges between 1 and {len(sources)} of a {grid[0]}x{grid[1]} grid's tokens "
                        f"at stride {stride}, got {r}")
    unit = metric.float()
    unit = unit / unit.norm(dim=-1, keepdim=True)
    scores = unit[:, sources] @ unit[:, dests].transpose(-1, -2)  # [B, Ns, Nd] cosine similarities
    best, best_dest = scores.max(dim=-1)
    merged = select_tokens(best, r)
    stays = torch.ones_like(best).scatter(1, merged, torch.zeros_like(merged, dtype=best.dtype))
    unmerged = select_tokens(stays, len(sources) - r) if r < len(sources) else merged[:, :0]
    into = best_dest.gather(1, merged)  # [B, r] the destination slot each merged source joins
    joins = (into.unsqueeze(1) == torch.arange(len(dests), device=metric.device).view(1, -1, 1)).to(metric.dtype)
    counts = 1 + joins.sum(dim=-1, keepdim=True)
    batch, kept = metric.shape[0], len(sources) - r
    own_slots, dest_slots = _slots(kept, len(dests), metric.device)
    slots = torch.zeros_like(best_dest[:, :1]).expand(batch, grid[0] * grid[1])
    slots = slots.scatter(1, dests.expand(batch, -1), dest_slots.expand(batch, -1))
    if kept:
        slots = slots.scatter(1, sources[unmerged], own_slots.expand(batch, -1))
    slots = slots.scatter(1, sources[merged], kept + into)
    return Merge(sources, dests, unmerged, merged, into, joins, counts, slots)


def _tome_layer(layer: BasicTransformerBlock, x: torch.Tensor, context: torch.Tensor | None, grid: tuple[int, int],
                r: int, opts: ToMeOptions) -> torch.Tensor:
    """tomesd's diffusers block for a layer-norm ``BasicTransformerBlock``: each switched sublayer on merged tokens."""
    merge = bipartite_merge(x, grid, opts.stride, r)

    def around(enabled: bool, sublayer: Any, normed: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return merge.restore(sublayer(merge.reduce(normed), **kwargs)) if enabled else sublayer(normed, **kwargs)

    x = around(opts.merge_attn, layer.attn1, layer.norm1(x)) + x
    if layer.attn2 is not None:
        x = around(opts.merge_crossattn, layer.attn2, layer.norm2(x), encoder_hidden_states=context) + x
    return around(opts.merge_mlp, layer.ff, layer.norm3(x)) + x


def tome_block(block: Transformer2DModel, state: BlockState, call: BlockCall) -> Transformer2DModelOutput:
    """One ToMe block: every transformer layer matches on its own input and merges ``N − keep`` tokens."""
    given = open_block(block, state, call)
    grid = given.grid
    r = grid[0] * grid[1] - state.keep
    x = given.tokens
    for layer in block.transformer_blocks:
        x = _tome_layer(layer, x, call.encoder_hidden_states, grid, r, state.options)
    return Transformer2DModelOutput(sample=close_block(block, x, given))


def check_tome(name: str, block: Transformer2DModel, opts: ToMeOptions) -> None:
    """Refuse a block whose layers ToMe's forward would not reproduce."""
    for layer in block.transformer_blocks:
        if not isinstance(layer, BasicTransformerBlock) or layer.norm_type != "layer_norm" or layer.pos_embed is not None \
                or layer.only_cross_attention:
            raise ModelError(f"attention block {name}: ToMe needs layer-norm BasicTransformerBlocks with self-attention "
                             "(the SD 1.x/2.x and SDXL layers)")
