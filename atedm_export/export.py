"""Export-side view of a (patched) UNet: flat tensor inputs and one output, as graphs want them.

Graph inputs, in order: ``sample [B,4,H/8,W/8]``, ``timestep [B]`` (fp32), ``encoder_hidden_states
[B,T,D]``, ``text_embeds [B,P]``, ``time_ids [B,6]``; output ``latent`` of the sample's shape.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
OUTPUT_NAMES = ("latent",)


class UNetGraph(torch.nn.Module):
    """``UNet2DConditionModel`` with the SDXL conditioning flattened into positional tensors."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=cond, return_dict=False)[0]


def graph_args(inputs: dict) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` (the diffusers call's keywords) → the positional graph inputs."""
    cond = inputs["added_cond_kwargs"]
    return (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], cond["text_embeds"], cond["time_ids"])
