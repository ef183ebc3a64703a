"""diffusers UNet weights → the original (CompVis/SGM) single-file layout, to make single-file checkpoints.

The inverse of the renaming diffusers' single-file loader does: tests save a tiny model of each family
the way original checkpoints ship (``model.diffusion_model.input_blocks.1.1....``) and load it back
through the same code a user's checkpoint goes through.
"""

from __future__ import annotations

from typing import Any

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _prefixes(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) pairs for every block of the UNet ``config`` describes."""
    levels, per = len(config["block_out_channels"]), int(config["layers_per_block"])
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.1.", "middle_block.2.")]
    for i in range(levels):
        for j in range(per):
            slot = (per + 1) * i + j + 1
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{slot}.0."),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{slot}.1.")]
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(per + 1) * (i + 1)}.0.op."))
        for j in range(per + 1):
            slot = (per + 1) * i + j
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{slot}.0."),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{slot}.1.")]
        if i < levels - 1:
            attention = "CrossAttn" in config["up_block_types"][i]
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(per + 1) * i + per}.{2 if attention else 1}."))
    return pairs


def to_original(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The UNet's state dict under the original checkpoint's keys (``model.diffusion_model.`` prefix)."""
    pairs = _prefixes(config)
    out = {}
    for key, tensor in state.items():
        prefix, original = next((p, o) for p, o in pairs if key.startswith(p))
        rest = key[len(prefix):]
        if ".resnets." in prefix or prefix.startswith(("middle", "mid_block.resnets")):
            head, _, tail = rest.partition(".")
            rest = f"{RESNET.get(head, head)}.{tail}"
        out["model.diffusion_model." + original + rest] = tensor.contiguous()
    return out
