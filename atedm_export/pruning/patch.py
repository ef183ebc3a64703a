"""Apply a pruning method to a diffusers UNet for one stage plan, and remove it again (tomesd-style).

Each pruned ``Transformer2DModel`` has its class swapped for a subclass whose ``forward`` runs the block the
way the plan's method does (``methods.py``: AT-EDM in ``atedm.py``, ToMe in ``tome.py``). The keep count is a
Python int, so every shape in the pruned path is static and the module exports to a fixed graph. Weights
are never touched: removing the patch restores the stock module exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from ..errors import PlanError
from .block import BlockCall, BlockState
from .methods import method_of
from .options import AtedmOptions, ToMeOptions

@dataclass(frozen=True)
class StagePlan:
    """What one static graph prunes: the keep count of each pruned block (blocks not named run stock).

    ``tokens``: each block's token count at the resolution the plan was made for. Where given, a call at
    another resolution is refused: the same keep count would keep another fraction of the tokens.
    """

    keep: Mapping[str, int] = field(default_factory=dict)
    options: AtedmOptions | ToMeOptions = AtedmOptions()
    tokens: Mapping[str, int] = field(default_factory=dict)


_ATTR = "_atedm"
_PATCHED: dict[type, type] = {}


def _patched_class(base: type) -> type:
    """One subclass per stock class, created once, so isinstance checks in diffusers still hold."""
    if base not in _PATCHED:
        _PATCHED[base] = type(f"Pruned{base.__name__}", (base,), {"forward": _pruned_forward})
    return _PATCHED[base]


def transformer_blocks(unet: torch.nn.Module) -> dict[str, Transformer2DModel]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, Transformer2DModel)}


def apply_pruning(unet: UNet2DConditionModel, plan: StagePlan) -> UNet2DConditionModel:
    """Prune the blocks the plan names with the plan's method (AT-EDM by default); blocks it does not name run
    stock. Applying again replaces the plan."""
    blocks = transformer_blocks(unet)
    unknown = sorted(set(plan.keep) - set(blocks))
    if unknown:
        raise PlanError(f"unknown attention block {unknown[0]!r}; the UNet has: {', '.join(blocks)}")
    for name, keep in plan.keep.items():
        if not isinstance(keep, int) or keep < 1:
            raise PlanError(f"keep count for {name} must be a positive integer, got {keep!r}")
        method_of(plan.options).check(name, blocks[name], plan.options)
    remove_pruning(unet)
    for name, keep in plan.keep.items():
        block = blocks[name]
        setattr(block, _ATTR, BlockState(name, keep, plan.options, type(block), plan.tokens.get(name)))
        block.__class__ = _patched_class(type(block))
    return unet


def remove_pruning(unet: torch.nn.Module) -> torch.nn.Module:
    """Restore every patched block to its stock class; a no-op on an unpatched UNet."""
    for block in transformer_blocks(unet).values():
        state: BlockState | None = getattr(block, _ATTR, None)
        if state is not None:
            block.__class__ = state.base
            delattr(block, _ATTR)
    return unet


def set_plan(unet: UNet2DConditionModel, plan: StagePlan | None) -> UNet2DConditionModel:
    """Run ``unet`` on ``plan`` from now on; ``None`` (or a plan that prunes nothing) is the stock UNet."""
    return apply_pruning(unet, plan) if plan is not None and plan.keep else remove_pruning(unet)


@contextlib.contextmanager
def planned(unet: UNet2DConditionModel, plan: StagePlan | None) -> Iterator[UNet2DConditionModel]:
    """``unet`` on ``plan`` for the ``with`` body, stock again afterwards (also on errors)."""
    set_plan(unet, plan)
    try:
        yield unet
    finally:
        remove_pruning(unet)


def patched_blocks(unet: torch.nn.Module) -> dict[str, int]:
    """Keep count of each currently patched block."""
    return {n: getattr(m, _ATTR).keep for n, m in transformer_blocks(unet).items() if hasattr(m, _ATTR)}


def _pruned_forward(
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
    """``Transformer2DModel.forward``'s signature; the block runs as its plan's method runs it."""
    state: BlockState = getattr(self, _ATTR)
    call = BlockCall(hidden_states, encoder_hidden_states, cross_attention_kwargs, attention_mask, encoder_attention_mask)
    out = method_of(state.options).forward(self, state, call)
    return out if return_dict else (out.sample,)
