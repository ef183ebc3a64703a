"""LoRAs fused into the UNet: read with diffusers' own loaders, checked against the UNet, fused with PEFT.

A LoRA is a ``.safetensors`` file in any layout diffusers loads: diffusers/PEFT (``unet.….lora_A.weight``,
the older ``….lora.down.weight`` and ``to_q_lora``), kohya/A1111 (``lora_unet_…lora_down.weight`` with
``alpha``; SDXL's SGM block names mapped through the UNet's config). The family's pipeline class reads it
(``lora_state_dict``: the same conversion ``pipe.load_lora_weights`` runs), every key is put in PEFT's form,
and the UNet takes it as diffusers does: ``load_lora_adapter``, ``fuse_lora`` at the LoRA's scale, then
``unload_lora``, which leaves plain ``Linear``/``Conv2d`` modules holding the fused weights. Several LoRAs
are fused one after the other, each at its own scale.

Before any of that, ``check_lora`` reads the file against the UNet's modules (a ``meta`` UNet is enough):
a tensor for a module the UNet lacks, or of a shape the module cannot take, is a one-line ``LoraError``
naming the tensor and the file, raised before minutes of export rather than lost in a PEFT warning. The
parameters a LoRA changes (``changed_parameters``) are what ``refit`` rewrites.

Two things diffusers does differently, on purpose: pickle files are never read (only ``.safetensors``), and
every key is converted, not only when the first one looks old-style (diffusers' loader decides on the first
key, so a file mixing ``lora.down`` and ``lora_A`` names would load in part, with a warning).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .errors import AtedmError, first_line

PREFIX = "unet"  # the UNet's tensors in a pipeline LoRA file: ``unet.…``
_OTHER_PREFIXES = ("text_encoder", "text_encoder_2", "te_", "lora_te")  # components a UNet build does not hold
_MARKERS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".lokr_")  # where a module's path ends in a PEFT key


class LoraError(AtedmError):
    """A LoRA file that cannot be read, or that does not fit the UNet it is fused into."""


class LoraLike(Protocol):
    """What names a LoRA: the spec's ``LoraSpec`` and the manifest's ``LoraEntry`` both are."""

    file: str
    scale: float


@dataclass(frozen=True)
class LoraWeights:
    """One LoRA file read for the UNet: its tensors in PEFT's form under ``unet.``, and what came with them."""

    path: Path
    scale: float
    tensors: dict[str, torch.Tensor]
    network_alphas: dict[str, float] | None  # kohya's per-module alphas
    metadata: dict[str, Any] | None  # diffusers' saved adapter config
    other: int  # tensors for other components (text encoders): not part of a UNet build

    @property
    def name(self) -> str:
        return self.path.name

    def modules(self) -> dict[str, list[str]]:
        """Each module the LoRA adapts (its path in the UNet) → the LoRA's tensor keys for it."""
        found: dict[str, list[str]] = {}
        for key in self.tensors:
            inner = key.removeprefix(f"{PREFIX}.")
            cut = min((i for i in (inner.find(m) for m in _MARKERS) if i >= 0), default=-1)
            if cut < 0:
                raise LoraError(f"LoRA {self.name}: tensor '{key}' is not a LoRA tensor (expected lora_A/lora_B, "
                                "lora_down/lora_up or lokr_ names)")
            found.setdefault(inner[:cut], []).append(key)
        return found


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """diffusers and PEFT narrate through logging and warnings; our errors say what matters in one line."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def lora_path(file: str) -> Path:
    """The LoRA file, checked to exist and to be a ``.safetensors`` file (pickle files are never loaded)."""
    path = Path(file).expanduser()
    if path.is_dir():
        raise LoraError(f"LoRA {file} is a folder; expected a .safetensors file")
    if not path.is_file():
        raise LoraError(f"LoRA file {file} does not exist")
    if path.suffix != ".safetensors":
        raise LoraError(f"LoRA file {file} is not a .safetensors file (pickle checkpoints are never loaded)")
    return path


def read_lora(file: str, scale: float, unet_config: dict[str, Any]) -> LoraWeights:
    """Read a LoRA file with the family's pipeline loader (diffusers' conversions, kohya included), keys in PEFT form."""
    import diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors import SafetensorError

    from .families import family_of

    path = lora_path(file)
    loader = getattr(diffusers, family_of(unet_config).pipeline)
    try:
        with _quiet():
            state, alphas, metadata = loader.lora_state_dict(str(path), use_safetensors=True, local_files_only=True,
                                                             return_lora_metadata=True, unet_config=unet_config)
    except (SafetensorError, OSError, ValueError, KeyError, IndexError, RuntimeError) as exc:
        raise LoraError(f"LoRA {path.name}: not a LoRA diffusers can read ({first_line(exc)})") from None
    ours = {k: v for k, v in state.items() if k.startswith(f"{PREFIX}.")}
    other = sum(1 for k in state if k.startswith(_OTHER_PREFIXES))
    if not ours and not other:
        ours = {f"{PREFIX}.{k}": v for k, v in state.items()}  # a bare PEFT save of the UNet (no component prefix)
    if not ours:
        raise LoraError(f"LoRA {path.name} holds no UNet tensors ({other} for the text encoders); nothing to fuse")
    tensors = convert_unet_state_dict_to_peft(ours)  # every key, not only when the first one is old-style
    return LoraWeights(path, float(scale), tensors, alphas or None, metadata or None, other)


def check_lora(lora: LoraWeights, unet: torch.nn.Module) -> list[str]:
    """Every tensor of ``lora`` against the module it adapts (``unet`` may be on ``meta``); the parameters it changes.

    A module the UNet lacks, a module LoRA cannot adapt, a tensor that is not finite floating point, factors
    that do not pair at one rank, a change past ``MAX_CHANGE`` or a shape the module cannot take is one line
    naming the tensor and the file.
    """
    modules = {path: _target(lora, path, keys, unet) for path, keys in lora.modules().items()}
    changed = []
    for module_path, keys in lora.modules().items():
        _check_factors(lora, module_path, keys)
        module = modules[module_path]
        for key in keys:
            _check_shape(lora, key, module_path, module)
        changed.append(f"{module_path}.weight")
        if any(k.endswith(".lora_B.bias") for k in keys) and module.bias is not None:
            changed.append(f"{module_path}.bias")
    return sorted(changed)


def _target(lora: LoraWeights, path: str, keys: list[str], unet: torch.nn.Module) -> torch.nn.Module:
    """The module a LoRA's tensors adapt, which must exist and be one LoRA adapts (checked for every module first:
    a LoRA for another model is said as such, not as a missing factor)."""
    try:
        module = unet.get_submodule(path)
    except AttributeError:
        raise LoraError(f"LoRA {lora.name}: tensor '{keys[0]}' targets '{path}', which this UNet does not "
                        "have (a LoRA for another model?)") from None
    if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        raise LoraError(f"LoRA {lora.name}: tensor '{keys[0]}' targets '{path}', a "
                        f"{type(module).__name__}; LoRA adapts Linear and Conv2d modules")
    return module


#: The largest weight change a LoRA may make to one element: SD weights are of order 1, so a fused change past
#: this swamps the model (and past 65,504 overflows an fp16 graph); such a file is corrupt or not a LoRA.
MAX_CHANGE = 1e4


def _check_factors(lora: LoraWeights, path: str, keys: list[str]) -> None:
    """Each tensor floating point and finite; ``lora_A`` and ``lora_B`` in pairs of one rank above 0; the fused
    change ``B·A`` within ``MAX_CHANGE``: what diffusers and PEFT would otherwise fail on with a traceback, or
    fuse into NaN weights without a word."""
    for key in keys:
        tensor = lora.tensors[key]
        if not tensor.is_floating_point():
            raise LoraError(f"LoRA {lora.name}: tensor '{key}' is {str(tensor.dtype).removeprefix('torch.')}; "
                            "expected floating point (fp16, bf16 or fp32)")
        if not bool(torch.isfinite(tensor).all()):
            raise LoraError(f"LoRA {lora.name}: tensor '{key}' holds NaN or infinite values")
    factors = {suffix: next((k for k in keys if k.endswith(f".{suffix}.weight")), None) for suffix in ("lora_A", "lora_B")}
    down, up = factors["lora_A"], factors["lora_B"]
    if down is None and up is None:
        return  # DoRA magnitudes alone, LoKr factors: PEFT checks them as it loads
    if down is None or up is None:
        have, lack = ("lora_A", "lora_B") if up is None else ("lora_B", "lora_A")
        raise LoraError(f"LoRA {lora.name}: '{path}' has {have} ('{down or up}') but no {lack}; "
                        "expected both factors of every adapted module")
    a, b = lora.tensors[down], lora.tensors[up]
    rank_a, rank_b = (a.shape[0] if a.dim() else 0), (b.shape[1] if b.dim() > 1 else 0)
    if rank_a == 0 or rank_a != rank_b:
        raise LoraError(f"LoRA {lora.name}: '{path}' has lora_A of rank {rank_a} and lora_B of rank {rank_b}; "
                        "expected one rank above 0")
    change = (b.float().flatten(1) @ a.float().flatten(1)).abs().max().item() * _alpha(lora, path, rank_a) * lora.scale
    if not change <= MAX_CHANGE:
        raise LoraError(f"LoRA {lora.name}: '{path}' changes a weight by {change:.3g} at scale {lora.scale:g}; "
                        f"expected at most {MAX_CHANGE:g} (weights are of order 1: a corrupt file?)")


def _alpha(lora: LoraWeights, path: str, rank: int) -> float:
    """The module's ``alpha / rank`` factor: kohya's per-module alphas, else 1 (PEFT's own saves fold it in)."""
    if not lora.network_alphas:
        return 1.0
    alpha = next((v for k, v in lora.network_alphas.items() if k.removeprefix(f"{PREFIX}.").startswith(path)), None)
    return 1.0 if alpha is None else float(alpha) / rank


def _check_shape(lora: LoraWeights, key: str, path: str, module: torch.nn.Module) -> None:
    shape = list(lora.tensors[key].shape)
    if isinstance(module, torch.nn.Linear):
        what = f"Linear {module.in_features}→{module.out_features}"
        expected = {"lora_A.weight": ["r", module.in_features], "lora_B.weight": [module.out_features, "r"],
                    "lora_B.bias": [module.out_features]}
    else:
        kernel = list(module.kernel_size)
        what = f"Conv2d {module.in_channels}→{module.out_channels}, kernel {'x'.join(map(str, kernel))}"
        expected = {"lora_A.weight": ["r", module.in_channels // module.groups, *kernel],
                    "lora_B.weight": [module.out_channels, "r", 1, 1], "lora_B.bias": [module.out_channels]}
    suffix = next((s for s in expected if key.endswith("." + s)), None)
    if suffix is None:
        return  # DoRA magnitudes, LoKr factors: PEFT checks them as it loads
    wanted = expected[suffix]
    if len(shape) != len(wanted) or any(w != "r" and w != s for w, s in zip(wanted, shape)):
        shown = "[" + ", ".join(map(str, wanted)) + "]"
        raise LoraError(f"LoRA {lora.name}: tensor '{key}' has shape {shape}; '{path}' ({what}) takes {shown}")


def check_loras(loras: Sequence[LoraLike], unet: torch.nn.Module) -> list[str]:
    """Read and check each LoRA against ``unet`` (``meta`` is enough); every parameter they change, sorted."""
    changed: set[str] = set()
    for item in loras:
        changed |= set(check_lora(read_lora(item.file, item.scale, dict(unet.config)), unet))
    return sorted(changed)


def fuse_loras(unet: torch.nn.Module, loras: Sequence[LoraLike]) -> list[str]:
    """Fuse each LoRA into ``unet`` in place, at its scale, one after the other; the parameters they changed.

    Each goes the way diffusers loads a LoRA into a UNet (``load_lora_adapter``, ``fuse_lora``, ``unload_lora``):
    afterwards the UNet has no PEFT layers left, only its own modules with the fused weights.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    changed: set[str] = set()
    for index, item in enumerate(loras):
        lora = read_lora(item.file, item.scale, dict(unet.config))
        targets = check_lora(lora, unet)
        name = f"atedm_lora_{index}"
        try:
            with _quiet(), torch.no_grad():
                # low_cpu_mem_usage: the adapter's layers take the file's tensors as they are, never initialized first
                unet.load_lora_adapter(lora.tensors, prefix=PREFIX, adapter_name=name, metadata=lora.metadata,
                                       network_alphas=None if lora.metadata else lora.network_alphas,
                                       low_cpu_mem_usage=True)
                missing = [p for p in lora.modules() if not isinstance(unet.get_submodule(p), BaseTunerLayer)]
                if missing:
                    raise LoraError(f"LoRA {lora.name}: diffusers left '{missing[0]}' out of the adapter it loaded "
                                    f"({len(missing)} modules; the file's saved adapter config names other modules?)")
                unet.fuse_lora(lora_scale=lora.scale, adapter_names=[name])
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise LoraError(f"LoRA {lora.name}: diffusers could not fuse it: {first_line(exc)}") from None
        finally:
            if getattr(unet, "_hf_peft_config_loaded", False):
                unet.unload_lora()
        changed |= set(targets)
    return sorted(changed)


def describe(loras: Sequence[LoraLike]) -> str:
    """``style.safetensors ×0.8, detail.safetensors ×1``: LoRAs in one line of output."""
    return ", ".join(f"{Path(item.file).name} ×{item.scale:g}" for item in loras)
