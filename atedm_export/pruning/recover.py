"""Recovery: give the pruned tokens values again before the ResNet/conv layers need the full grid.

``copy`` (AT-EDM's similarity-based copy): every pruned position takes the output of the kept token it
attends to most in the block's self-attention map; kept positions take their own output. The map from
positions to kept slots is one static ``[B, N]`` index, so recovery is a single gather.

``skip`` (the ablation): pruned positions keep the value they had at the prune point.
"""

from __future__ import annotations

from typing import Literal

import torch

from .select import gather_tokens

Recovery = Literal["copy", "skip"]


def recovery_sources(attn: torch.Tensor, kept: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """For each position ``i`` the kept slot it copies from: ``argmax_{j ∈ kept} A[i, j]``, itself if kept.

    ``attn`` is ``[B, N, N]``, ``kept`` is ``[B, k]`` token indices; returns ``[B, N]`` slot indices. A
    pooled map (``[B, P, N]``) gives ``rows``: the map row ``[N]`` of each position.
    """
    batch, map_rows, _ = attn.shape
    keep = kept.shape[1]
    to_kept = attn.gather(2, kept.unsqueeze(1).expand(batch, map_rows, keep))  # [B, rows, k]
    sources = to_kept.argmax(dim=2)
    if rows is not None:
        sources = sources[:, rows]
    own_slot = torch.arange(keep, device=kept.device).unsqueeze(0).expand(batch, keep)
    return sources.scatter(1, kept, own_slot)


def copy_recover(kept_out: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """``[B, k, C]`` outputs of the kept tokens → ``[B, N, C]``, each position from its source slot."""
    return gather_tokens(kept_out, sources)


def skip_recover(full: torch.Tensor, kept_out: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``full`` ``[B, N, C]`` (values at the prune point) with the kept positions overwritten by ``kept_out``."""
    channels = full.shape[-1]
    return full.scatter(1, kept.unsqueeze(-1).expand(-1, -1, channels), kept_out)
