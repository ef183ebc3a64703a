"""The pruning methods, registered by name: the one place a new method is added.

A method is its option model (``options.py``), its block forward (select the tokens to run on, run the
block's layers on them, restore the full grid) and a plan-time check. ``patch.py`` swaps a block's class
and calls the forward of the method its options name; the spec's ``pruning:`` section and the manifest
parse through ``PruningOptions``, the union of every method's options told apart by ``method``.
Adding a method: a module in ``pruning/`` and one entry in ``METHODS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag, TypeAdapter
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from ..kernels.runnable import require_runnable
from .atedm import atedm_block
from .attention import check_supported
from .options import DEFAULT_METHOD, AtedmOptions, ToMeOptions
from .tome import check_tome, destinations, tome_block

BlockForward = Callable[..., Any]  # (block, block.BlockState, block.BlockCall) -> Transformer2DModelOutput
BlockCheck = Callable[[str, Transformer2DModel, Any], None]


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # how tables name it
    summary: str  # one line for inspect and flops
    options: type
    forward: BlockForward
    check: BlockCheck  # (block name, block, options): raise where the block's layers are not what forward runs
    least_kept: Callable[[tuple[int, int], Any], int]  # (token grid, options): the smallest keep count it can run


def _check_atedm(name: str, block: Transformer2DModel, opts: AtedmOptions) -> None:
    check_supported(name, block)
    if opts.map_impl == "kernels":  # where the block's weights are now; the forward checks its inputs again
        require_runnable(next(block.parameters()).device)


METHODS: dict[str, Method] = {
    "atedm": Method("atedm", "AT-EDM", "AT-EDM: G-WPR ranking on the first self-attention map, top-k, similarity-copy recovery",
                    AtedmOptions, atedm_block, _check_atedm, lambda grid, opts: 1),
    "tome": Method("tome", "ToMe", "ToMe (tomesd, static): bipartite soft matching per layer, destinations on a fixed grid, "
                           "unmerge by copy", ToMeOptions, tome_block, check_tome,
                   lambda grid, opts: destinations(grid, opts.stride)),
}


def _method_of(data: Any) -> str | None:
    if isinstance(data, dict):
        return data.get("method", DEFAULT_METHOD)
    return getattr(data, "method", None)


PruningOptions = Annotated[
    Union[tuple(Annotated[m.options, Tag(m.name)] for m in METHODS.values())],  # type: ignore[misc]
    Discriminator(_method_of, custom_error_type="unknown_method",
                  custom_error_message=f"method must be one of: {', '.join(METHODS)}"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(PruningOptions)


def parse_options(data: Any) -> Any:
    """The options a ``pruning:`` mapping describes (``method`` names the model, ``atedm`` by default)."""
    return _ADAPTER.validate_python(data)


def method_of(options: Any) -> Method:
    return METHODS[options.method]


def summary_of(name: str) -> str:
    """One line on what a method does, for ``inspect`` and ``flops``."""
    return METHODS[name].summary if name in METHODS else name


def label_of(name: str) -> str:
    """A method's name as tables show it (``AT-EDM``, ``ToMe``); an unknown name as given."""
    return METHODS[name].label if name in METHODS else name
