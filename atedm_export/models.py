"""Load a diffusers SDXL UNet from wherever the user keeps it, or build a built-in one.

Sources, tried in this order:

* a built-in architecture name (``sdxl-base``, ``tiny-sdxl``): seeded random weights, offline;
* a local diffusers folder (a pipeline folder with ``unet/`` or a bare UNet folder);
* a single ``.safetensors`` checkpoint (original SGM layout or diffusers layout);
* a Hugging Face hub id (the local cache first, then the network).

Weights are only ever read from safetensors: pickle files are refused. The same code path loads a
user's real checkpoint and the tiny test models saved with ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from .errors import ModelError

#: The UNet of stabilityai/stable-diffusion-xl-base-1.0 (unet/config.json), 2.57 B parameters.
SDXL_BASE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

#: SDXL's topology (11 attention blocks: 2-layer blocks at the fine token level, 10-layer blocks at the
#: coarse one) at tiny widths, so every code path runs in seconds on a CPU. The text conditioning is
#: narrow too: encoder_hidden_states [B, T, 64], text_embeds [B, 32], time_ids [B, 6].
TINY_SDXL_CONFIG: dict[str, Any] = {
    **SDXL_BASE_CONFIG,
    "addition_time_embed_dim": 8,
    "attention_head_dim": [1, 2, 3],
    "block_out_channels": [32, 64, 96],
    "cross_attention_dim": 64,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
    "sample_size": 32,
}

BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {"sdxl-base": SDXL_BASE_CONFIG, "tiny-sdxl": TINY_SDXL_CONFIG}


@dataclass(frozen=True)
class AttentionBlock:
    """One attention block (a ``Transformer2DModel``) and the token grid it sees at a resolution."""

    name: str
    height: int
    width: int
    layers: int
    channels: int

    @property
    def tokens(self) -> int:
        return self.height * self.width


@dataclass(frozen=True)
class UNetInputs:
    """Static input shapes of one UNet call (what a graph is exported for)."""

    batch: int
    latent_height: int
    latent_width: int
    in_channels: int
    text_length: int
    text_dim: int
    pooled_dim: int
    time_ids_dim: int = 6


def unet_inputs(config: dict[str, Any], batch: int, height: int, width: int, text_length: int) -> UNetInputs:
    """Input shapes for an SDXL-style UNet config at a pixel resolution (the VAE downsamples by 8)."""
    time_dim = 6 * int(config["addition_time_embed_dim"])
    return UNetInputs(
        batch=batch,
        latent_height=height // 8,
        latent_width=width // 8,
        in_channels=int(config["in_channels"]),
        text_length=text_length,
        text_dim=int(config["cross_attention_dim"]),
        pooled_dim=int(config["projection_class_embeddings_input_dim"]) - time_dim,
    )


def example_inputs(
    shapes: UNetInputs, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Seeded random inputs of the UNet call, keyed as ``UNet2DConditionModel.forward`` names them."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        if torch.device(device).type == "meta":
            return torch.empty(shape, dtype=dtype, device="meta")
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    b = shapes.batch
    timestep = torch.full((b,), 500.0, dtype=torch.float32, device=device)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * b, device=device).to(dtype)
    return {
        "sample": randn(b, shapes.in_channels, shapes.latent_height, shapes.latent_width),
        "timestep": timestep,
        "encoder_hidden_states": randn(b, shapes.text_length, shapes.text_dim),
        "added_cond_kwargs": {"text_embeds": randn(b, shapes.pooled_dim), "time_ids": time_ids},
    }


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build parameters directly in ``dtype`` so SDXL never exists as a second, fp32 copy."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_unet(
    config: dict[str, Any], *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0
) -> UNet2DConditionModel:
    """A UNet with seeded random weights; on ``device="meta"`` no memory is allocated (FLOPs, shapes)."""
    torch.manual_seed(seed)
    with _default_dtype(dtype), torch.device(device):
        unet = UNet2DConditionModel.from_config(config)
    return unet.eval().requires_grad_(False)


def is_builtin(source: str) -> bool:
    return source in BUILTIN_CONFIGS


def _local_unet_folder(path: Path) -> tuple[Path, str | None] | None:
    """``(folder, subfolder)`` for a diffusers pipeline folder or a bare UNet folder, else None."""
    if (path / "unet" / "config.json").is_file():
        return path, "unet"
    if (path / "config.json").is_file():
        return path, None
    return None


def unet_config(source: str) -> dict[str, Any]:
    """The UNet config of a source without loading its weights (enough for shapes and FLOPs)."""
    if is_builtin(source):
        return dict(BUILTIN_CONFIGS[source])
    path = Path(source).expanduser()
    if path.is_dir():
        found = _local_unet_folder(path)
        if found is None:
            raise ModelError(f"model folder {path} has no config.json or unet/config.json; expected a diffusers folder")
        folder, sub = found
        return json.loads((folder / (sub or "") / "config.json").read_text())
    if path.suffix == ".safetensors":
        return dict(SDXL_BASE_CONFIG)
    return dict(_load_from_hub(source, torch.float32, config_only=True))


def load_unet(
    source: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0
) -> UNet2DConditionModel:
    """Load (or build) the UNet named by ``source``; see the module docstring for the sources."""
    if is_builtin(source):
        return build_unet(BUILTIN_CONFIGS[source], dtype=dtype, device=device, seed=seed)
    path = Path(source).expanduser()
    if path.exists():
        unet = _load_local(path, dtype)
    elif source.endswith((".safetensors", ".ckpt", ".bin", ".pt", ".pth")) or source.startswith((".", "/", "~")):
        raise ModelError(f"model path {source} does not exist; expected a diffusers folder or a .safetensors file")
    else:
        unet = _load_from_hub(source, dtype)
    return unet.to(device).eval().requires_grad_(False)


def _load_local(path: Path, dtype: torch.dtype) -> UNet2DConditionModel:
    if path.is_dir():
        found = _local_unet_folder(path)
        if found is None:
            raise ModelError(f"model folder {path} has no config.json or unet/config.json; expected a diffusers folder")
        folder, sub = found
        weights = folder / (sub or "")
        if not any(weights.glob("*.safetensors")):
            raise ModelError(f"model folder {weights} has no .safetensors weights (pickle files are never loaded)")
        return UNet2DConditionModel.from_pretrained(folder, subfolder=sub, torch_dtype=dtype, use_safetensors=True)
    if path.suffix != ".safetensors":
        raise ModelError(f"model file {path} is not a .safetensors file (pickle checkpoints are never loaded)")
    return _load_single_file(path, dtype)


def _load_single_file(path: Path, dtype: torch.dtype) -> UNet2DConditionModel:
    """A single checkpoint of a built-in architecture: original (``model.diffusion_model.*``) or diffusers keys.

    The architecture is recognized from the tensor shapes (SDXL base, or tiny-sdxl for tests).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    original = "model.diffusion_model.input_blocks.0.0.weight"
    if original in shapes:
        name = next((n for n, c in BUILTIN_CONFIGS.items() if shapes[original][0] == c["block_out_channels"][0]), None)
        if name is None:
            raise ModelError(f"{path} is not an SDXL checkpoint (input conv {shapes[original]})")
        with tempfile.TemporaryDirectory() as config_dir:
            (Path(config_dir) / "unet").mkdir()
            (Path(config_dir) / "unet" / "config.json").write_text(json.dumps(BUILTIN_CONFIGS[name]))
            return UNet2DConditionModel.from_single_file(
                str(path), config=config_dir, subfolder="unet", torch_dtype=dtype, local_files_only=True
            )
    for config in BUILTIN_CONFIGS.values():
        unet = build_unet(config, dtype=dtype, device="meta")
        expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
        if expected == shapes:
            unet.load_state_dict(load_file(str(path)), strict=True, assign=True)
            return unet.to(dtype)
    raise ModelError(
        f"{path} does not hold the weights of a known UNet (sdxl-base, tiny-sdxl); "
        "for other architectures pass a diffusers folder with its config.json"
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_from_hub(repo_id: str, dtype: torch.dtype, *, config_only: bool = False) -> Any:
    """The local Hugging Face cache first; the network only if it answers (no minute of retries)."""
    kwargs: dict[str, Any] = {"subfolder": "unet"}
    attempts = [True] + ([False] if _hub_reachable() else [])
    for local_only in attempts:
        try:
            if config_only:
                return UNet2DConditionModel.load_config(repo_id, local_files_only=local_only, **kwargs)
            return UNet2DConditionModel.from_pretrained(
                repo_id, torch_dtype=dtype, use_safetensors=True, local_files_only=local_only, **kwargs
            )
        except (OSError, ValueError):
            continue
    raise ModelError(
        f"cannot load model '{repo_id}' from the Hugging Face hub (not cached, hub unreachable); "
        "pass a local diffusers folder or a .safetensors file instead"
    )


def attention_blocks(unet: UNet2DConditionModel, height: int, width: int) -> list[AttentionBlock]:
    """Every ``Transformer2DModel`` of the UNet with the token grid it sees at ``height``×``width`` pixels.

    The grid is read off a forward pass of a ``meta`` copy (no memory, no compute), so it is exact for
    any UNet layout rather than inferred from block types.
    """
    named = [(n, m) for n, m in unet.named_modules() if isinstance(m, Transformer2DModel)]
    if not named:
        raise ModelError("the UNet has no Transformer2DModel attention blocks; AT-EDM needs an SDXL-like UNet")
    meta = build_unet(dict(unet.config), device="meta")
    grids: dict[str, tuple[int, int, int]] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda mod, args, kwargs, name=name: grids.__setitem__(name, tuple(args[0].shape[1:])),
            with_kwargs=True,
        )
        for name, module in meta.named_modules()
        if isinstance(module, Transformer2DModel)
    ]
    try:
        shapes = unet_inputs(dict(unet.config), 1, height, width, text_length=77)
        with torch.no_grad():
            meta(**example_inputs(shapes, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    layers = {name: len(module.transformer_blocks) for name, module in named}
    # ``grids`` filled in call order: down, mid, up, the order a reader of the UNet expects.
    return [AttentionBlock(name, h, w, layers[name], c) for name, (c, h, w) in grids.items()]
