"""Top-k token selection that is exact, static and deterministic on every backend.

``torch.topk`` exports to ONNX ``TopK``, which TensorRT caps at K ≤ 3840 and which breaks ties
differently across backends. Instead each token's rank is counted by comparison,
``rank_i = #{j : s_j > s_i} + #{j < i : s_j = s_i}``, a permutation of ``0..N-1`` where equal scores go to
the lower index. Slot ``r`` of the kept set is then the token of rank ``r``. The cost is an ``[B, N, N]``
comparison, no more than the attention map it came from, and every op (Greater, Equal, CumSum,
ReduceSum, ArgMax, GatherElements) has a static shape for any k.

Nothing here is an ``[N, N]`` function of constants alone: an exporter or graph cleaner would fold such a
mask into a constant (16 MB per 64×64 block, stored in every stage graph). The tie term is read off the
data instead, as the diagonal of an exclusive running count of equal scores; the only constants are
``[N]``-sized index vectors.
"""

from __future__ import annotations

import torch


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


def keep_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices ``[B, keep]`` of the ``keep`` highest-scoring tokens, most important first."""
    tokens = scores.shape[1]
    if not 1 <= keep <= tokens:
        raise ValueError(f"keep count must be in [1, {tokens}], got {keep}")
    ranks = token_ranks(scores)
    slots = torch.arange(keep, device=scores.device, dtype=ranks.dtype).view(1, keep, 1)
    one_hot = (ranks.unsqueeze(1) == slots).float()  # [B, keep, N]: slot r ← token of rank r
    return one_hot.argmax(dim=2)


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tokens[b, index[b, j], :]`` → ``[B, len(index[b]), C]``."""
    channels = tokens.shape[-1]
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, channels))
