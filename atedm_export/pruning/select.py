"""Top-k token selection that is exact, static and deterministic on every backend.

The kept set is the ``k`` highest scores with ties going to the lower index, on every backend. Two
formulations compute it, and keep the same tokens:

* ``topk`` (where ``k ≤ TOPK_LIMIT``, TensorRT's TopK maximum): ``TopK`` gives the k-th largest score, a
  value that does not depend on how a backend orders ties. Every token above it is kept, and of the
  tokens equal to it, the lowest indices that fill the k slots (an exclusive running count). A second
  ``TopK`` over distinct keys then lists the kept tokens in index order. Work: O(N log k), no ``[N, N]``.
* ``rank`` (any k): each token's rank is counted by comparison,
  ``rank_i = #{j : s_j > s_i} + #{j < i : s_j = s_i}``, a permutation of ``0..N-1``; slot ``r`` is the token
  of rank ``r``. Its cost is an ``[B, N, N]`` comparison; every op (Greater, Equal, CumSum, ReduceSum,
  ArgMax, GatherElements) has a static shape for any k.

The slot order differs (index order vs rank order); nothing after selection depends on it, since the
pruned layers are permutation-equivariant over tokens and recovery maps each position to a slot.

Nothing here is an ``[N, N]`` function of constants alone: an exporter or graph cleaner would fold such a
mask into a constant (16 MB per 64×64 block, stored in every stage graph). The tie term is read off the
data instead; the only constants are ``[N]``-sized index vectors.
"""

from __future__ import annotations

from typing import Literal

import torch

TOPK_LIMIT = 3840  # TensorRT's largest TopK K (both TensorRT 10 and TensorRT-RTX)
Selection = Literal["auto", "topk", "rank"]


def token_ranks(scores: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` scores → ``[B, N]`` ranks (0 = most important), ties broken by the lower index."""
    batch, tokens = scores.shape
    mine = scores.unsqueeze(2)  # [B, N, 1]: s_i
    other = scores.unsqueeze(1)  # [B, 1, N]: s_j
    # Counting in fp32 is exact up to 2**24 tokens and avoids integer reductions TensorRT lacks.
    higher = (other > mine).float().sum(dim=2)
    equal = (other == mine).float()
    earlier_equal = equal.cumsum(dim=2) - equal  # [b, i, j]: #{j' < j : s_j' = s_i}
    diagonal = torch.arange(tokens, device=scores.device).view(1, tokens, 1).expand(batch, tokens, 1)
    return higher + earlier_equal.gather(2, diagonal).squeeze(2)


def _check_keep(scores: torch.Tensor, keep: int) -> None:
    tokens = scores.shape[1]
    if not 1 <= keep <= tokens:
        raise ValueError(f"keep count must be in [1, {tokens}], got {keep}")


def keep_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices ``[B, keep]`` of the ``keep`` highest-scoring tokens by rank, most important first."""
    _check_keep(scores, keep)
    ranks = token_ranks(scores)
    slots = torch.arange(keep, device=scores.device, dtype=ranks.dtype).view(1, keep, 1)
    one_hot = (ranks.unsqueeze(1) == slots).float()  # [B, keep, N]: slot r ← token of rank r
    return one_hot.argmax(dim=2)


def topk_keep_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The same kept set as ``keep_indices`` through ``TopK`` (``keep ≤ TOPK_LIMIT``), in index order."""
    _check_keep(scores, keep)
    if keep > TOPK_LIMIT:
        raise ValueError(f"TopK selection keeps at most {TOPK_LIMIT} tokens (TensorRT's limit), got {keep}")
    tokens = scores.shape[1]
    threshold = scores.topk(keep, dim=1).values[:, -1:]  # the k-th largest score: the same however ties sort
    above = (scores > threshold).float()
    tied = (scores == threshold).float()
    room = keep - above.sum(dim=1, keepdim=True)
    earlier_tied = tied.cumsum(dim=1) - tied
    kept = above + tied * (earlier_tied < room).float()  # exactly `keep` ones per row
    # Distinct keys: kept tokens above every other, the lower index first.
    index = torch.arange(tokens, device=scores.device, dtype=scores.dtype)
    order = kept * (2 * tokens) - index
    return order.topk(keep, dim=1).indices


def select_tokens(scores: torch.Tensor, keep: int, how: Selection = "auto") -> torch.Tensor:
    """The kept tokens' indices ``[B, keep]``; ``auto`` takes ``topk`` where TensorRT allows it, else ``rank``."""
    if how == "auto":
        how = "topk" if keep <= TOPK_LIMIT else "rank"
    if how == "topk":
        return topk_keep_indices(scores, keep)
    if how == "rank":
        return keep_indices(scores, keep)
    raise ValueError(f"selection must be 'auto', 'topk' or 'rank', got {how!r}")


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tokens[b, index[b, j], :]`` → ``[B, len(index[b]), C]``."""
    channels = tokens.shape[-1]
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, channels))
