"""The graph's contract: its inputs, outputs, static shapes and dtypes, derived from the UNet's config.

Like optimum's ``OnnxConfig``, one object owns what every other module needs to agree on: the export
traces ``module(unet)`` with ``example_feed()``; the runtime backends, verify, bench, the Triton models
and the client read the same names, shapes and dtypes (the manifest records them). The family decides
the conditioning:

* ``sd`` (SD 1.x / 2.x): ``sample, timestep, encoder_hidden_states``;
* ``sdxl`` (SDXL base, its fine-tunes, SSD-1B, Vega): also ``text_embeds [B, P]`` and ``time_ids [B, 6]``
  (original size, crop, target size);
* ``sdxl-refiner``: ``time_ids [B, 5]`` (original size, crop, aesthetic score).

One output, ``latent``, of the sample's shape. ``timestep`` is always fp32: diffusers computes the
sinusoidal embedding in fp32. Every dimension is a fixed number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from .errors import ModelError
# The family records live in families.py; their names stay importable from here, where they used to be.
from .families import SD, SDXL, SDXL_REFINER, Family, family_of  # noqa: F401
from .registry import PRECISION_NAMES

OUTPUT = "latent"
TIMESTEP_DTYPE = "float32"


@dataclass(frozen=True)
class Precision:
    """One precision under each name the toolchain meets it by."""

    name: str  # fp32: specs, the CLI
    torch: torch.dtype
    onnx: str  # float32: the manifest's dtype names (ONNX/NumPy spelling)
    triton: str  # TYPE_FP32: config.pbtxt
    wire: str  # FP32: tritonclient's InferInput
    numpy: Any  # np.float32; None where NumPy has no such type (bfloat16)
    atol: float = 0.0  # verify: an output element passes when within atol or rtol of eager
    rtol: float = 0.0


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", torch.float32, "float32", "TYPE_FP32", "FP32", np.float32, 1e-4, 1e-3),
        Precision("fp16", torch.float16, "float16", "TYPE_FP16", "FP16", np.float16, 2e-2, 2e-2),
        Precision("bf16", torch.bfloat16, "bfloat16", "TYPE_BF16", "BF16", None, 1e-1, 5e-2),
    )
}
assert tuple(PRECISIONS) == PRECISION_NAMES
#: The int32 step inputs of a served UNet travel by the same table.
INT32 = Precision("int32", torch.int32, "int32", "TYPE_INT32", "INT32", np.int32)


def precision_of(dtype: str | torch.dtype | np.dtype | type) -> Precision:
    """The precision of a manifest dtype name (``float16``), a torch dtype or a NumPy dtype."""
    for p in (*PRECISIONS.values(), INT32):
        if isinstance(dtype, str):
            found = dtype == p.onnx
        elif isinstance(dtype, torch.dtype):
            found = dtype == p.torch
        else:
            found = p.numpy is not None and np.dtype(dtype) == np.dtype(p.numpy)
        if found:
            return p
    raise ModelError(f"dtype {dtype} is not a graph dtype; expected one of: "
                     f"{', '.join(p.onnx for p in (*PRECISIONS.values(), INT32))}")


@dataclass(frozen=True)
class TensorSpec:
    """Name, static shape and dtype (manifest spelling: ``float16``) of one graph input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class GraphContract:
    """The static I/O of every graph of one build: family, shapes at one resolution, one precision."""

    family: Family
    batch: int
    height: int  # pixels
    width: int
    in_channels: int
    text_length: int
    text_dim: int
    pooled_dim: int  # 0 where the family has no added conditioning
    precision: str = "fp32"

    @classmethod
    def from_config(cls, config: dict[str, Any], batch: int, height: int, width: int, text_length: int = 77,
                    precision: str = "fp32") -> GraphContract:
        family = family_of(config)
        text_dim = config["cross_attention_dim"]
        if not isinstance(text_dim, int):
            raise ModelError(f"the UNet config has a cross_attention_dim per block ({text_dim}); "
                             "supported are UNets with one text width")
        return cls(family, batch, height, width, int(config["in_channels"]), text_length, text_dim,
                   family.pooled_dim(config), precision)

    # --- shapes and names -------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision].torch

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """The VAE downsamples by 8."""
        return (self.batch, self.in_channels, self.height // 8, self.width // 8)

    @property
    def inputs(self) -> list[TensorSpec]:
        d, b = PRECISIONS[self.precision].onnx, self.batch
        specs = [
            TensorSpec("sample", self.latent_shape, d),
            TensorSpec("timestep", (b,), TIMESTEP_DTYPE),
            TensorSpec("encoder_hidden_states", (b, self.text_length, self.text_dim), d),
        ]
        if self.family.added_conditioning:
            specs += [TensorSpec("text_embeds", (b, self.pooled_dim), d),
                      TensorSpec("time_ids", (b, self.family.time_ids), d)]
        return specs

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec(OUTPUT, self.latent_shape, PRECISIONS[self.precision].onnx)]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    # --- feeds ----------------------------------------------------------------------------------

    def time_ids(self) -> list[float]:
        """Plausible time ids: the pipeline's defaults at this resolution (refiner: aesthetic score 6)."""
        size = [float(self.height), float(self.width)]
        return size + [0.0, 0.0] + (size if self.family.time_ids == 6 else [6.0])

    def example_feed(self, seed: int = 0, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Seeded random graph inputs by name (``meta`` device: shapes only, for FLOPs and block grids)."""
        dtype = self.dtype
        gen = torch.Generator().manual_seed(seed)
        meta = torch.device(device).type == "meta"
        feed: dict[str, torch.Tensor] = {}
        for spec in self.inputs:
            if spec.name == "timestep":
                feed[spec.name] = torch.full(spec.shape, 500.0, dtype=torch.float32, device=device)
            elif spec.name == "time_ids":
                feed[spec.name] = torch.tensor([self.time_ids()] * self.batch, device=device).to(dtype)
            elif meta:
                feed[spec.name] = torch.empty(spec.shape, dtype=dtype, device="meta")
            else:
                feed[spec.name] = torch.randn(spec.shape, generator=gen).to(device=device, dtype=dtype)
        return feed

    def unet_kwargs(self, feed: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Graph inputs → the keywords of ``UNet2DConditionModel.forward``."""
        kwargs: dict[str, Any] = {n: feed[n] for n in ("sample", "timestep", "encoder_hidden_states")}
        if self.family.added_conditioning:
            kwargs["added_cond_kwargs"] = {"text_embeds": feed["text_embeds"], "time_ids": feed["time_ids"]}
        return kwargs

    def feed_from_call(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                       added_cond_kwargs: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """A pipeline's UNet call → graph inputs (the timestep broadcast to one fp32 value per row)."""
        batch = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).to(torch.float32).flatten()
        feed = {"sample": sample, "timestep": t.expand(batch).contiguous() if t.numel() == 1 else t,
                "encoder_hidden_states": encoder_hidden_states}
        if self.family.added_conditioning:
            missing = [k for k in ("text_embeds", "time_ids") if k not in (added_cond_kwargs or {})]
            if missing:
                raise ModelError(f"this {self.family.name} UNet needs added_cond_kwargs with 'text_embeds' and "
                                 f"'time_ids'; missing: {', '.join(missing)}")
            feed.update(text_embeds=added_cond_kwargs["text_embeds"], time_ids=added_cond_kwargs["time_ids"])
        return feed

    def module(self, unet: UNet2DConditionModel) -> UNetGraph:
        """``unet`` with the contract's positional inputs: what is exported and what the eager backend runs."""
        return UNetGraph(unet, self)


class UNetGraph(torch.nn.Module):
    """``UNet2DConditionModel`` called with the contract's inputs as positional tensors, in order."""

    def __init__(self, unet: UNet2DConditionModel, contract: GraphContract) -> None:
        super().__init__()
        self.unet = unet
        self.contract = contract

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        # Named parameters rather than *args: both exporters trace them as the graph's inputs, in order.
        cond = None
        if self.contract.family.added_conditioning:
            # diffusers concatenates text_embeds with its fp32 time-id embedding, and eager torch promotes
            # the result to fp32. The dynamo exporter drops that promotion (a mixed fp16/fp32 Concat TensorRT
            # rejects), so it is written out here: the same numbers, an explicit Cast in the graph.
            cond = {"text_embeds": text_embeds.float(), "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=cond, return_dict=False)[0]

    def args(self, feed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(feed[n] for n in self.contract.input_names)
