"""Model families: one record per family, registered by name, owning everything that differs between them.

A family is what a diffusers ``UNet2DConditionModel`` is conditioned on and the stock pipeline that drives
it: how many time ids it takes, how to recognize it from a UNet config, the pipeline class, its default
guidance scale, the VAE's scaling factor, what the scheduler predicts, and the built-in architectures
(full size and tiny) that belong to it. Every other module reads the record (``contract.py`` the graph's
inputs, ``models.py`` the built-ins, ``runtime/`` the pipeline), so adding a family is one ``register``
call here plus its graph specs (``docs/families.md``).

As optimum's ``TasksManager`` fills its table of export configs by model type, ``register`` fills
``FAMILIES`` by name and refuses a second record under a taken name or built-in. ``family_of`` reads a
config: families are tried in registration order, and ``register`` checks that each new family's built-ins
are recognized as its own, so a narrower family (the refiner) must register before the broader one whose
reading would also accept its configs (SDXL).

This module is the bottom of the package's import chain: it imports nothing of the package but ``errors``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

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

#: The UNet of stabilityai/stable-diffusion-xl-refiner-1.0: one text encoder (OpenCLIP bigG, 1280 wide),
#: 5 time ids (original size, crop, aesthetic score), 4-layer attention blocks at 64x64 and 32x32 tokens.
SDXL_REFINER_CONFIG: dict[str, Any] = {
    **SDXL_BASE_CONFIG,
    "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "projection_class_embeddings_input_dim": 2560,
    "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}

#: The UNet of stable-diffusion-v1-5: conv proj_in/proj_out, 16 one-layer attention blocks, 4096 tokens
#: at the finest level at 512 px, text conditioning only (CLIP ViT-L, 768 wide).
SD15_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

#: The UNet of stabilityai/stable-diffusion-2-1 (768 px, v-prediction): linear projections, OpenCLIP-H text
#: (1024 wide), attention upcast to fp32.
SD21_CONFIG: dict[str, Any] = {
    **SD15_CONFIG,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}

#: segmind/SSD-1B: SDXL distilled to 1.3 B parameters. Fewer layers per block, asymmetric between the down
#: and up paths (``reverse_transformer_layers_per_block``), and a mid block with no attention.
SSD_1B_CONFIG: dict[str, Any] = {
    **SDXL_BASE_CONFIG,
    "mid_block_type": "UNetMidBlock2D",
    "transformer_layers_per_block": [[1], [2, 2], [4, 4]],
    "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], 1],
}
#: segmind/Segmind-Vega: SDXL distilled further (1-2 layers per block, no mid-block attention).
VEGA_CONFIG: dict[str, Any] = {
    **SDXL_BASE_CONFIG,
    "mid_block_type": "UNetMidBlock2D",
    "transformer_layers_per_block": [1, 1, 2],
}

#: Each family's topology at tiny widths, so every code path runs in seconds on a CPU. Text widths are
#: narrow too (SDXL: encoder_hidden_states [B, T, 64], text_embeds [B, 32], time_ids [B, 6]).
TINY_SDXL_CONFIG: dict[str, Any] = {
    **SDXL_BASE_CONFIG,
    "addition_time_embed_dim": 8,
    "attention_head_dim": [1, 2, 3],
    "block_out_channels": [32, 64, 96],
    "cross_attention_dim": 64,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
    "sample_size": 32,
}
#: The refiner's pooled text is as wide as its text (48): that is how its 5 time ids are recognized.
TINY_SDXL_REFINER_CONFIG: dict[str, Any] = {
    **SDXL_REFINER_CONFIG,
    "addition_time_embed_dim": 8,
    "attention_head_dim": [1, 2, 3, 3],
    "block_out_channels": [32, 64, 96, 96],
    "cross_attention_dim": 48,
    "projection_class_embeddings_input_dim": 48 + 5 * 8,
    "sample_size": 32,
}
TINY_SSD_1B_CONFIG: dict[str, Any] = {
    **TINY_SDXL_CONFIG,
    "mid_block_type": "UNetMidBlock2D",
    "transformer_layers_per_block": SSD_1B_CONFIG["transformer_layers_per_block"],
    "reverse_transformer_layers_per_block": SSD_1B_CONFIG["reverse_transformer_layers_per_block"],
}
TINY_SD15_CONFIG: dict[str, Any] = {
    **SD15_CONFIG,
    "block_out_channels": [32, 64, 64, 64],
    "cross_attention_dim": 32,
    "sample_size": 32,
}
TINY_SD21_CONFIG: dict[str, Any] = {
    **SD21_CONFIG,
    "attention_head_dim": [2, 4, 4, 4],
    "block_out_channels": [32, 64, 64, 64],
    "cross_attention_dim": 48,
    "sample_size": 32,
}

#: What every ``UNet2DConditionModel`` config states: a config without them is not one.
REQUIRED_KEYS = ("in_channels", "cross_attention_dim", "block_out_channels")
#: Conditioning no family feeds: a UNet that needs it is refused by the key's name before any family is tried.
UNSUPPORTED_KEYS = ("class_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim")


@dataclass(frozen=True)
class Builtin:
    """A built-in architecture, built from its config with seeded random weights, offline.

    ``tiny-*`` ones keep a family's topology at tiny widths, so every code path (the pipeline included)
    runs in seconds on a CPU; the full-size ones are bare UNets, for shapes, FLOPs and single-file loading.
    """

    name: str
    config: dict[str, Any] = field(compare=False, repr=False)  # a plain dict: diffusers and json.dumps take it
    prediction_type: str | None = None  # None: the family's

    @property
    def tiny(self) -> bool:
        return self.name.startswith("tiny-")


@dataclass(frozen=True)
class Family:
    """Everything about one model family that the graph, the loaders and the pipeline need (module docstring)."""

    name: str
    description: str
    time_ids: int  # 0: no added conditioning, so no text_embeds / time_ids graph inputs
    pipeline: str  # the stock diffusers pipeline class, by name (diffusers loads only when a pipeline is built)
    guidance: float  # the classifier-free guidance scale the family's pipeline defaults to
    vae_scaling: float  # the VAE's scaling_factor: latents are the encoded image times it
    text_encoders: int  # with added conditioning, the last one also gives the pooled text
    builtins: tuple[Builtin, ...] = ()
    prediction_type: str = "epsilon"  # what the UNet predicts, where a built-in does not say otherwise
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=dict, compare=False)  # other constructor keywords

    @property
    def added_conditioning(self) -> bool:
        return self.time_ids > 0

    @property
    def addition_embed_type(self) -> str | None:
        """The config's ``addition_embed_type``: SDXL's ``text_time`` where the family adds conditioning."""
        return "text_time" if self.added_conditioning else None

    def add_embedding_width(self, config: Mapping[str, Any]) -> int:
        """``add_embedding.linear_1.in_features`` (0 without added conditioning): the pooled text and the embedded
        time ids side by side. SDXL pipelines check their time ids against it on ``pipe.unet``, so the runtime's
        stand-in for the UNet states it."""
        return _text_time_widths(config)[0] if self.added_conditioning else 0

    def pooled_dim(self, config: Mapping[str, Any]) -> int:
        """Width of the pooled text embedding (``text_embeds``): the added projection less the time ids; 0 for SD."""
        if not self.added_conditioning:
            return 0
        projection, per_id = _text_time_widths(config)
        return projection - self.time_ids * per_id

    def matches(self, config: Mapping[str, Any]) -> bool:
        """Whether ``config`` reads as this family.

        A config does not state how many time ids it takes, only their width together with the pooled text
        (``projection_class_embeddings_input_dim = pooled + n × addition_time_embed_dim``). A family with one text
        encoder (the refiner) pools that encoder, so its pooled text is as wide as its text (1280 = 2560 − 5 × 256);
        SDXL base's two encoders (768 + 1280 wide, pooled 1280) never give that under 5 ids, so it is what tells
        the two apart. A two-encoder family accepts any width: it is tried after the narrower ones.
        """
        if config.get("addition_embed_type") != self.addition_embed_type:
            return False
        if not self.added_conditioning or self.text_encoders > 1:
            return True
        return self.pooled_dim(config) == int(config["cross_attention_dim"])

    def builtin(self, name: str) -> Builtin | None:
        return next((b for b in self.builtins if b.name == name), None)

    def prediction_type_of(self, model: str) -> str:
        """What the built-in ``model`` predicts (SD 2.1: velocity), else the family's default."""
        found = self.builtin(model)
        return found.prediction_type if found and found.prediction_type else self.prediction_type


def _text_time_widths(config: Mapping[str, Any]) -> tuple[int, int]:
    """``(projection_class_embeddings_input_dim, addition_time_embed_dim)`` of a config with text_time conditioning."""
    try:
        return int(config["projection_class_embeddings_input_dim"]), int(config["addition_time_embed_dim"])
    except (KeyError, TypeError, ValueError):
        raise ModelError("the UNet config has text_time conditioning without integer "
                         "projection_class_embeddings_input_dim and addition_time_embed_dim; "
                         "expected an SDXL UNet config") from None


# --- the registry -------------------------------------------------------------------------------------

#: Every family by name, in registration order (the order ``family_of`` tries them in).
FAMILIES: dict[str, Family] = {}


def _first_reader(config: Mapping[str, Any], families: Iterable[Family]) -> Family | None:
    return next((f for f in families if f.matches(config)), None)


def _check_new(family: Family, registry: Mapping[str, Family]) -> None:
    """Refuse a family whose name or built-in is taken, or whose built-ins ``family_of`` would not give it."""
    if family.name in registry:
        raise ValueError(f"model family '{family.name}' is already registered")
    taken = {b.name for f in registry.values() for b in f.builtins}
    for b in family.builtins:
        if b.name in taken:
            raise ValueError(f"built-in '{b.name}' of model family '{family.name}' is already registered")
        taken.add(b.name)
        reader = _first_reader(b.config, (*registry.values(), family))
        if reader is not family:
            raise ValueError(f"built-in '{b.name}' reads as model family '{reader.name if reader else 'none'}', not "
                             f"'{family.name}'; register a narrower family before the broader one that accepts it")


def register(family: Family, registry: dict[str, Family] | None = None) -> Family:
    """Add ``family`` to ``registry`` (``FAMILIES``) under its name and return it: ``SD = register(Family(...))``.

    Refused with ``ValueError`` (a developer's mistake, not a user's): a name or built-in registered twice, or a
    built-in that ``family_of`` would give to an earlier family or to none, since every user checkpoint of that
    architecture would be misread with it.
    """
    registry = FAMILIES if registry is None else registry
    _check_new(family, registry)
    registry[family.name] = family
    return family


def family_named(name: str) -> Family:
    """The registered family called ``name``, or a one-line refusal listing the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelError(f"unknown model family '{name}'; known: {', '.join(FAMILIES)}") from None


def _check_config(config: Mapping[str, Any]) -> None:
    """Refuse, naming the key, a config that is no ``UNet2DConditionModel``'s or needs conditioning no family feeds."""
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ModelError(f"the UNet config has no '{missing[0]}'; expected a diffusers UNet2DConditionModel config")
    unsupported = [(k, config.get(k)) for k in UNSUPPORTED_KEYS if config.get(k) is not None]
    if unsupported:
        key, value = unsupported[0]
        raise ModelError(f"the UNet config sets {key}={value!r}; supported are SD 1.x/2.x and SDXL UNets, "
                         "which take only text (and SDXL's text_time) conditioning")


def _supported_conditioning() -> str:
    """``none (sd) or 'text_time' (sdxl-refiner, sdxl)``: each addition_embed_type a family reads, and by whom."""
    readers: dict[str | None, list[str]] = {}
    for f in FAMILIES.values():
        readers.setdefault(f.addition_embed_type, []).append(f.name)
    return " or ".join(f"{'none' if kind is None else repr(kind)} ({', '.join(names)})"
                       for kind, names in readers.items())


def family_of(config: Mapping[str, Any]) -> Family:
    """The family of a ``UNet2DConditionModel`` config: the first registered one that reads it; else a one-line
    refusal naming what was found."""
    _check_config(config)
    found = _first_reader(config, FAMILIES.values())
    if found is None:
        raise ModelError(f"the UNet config sets addition_embed_type={config.get('addition_embed_type')!r}; "
                         f"supported: {_supported_conditioning()}")
    return found


def builtin_configs() -> dict[str, dict[str, Any]]:
    """Every registered built-in's config by name: the full-size architectures first, then the tiny ones."""
    builtins = sorted((b for f in FAMILIES.values() for b in f.builtins), key=lambda b: b.tiny)
    return {b.name: b.config for b in builtins}


# --- the families -------------------------------------------------------------------------------------
# Narrower readings first: the refiner's configs also read as SDXL, so it registers before SDXL.

SD = register(Family(
    name="sd", description="SD 1.x / 2.x (text conditioning only)", time_ids=0,
    pipeline="StableDiffusionPipeline", guidance=7.5, vae_scaling=0.18215, text_encoders=1,
    builtins=(Builtin("sd15", SD15_CONFIG), Builtin("sd21", SD21_CONFIG, "v_prediction"),
              Builtin("tiny-sd15", TINY_SD15_CONFIG), Builtin("tiny-sd21", TINY_SD21_CONFIG, "v_prediction")),
    pipeline_kwargs={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
))
SDXL_REFINER = register(Family(
    name="sdxl-refiner", description="SDXL refiner (pooled text + size/crop/aesthetic-score time ids)", time_ids=5,
    pipeline="StableDiffusionXLImg2ImgPipeline", guidance=5.0, vae_scaling=0.13025, text_encoders=1,
    builtins=(Builtin("sdxl-refiner", SDXL_REFINER_CONFIG), Builtin("tiny-sdxl-refiner", TINY_SDXL_REFINER_CONFIG)),
    pipeline_kwargs={"requires_aesthetics_score": True},
))
SDXL = register(Family(
    name="sdxl", description="SDXL (pooled text + size/crop time ids)", time_ids=6,
    pipeline="StableDiffusionXLPipeline", guidance=5.0, vae_scaling=0.13025, text_encoders=2,
    builtins=(Builtin("sdxl-base", SDXL_BASE_CONFIG), Builtin("ssd-1b", SSD_1B_CONFIG),
              Builtin("segmind-vega", VEGA_CONFIG), Builtin("tiny-sdxl", TINY_SDXL_CONFIG),
              Builtin("tiny-ssd1b", TINY_SSD_1B_CONFIG)),
))
