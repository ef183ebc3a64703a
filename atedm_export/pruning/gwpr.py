"""G-WPR: generalized weighted PageRank over an attention map (AT-EDM §3.1).

The attention map is read as a weighted directed graph, query → key: ``A[b, i, j]`` is how much token
``i`` attends to token ``j``. A token matters when tokens that matter attend to it, so importance is
the stationary weight of ``s ← s·A`` from uniform scores. The iteration count is fixed and the loop
unrolled, so the exported graph is static; everything runs in fp32 because fp16 rounding would change
which tokens are kept.
"""

from __future__ import annotations

import torch

from ..kernels.nodes import launch  # torch.ops.atedm.*, or their nodes in a plugin-form export


def gwpr_scores(attn: torch.Tensor, iterations: int = 5, damping: float = 1.0,
                first_step: torch.Tensor | None = None) -> torch.Tensor:
    """Token importance ``[B, N]`` from a self-attention map ``[B, N, N]`` (rows sum to 1).

    ``damping`` < 1 mixes in the uniform teleport term of classic PageRank,
    ``s ← damping·s·A + (1 − damping)/N``; 1.0 (the default) is the plain weighted PageRank of the paper.
    ``first_step``: ``s₀·A`` for the uniform ``s₀``, where the map's kernel summed it as it wrote the map
    (``[B, N]``); the walk then takes the remaining ``iterations − 1`` steps, one pass over the map each.
    """
    attn = attn.float()
    batch, tokens, _ = attn.shape
    if first_step is None:
        scores, steps = torch.full((batch, 1, tokens), 1.0 / tokens, dtype=attn.dtype, device=attn.device), iterations
    else:
        scores, steps = _teleport(first_step.float().unsqueeze(1), damping, tokens), iterations - 1
    for _ in range(steps):
        scores = _teleport(scores @ attn, damping, tokens)
    return scores.squeeze(1)


def mapless_gwpr_scores(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, iterations: int = 5,
                        damping: float = 1.0) -> torch.Tensor:
    """``gwpr_scores`` of the head-mean map that ``q``, ``k`` (``[B, N, H, d]``) and each head's log-sum-exp define,
    with no map in memory: each step is the kernels' swapped-roles attention (``torch.ops.atedm.gwpr_step``)."""
    batch, tokens = q.shape[:2]
    scores = torch.full((batch, tokens), 1.0 / tokens, dtype=torch.float32, device=q.device)
    for _ in range(iterations):
        scores = _teleport(launch.gwpr_step(q, k, lse, scores, scale).mean(dim=1), damping, tokens)
    return scores


def _teleport(scores: torch.Tensor, damping: float, tokens: int) -> torch.Tensor:
    return scores if damping == 1.0 else damping * scores + (1.0 - damping) / tokens


def cross_gwpr_scores(cross: torch.Tensor, iterations: int = 5) -> torch.Tensor:
    """Image-token importance ``[B, N]`` from a cross-attention map ``[B, N, T]`` (image → text).

    The graph is bipartite: a text token matters when important image tokens attend to it
    (``u ← s·C``), an image token matters when it attends to important text tokens (``s ← u·Cᵀ``).
    This is a power iteration on ``C·Cᵀ`` (HITS-style), normalized each round. The paper reports that
    the self-attention variant ranks better; this one is the ablation.
    """
    cross = cross.float()
    batch, tokens, _ = cross.shape
    scores = torch.full((batch, 1, tokens), 1.0 / tokens, dtype=cross.dtype, device=cross.device)
    for _ in range(iterations):
        text = scores @ cross
        scores = text @ cross.transpose(1, 2)
        scores = scores / scores.sum(dim=-1, keepdim=True)
    return scores.squeeze(1)


def pooled_gwpr_scores(attn: torch.Tensor, grid: tuple[int, int], pool: int, iterations: int = 5,
                       damping: float = 1.0) -> torch.Tensor:
    """Token importance ``[B, N]`` from a pooled-query map ``[B, N/pool², N]`` (``attention_with_map(pool=)``).

    The same walk on the graph of patches: a patch's score is the sum of its tokens' scores, and a
    token's score is what the patches' pooled queries give it, ``s ← pool(s)·A'``. With ``pool=1`` this
    is ``gwpr_scores``. An approximation of G-WPR: its agreement is measured in docs/benchmarks.md.
    """
    from .attention import pool_grid

    attn = attn.float()
    batch, patches, tokens = attn.shape
    weights = torch.full((batch, 1, patches), 1.0 / tokens, dtype=attn.dtype, device=attn.device)
    weights = weights * (tokens // patches)  # each patch carries its tokens' uniform start
    scores = weights @ attn
    for _ in range(iterations - 1):
        if damping != 1.0:
            scores = damping * scores + (1.0 - damping) / tokens
        scores = pool_grid(scores, grid, pool, dim=2, how="sum") @ attn
    if damping != 1.0:
        scores = damping * scores + (1.0 - damping) / tokens
    return scores.squeeze(1)
