"""The one option model of each pruning method: what a spec's ``pruning:`` holds, what a plan carries.

Each method's options are a frozen pydantic model whose ``method`` field names it (``atedm``, ``tome``);
``methods.PruningOptions`` is their union, told apart by that field, so a spec, a manifest and a Python caller
all go through the same bounds, defaults and cross-checks. A choice that contradicts another raises a
``PlanError`` (a one-line user error); a value out of bounds raises pydantic's ``ValidationError``,
which ``spec.parse_spec`` words as one line.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import PlanError

PrunePoint = Literal["layer", "attn1"]
Importance = Literal["self", "cross"]
Recovery = Literal["copy", "skip"]
Selection = Literal["auto", "topk", "rank"]
HeadReduce = Literal["mean", "max"]
MapOutput = Literal["reuse", "fused"]
MapImpl = Literal["auto", "explicit", "kernels"]
MapBatch = Literal["head", "all"]
#: What each ``map_impl`` runs, in the words ``inspect`` shows.
MAP_IMPLS: dict[str, str] = {
    "auto": "Triton kernels on CUDA tensors, torch ops elsewhere",
    "explicit": "torch ops in fp32, the reference",
    "kernels": "Triton kernels (on CPU tensors in Triton's interpreter)",
}
#: What each ``map_batch`` exports, in the words ``inspect`` shows.
MAP_BATCHES: dict[str, str] = {
    "head": "each head's map in turn",
    "all": "every head's map in one product",
}

#: The method a spec or plan prunes with where it names none.
DEFAULT_METHOD = "atedm"


def default_prune_point(importance: str, recovery: str) -> PrunePoint:
    """``attn1`` where it gives the same output as ``layer`` (copy recovery, self-attention importance)."""
    return "attn1" if recovery == "copy" and importance == "self" else "layer"


def default_map_output(map_pool: int) -> MapOutput:
    """``reuse`` where each query has its map row (no second ``q·kᵀ``); a pooled map has none: ``fused``."""
    return "reuse" if map_pool == 1 else "fused"


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class AtedmOptions(_Options):
    """AT-EDM: the choices the paper leaves open, each with the default AT-EDM uses.

    ``prune_point``: prune right after the first layer's self-attention (``attn1``, the default where exact)
    or after its feed-forward (``layer``, the paper's wording). Under copy recovery with self-attention
    importance both give the same output (the cross-attention and feed-forward act per token, and a pruned
    token takes a kept token's output), and ``attn1`` runs them on k tokens only; in one-layer blocks (SD
    1.x/2.x) it is the only point that saves anything. ``importance``: rank with the self-attention map
    (``self``, the paper's choice) or the cross-attention map to the text (``cross``, needs
    ``prune_point=layer`` because the cross-attention runs after ``attn1``).

    How the map layer is computed (each choice keeps the same tokens): ``selection``: ``TopK`` where k is
    within TensorRT's limit, rank-by-comparison above it (``auto``), or one of them always (``select.py``);
    ``map_output``: the map layer's output from each head's map (``reuse``: no second ``q·kᵀ``) or through
    the fused attention (``fused``; ``attention.py``). ``map_pool`` > 1 is an approximation, never the
    default: the map's queries pooled over ``map_pool×map_pool`` patches, a map ``map_pool²`` times cheaper.
    ``map_batch``: the explicit map layer's per-head maps one head at a time (``head``) or in one batched
    product (``all``, fewer ops for a GPU engine to launch; ``attention.py``). ``map_impl``: how PyTorch runs the
    map layer. ``explicit`` is the reference and the CPU path (the map built in fp32 by torch ops, ``map_batch``
    heads at a time, what the ONNX export writes); ``kernels`` runs it as the Triton kernels of
    ``atedm_export/kernels`` (one flash pass for the output and each head's log-sum-exp, the head-mean map written
    once with G-WPR's first step fused, recovery's argmax in one pass), on CUDA tensors, or on CPU tensors in
    Triton's interpreter (``TRITON_INTERPRET=1``); ``auto`` takes the kernels on CUDA tensors and the explicit
    path elsewhere. The kernels combine heads by ``mean`` on an unpooled
    map only; an ONNX export is always explicit.
    Unset defaults (``prune_point``, ``map_output``) are written down when the options are made, so a
    manifest says which ones its graphs were built with.
    """

    method: Literal["atedm"] = "atedm"
    iterations: int = Field(5, ge=1, le=100, description="G-WPR power iterations (unrolled in the graph)")
    heads: HeadReduce = "mean"
    damping: float = Field(1.0, gt=0.0, le=1.0)
    importance: Importance = "self"
    prune_point: PrunePoint | None = Field(
        None, description="attn1 (default where exact: copy recovery, self importance) or layer (the paper's wording)")
    recovery: Recovery = "copy"
    selection: Selection = Field(
        "auto", description="TopK where k <= 3840 (TensorRT's limit), rank-by-comparison above; both keep the same tokens")
    map_output: MapOutput | None = Field(
        None, description="map layer output from each head's map (reuse, the default where exact) or through the "
                          "fused attention (fused)")
    map_pool: int = Field(
        1, description="approximate: the map's queries pooled over map_pool x map_pool patches (1 = exact G-WPR)")
    map_batch: MapBatch = Field(
        "head", description="the explicit map layer (what graphs export): each head's fp32 map in turn (head, the "
                            "least memory) or all heads' in one batched product (all: the same values, a sixth of "
                            "the ops, heads times the memory)")
    map_impl: MapImpl = Field(
        "auto", description="the map layer in PyTorch: Triton kernels (kernels), torch ops (explicit, the reference), "
                            "or kernels on CUDA tensors and explicit elsewhere (auto); exports are always explicit")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("prune_point") is None:
                point = default_prune_point(data.get("importance", "self"), data.get("recovery", "copy"))
                data = {**data, "prune_point": point}
            if data.get("map_output") is None:
                data = {**data, "map_output": default_map_output(data.get("map_pool", 1))}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> AtedmOptions:
        if self.map_pool not in (1, 2, 4):
            raise PlanError(f"map_pool must be 1, 2 or 4, got {self.map_pool}")
        if self.map_pool > 1 and (self.map_output != "fused" or self.importance != "self"):
            raise PlanError("map_pool > 1 needs map_output 'fused' and importance 'self' (a pooled map has no row per query)")
        if self.map_impl == "kernels" and (self.heads != "mean" or self.map_pool != 1):
            raise PlanError("map_impl 'kernels' needs heads 'mean' and map_pool 1 (the kernels average the heads' "
                            "probabilities over an unpooled map); use map_impl 'auto' or 'explicit'")
        if self.importance == "cross" and self.prune_point != "layer":
            raise PlanError("importance 'cross' needs prune_point 'layer' (cross-attention runs after attn1)")
        return self


class ToMeOptions(_Options):
    """ToMe for SD (tomesd) in static form: bipartite soft matching before the merged sublayers, unmerge by copy.

    Destination tokens sit on a fixed grid: the top-left token of every ``stride×stride`` cell (tomesd with
    ``use_rand=False``; its random offsets would make the graph depend on a random input). A block keeping
    ``k`` of its ``N`` tokens merges ``r = N − k`` source tokens into their most similar destination, in
    every transformer layer of the block, each layer matching on its own input. ``merge_attn``,
    ``merge_crossattn`` and ``merge_mlp`` are tomesd's switches (the defaults are tomesd's): which sublayers
    run on the merged tokens. At most the source tokens merge, so ``k ≥ N / stride²``.
    """

    method: Literal["tome"]
    stride: int = Field(2, ge=2, le=8, description="destination grid: one token per stride x stride cell (tomesd's sx = sy)")
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False

    @model_validator(mode="after")
    def _merges_something(self) -> ToMeOptions:
        if not (self.merge_attn or self.merge_crossattn or self.merge_mlp):
            raise PlanError("ToMe needs at least one of merge_attn, merge_crossattn, merge_mlp (else nothing is merged)")
        return self
