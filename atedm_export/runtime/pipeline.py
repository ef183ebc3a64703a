"""A stock ``StableDiffusionXLPipeline`` around a ``StagedUNet``.

For a build of a diffusers SDXL folder (or a cached hub id) the pipeline's other components come from
there. For the built-in ``tiny-sdxl`` a complete tiny pipeline is assembled offline with seeded random
weights: two CLIP text encoders whose widths add up to the tiny UNet's cross-attention width, a
byte-level tokenizer vocabulary written on the spot, a tiny VAE (8× downsampling) and SDXL's scheduler.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline

from ..errors import AtedmError
from ..models import is_builtin
from .staged import StagedUNet

#: SDXL base 1.0's scheduler (scheduler/scheduler_config.json).
SDXL_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear",
}


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable character map (what its BPE vocabularies are written in)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def tiny_tokenizer(folder: Path):  # noqa: ANN201 - CLIPTokenizer
    """A byte-level CLIP tokenizer with no merges: every byte is a token (514 tokens)."""
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_components(unet_config: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Every SDXL pipeline component but the UNet, sized for ``unet_config`` (tiny-sdxl), seeded."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_width = int(unet_config["cross_attention_dim"])
    pooled = int(unet_config["projection_class_embeddings_input_dim"]) - 6 * int(unet_config["addition_time_embed_dim"])
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer(Path(tmp))
    common = {
        "vocab_size": len(tokenizer), "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(seed)
    encoder = CLIPTextModel(CLIPTextConfig(hidden_size=text_width // 2, **common)).eval()
    encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=text_width - text_width // 2, projection_dim=pooled, **common)
    ).eval()
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[32] * 4, layers_per_block=1, latent_channels=4, norm_num_groups=32,
        sample_size=int(unet_config.get("sample_size", 32)) * 8, scaling_factor=0.13025,
    ).eval()
    return {
        "text_encoder": encoder, "text_encoder_2": encoder_2, "tokenizer": tokenizer, "tokenizer_2": tokenizer,
        "vae": vae, "scheduler": EulerDiscreteScheduler(**SDXL_SCHEDULER),
    }


def load_pipeline(staged: StagedUNet) -> StableDiffusionXLPipeline:
    """The SDXL pipeline of the build's model with ``staged`` as its UNet."""
    spec = staged.manifest.graph_spec
    if spec.model == "tiny-sdxl":
        parts = tiny_components(staged.manifest.unet_config, seed=spec.seed)
        pipe = StableDiffusionXLPipeline(unet=None, **parts)
    elif is_builtin(spec.model):
        raise AtedmError(
            f"model '{spec.model}' is a bare UNet with random weights (no text encoders or VAE); "
            "to generate images, build from a diffusers SDXL folder"
        )
    else:
        try:
            pipe = StableDiffusionXLPipeline.from_pretrained(spec.model, unet=None, torch_dtype=staged.dtype,
                                                             use_safetensors=True, local_files_only=True)
        except (OSError, ValueError) as exc:
            first = str(exc).splitlines()[0]
            raise AtedmError(f"cannot load the SDXL pipeline around the UNet from '{spec.model}': {first}") from None
    pipe.set_progress_bar_config(disable=True)
    staged.attach(pipe)
    return pipe.to(staged.device)
