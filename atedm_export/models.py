"""Load a diffusers UNet of any supported family from wherever the user keeps it, or build a built-in one.

Families (``families.py`` tells them apart from the config and owns the built-in architectures): SD 1.x,
SD 2.x, SDXL base and every SDXL-architecture checkpoint (Playground v2.5, fine-tunes), the SDXL refiner,
distilled SDXL (SSD-1B, Vega). Sources, tried in this order:

* a built-in architecture name (``sd15``, ``sdxl-base``, ``tiny-sd15``, ...): seeded random weights, offline;
* a local diffusers folder (a pipeline folder with ``unet/`` or a bare UNet folder);
* a single ``.safetensors`` checkpoint (original CompVis/SGM layout or diffusers layout) of a built-in
  architecture, recognized from its tensor shapes;
* a Hugging Face hub id (the local cache first, then the network).

Weights are only ever read from safetensors: pickle files are refused. The same code path loads a
user's real checkpoint and the tiny test models saved with ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from safetensors import SafetensorError

from .contract import GraphContract
from .errors import ModelError, first_line
from .shapes import AttentionBlock
from .families import SDXL_BASE_CONFIG, TINY_SDXL_CONFIG, builtin_configs, family_of  # noqa: F401 - configs re-exported
from .userfiles import load_json

#: Every built-in architecture's config by name, read off the family records (``families.py`` owns them).
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = builtin_configs()


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
    family_of(config)  # a config the graph contract cannot serve is refused by name, before diffusers trips on it
    torch.manual_seed(seed)
    try:
        with _default_dtype(dtype), torch.device(device):
            unet = UNet2DConditionModel.from_config(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelError(f"the UNet config does not build a UNet2DConditionModel: {first_line(exc)}") from None
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


PIPELINE_INDEX = "model_index.json"  # what makes a folder a diffusers pipeline


def pipeline_folder(source: str) -> Path | None:
    """The diffusers pipeline folder a local model belongs to: the folder itself (``pipe/``) or, for a UNet
    folder inside one (``pipe/unet``), its parent. None for built-ins, single files, hub ids and bare UNets."""
    if is_builtin(source):
        return None
    path = Path(source).expanduser()
    if not path.is_dir():
        return None
    for folder in (path, path.parent):
        if (folder / PIPELINE_INDEX).is_file():
            return folder.resolve()
    return None


def pipeline_files(folder: Path) -> list[Path]:
    """The files a pipeline loads around the UNet (what ``generate`` reads besides the build): configs,
    tokenizer files and the default-variant safetensors of every component but ``unet/``. Other variants
    (``*.fp16.safetensors``) and pickle files are never loaded, so they are not part of the fingerprint."""
    found = []
    for file in sorted(folder.rglob("*")):
        parts = file.relative_to(folder).parts
        if not file.is_file() or parts[0] == "unet" or any(p.startswith(".") for p in parts):
            continue
        if file.suffix in (".json", ".txt", ".model") or (file.suffix == ".safetensors" and file.name.count(".") == 1):
            found.append(file)
    return found


def _is_path(source: str) -> bool:
    """A source written as a path (or a checkpoint file name) is never looked up on the hub."""
    return source.endswith((".safetensors", ".ckpt", ".bin", ".pt", ".pth")) or source.startswith((".", "/", "~"))


def _missing(source: str) -> ModelError:
    return ModelError(f"model path {source} does not exist; expected a diffusers folder or a .safetensors file")


def _read_config(path: Path) -> dict[str, Any]:
    config = load_json(path, "a diffusers UNet config", ModelError)
    if not isinstance(config, dict):
        raise ModelError(f"{path} holds a {type(config).__name__}; expected a diffusers UNet config (a JSON object)")
    return config


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
        return _read_config(folder / (sub or "") / "config.json")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelError(f"model file {path} is not a .safetensors file (pickle checkpoints are never loaded)")
        return dict(BUILTIN_CONFIGS[single_file_architecture(path)[0]])
    if _is_path(source):
        raise _missing(source)
    return dict(_load_from_hub(source, torch.float32, config_only=True))


def load_unet(
    source: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0, loras: Sequence[Any] = ()
) -> UNet2DConditionModel:
    """Load (or build) the UNet named by ``source``; see the module docstring for the sources. ``loras`` (each with
    ``file`` and ``scale``: the spec's ``LoraSpec``, the manifest's ``LoraEntry``) are fused into it (``lora.py``)."""
    if is_builtin(source):
        unet = build_unet(BUILTIN_CONFIGS[source], dtype=dtype, device=device, seed=seed)
    else:
        path = Path(source).expanduser()
        if path.exists():
            unet = _load_local(path, dtype)
        elif _is_path(source):
            raise _missing(source)
        else:
            unet = _load_from_hub(source, dtype)
        unet = unet.to(device).eval().requires_grad_(False)
    if loras:
        from .lora import fuse_loras

        fuse_loras(unet, loras)
    return unet


def _load_local(path: Path, dtype: torch.dtype) -> UNet2DConditionModel:
    if path.is_dir():
        found = _local_unet_folder(path)
        if found is None:
            raise ModelError(f"model folder {path} has no config.json or unet/config.json; expected a diffusers folder")
        folder, sub = found
        weights = folder / (sub or "")
        if not any(weights.glob("*.safetensors")):
            raise ModelError(f"model folder {weights} has no .safetensors weights (pickle files are never loaded)")
        try:
            return UNet2DConditionModel.from_pretrained(folder, subfolder=sub, torch_dtype=dtype, use_safetensors=True)
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise ModelError(f"cannot load the UNet in {weights}: {first_line(exc)} (expected diffusers' save_pretrained "
                             "output: config.json and .safetensors weights)") from None
    if path.suffix != ".safetensors":
        raise ModelError(f"model file {path} is not a .safetensors file (pickle checkpoints are never loaded)")
    return _load_single_file(path, dtype)


LDM_PREFIX = "model.diffusion_model."  # original (CompVis/SGM) checkpoints keep the UNet under this prefix


def _checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from a safetensors header (no weights read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path} is not a readable safetensors file ({exc}); expected a UNet checkpoint") from None


@functools.cache
def _builtin_shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build_unet(BUILTIN_CONFIGS[name], device="meta").state_dict().items()}


def _as_diffusers_shapes(shapes: dict[str, tuple[int, ...]], config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """An original-layout checkpoint's shapes as diffusers keys under ``config``: diffusers' own conversion,
    run on ``meta`` tensors, so no weight is read. Empty when the layout does not fit the config."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    meta = {k: torch.empty(v, device="meta") for k, v in shapes.items() if k.startswith(LDM_PREFIX)}
    try:
        converted = convert_ldm_unet_checkpoint(meta, config)
    except (KeyError, IndexError, ValueError, RuntimeError):
        return {}
    return {k: tuple(v.shape) for k, v in converted.items()}


def single_file_architecture(path: Path) -> tuple[str, bool]:
    """``(built-in architecture, original layout?)`` of a single checkpoint, recognized from its shapes.

    Every built-in architecture of every family is tried (SD 1.5, SD 2.x, SDXL base and refiner, SSD-1B,
    Vega and the tiny ones), so a fine-tune of any of them loads; other layouts are refused by name.
    """
    shapes = _checkpoint_shapes(path)
    original = any(k.startswith(LDM_PREFIX) for k in shapes)
    for name, config in BUILTIN_CONFIGS.items():
        expected = _builtin_shapes(name)
        if original and (shapes.get(LDM_PREFIX + "input_blocks.0.0.weight") != expected["conv_in.weight"]
                         or shapes.get(LDM_PREFIX + "out.2.weight") != expected["conv_out.weight"]):
            continue
        if (_as_diffusers_shapes(shapes, config) if original else shapes) == expected:
            return name, original
    layout = "original" if original else "diffusers"
    raise ModelError(
        f"{path} ({layout} layout, {len(shapes)} tensors) does not hold the weights of a known UNet "
        f"({', '.join(BUILTIN_CONFIGS)}); for other architectures pass a diffusers folder with its config.json"
    )


def _load_single_file(path: Path, dtype: torch.dtype) -> UNet2DConditionModel:
    """A single checkpoint of a built-in architecture: original (``model.diffusion_model.*``) or diffusers keys.

    Original layouts go through diffusers' single-file loader with the recognized architecture's config
    (offline: the config is written beside, never fetched); diffusers layouts load straight into it.
    """
    from safetensors.torch import load_file

    name, original = single_file_architecture(path)
    config = BUILTIN_CONFIGS[name]
    if original:
        with tempfile.TemporaryDirectory() as config_dir:
            (Path(config_dir) / "unet").mkdir()
            (Path(config_dir) / "unet" / "config.json").write_text(json.dumps(config))
            return UNet2DConditionModel.from_single_file(
                str(path), config=config_dir, subfolder="unet", torch_dtype=dtype, local_files_only=True
            )
    unet = build_unet(config, dtype=dtype, device="meta")
    unet.load_state_dict(load_file(str(path)), strict=True, assign=True)
    return unet.to(dtype)


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
        kinds = sorted({type(m).__name__ for m in unet.modules() if "Attention" in type(m).__name__ or "Attn" in type(m).__name__})
        raise ModelError(
            f"the UNet has no Transformer2DModel attention blocks (found: {', '.join(kinds) or 'no attention'}); "
            "AT-EDM prunes the tokens of Transformer2DModel blocks, as in SD 1.x/2.x and SDXL UNets"
        )
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
        contract = GraphContract.from_config(dict(unet.config), 1, height, width)
        with torch.no_grad():
            meta(**contract.unet_kwargs(contract.example_feed(device="meta")))
    finally:
        for hook in hooks:
            hook.remove()
    layers = {name: len(module.transformer_blocks) for name, module in named}
    # ``grids`` filled in call order: down, mid, up, the order a reader of the UNet expects.
    return [AttentionBlock(name, h, w, layers[name], c) for name, (c, h, w) in grids.items()]
