"""The family's stock diffusers pipeline around a ``StagedUNet``, and one image generated with it.

SD 1.x/2.x run in ``StableDiffusionPipeline``, SDXL (and SSD-1B, Vega) in ``StableDiffusionXLPipeline``, the
SDXL refiner in ``StableDiffusionXLImg2ImgPipeline`` (``Family.pipeline``). For a build of a diffusers folder (or a cached hub id) the
pipeline's other components come from there. For the built-in tiny models a complete tiny pipeline is
assembled offline with seeded random weights: CLIP text encoders as wide as the tiny UNet's text, a
byte-level tokenizer vocabulary written on the spot, a tiny VAE (8x downsampling) and the family's
scheduler.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler

from ..errors import AtedmError, first_line
from ..families import SDXL_REFINER, Family, family_of
from ..buildfolder import ShapeView, find_view, pipeline_changes
from ..models import BUILTIN_CONFIGS, is_builtin
from ..staging import check_output_file
from .quiet import quiet_libraries
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


def _tiny_text_encoder(tokenizer: Any, width: int, projection: int | None = None, seed: int = 0) -> Any:
    """A 2-layer CLIP text encoder ``width`` wide (with a ``projection``-wide pooled output for SDXL's second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **({"projection_dim": projection} if projection else {}),
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)).eval()


def _tiny_vae(unet_config: dict[str, Any], scaling: float, seed: int = 0) -> AutoencoderKL:
    """A 4-level VAE (8x downsampling), seeded here: every component's weights depend on the seed alone."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[32] * 4, layers_per_block=1, latent_channels=4, norm_num_groups=32,
        sample_size=int(unet_config.get("sample_size", 32)) * 8, scaling_factor=scaling,
    ).eval()


def tiny_components(family: Family, unet_config: dict[str, Any], model: str, seed: int = 0) -> dict[str, Any]:
    """Every pipeline component but the UNet, for the tiny built-in ``model`` of ``family``, seeded.

    The scheduler predicts what the built-in does (tiny SD 2.1: velocity, so the loop is the family's), the VAE
    scales latents by the family's factor, and the pipeline's own keywords (SD: no safety checker) come along.
    """
    scheduler = EulerDiscreteScheduler(**{**SDXL_SCHEDULER, "prediction_type": family.prediction_type_of(model)})
    return {"vae": _tiny_vae(unet_config, family.vae_scaling, seed), "scheduler": scheduler,
            **_tiny_text_encoders(family, unet_config, seed), **family.pipeline_kwargs}


def _tiny_text_encoders(family: Family, unet_config: dict[str, Any], seed: int) -> dict[str, Any]:
    """The family's tokenizers and text encoders, as wide as the UNet's text (and its pooled text, if any).

    SD: one encoder. One encoder with added conditioning (the refiner, OpenCLIP bigG's role): it sits in the
    second slot and its pooled output is as wide as its text. Two (SDXL): the text is split between them, and
    the second also gives the pooled text.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer(Path(tmp))
    width = int(unet_config["cross_attention_dim"])
    if not family.added_conditioning:
        return {"tokenizer": tokenizer, "text_encoder": _tiny_text_encoder(tokenizer, width, seed=seed)}
    pooled = family.pooled_dim(unet_config)
    if family.text_encoders == 1:
        return {"tokenizer": None, "text_encoder": None, "tokenizer_2": tokenizer,
                "text_encoder_2": _tiny_text_encoder(tokenizer, width, projection=pooled, seed=seed)}
    return {"tokenizer": tokenizer, "text_encoder": _tiny_text_encoder(tokenizer, width // 2, seed=seed),
            "tokenizer_2": tokenizer,
            "text_encoder_2": _tiny_text_encoder(tokenizer, width - width // 2, projection=pooled, seed=seed + 1)}


def _pipeline_class(family: Family) -> Any:
    """The family's stock diffusers pipeline class (``Family.pipeline`` names it)."""
    import diffusers

    return getattr(diffusers, family.pipeline)


def tiny_pipeline(model: str, unet: Any = None, seed: int = 0) -> Any:
    """The complete offline pipeline of a tiny built-in ``model``; ``unet`` may be attached later."""
    config = BUILTIN_CONFIGS[model]
    family = family_of(config)
    return _pipeline_class(family)(unet=unet, **tiny_components(family, config, model, seed=seed))


def load_pipeline(staged: StagedUNet) -> Any:
    """The stock pipeline of the build's model family with ``staged`` as its UNet, loaded without the
    libraries' loading bars and notices (``quiet.py``)."""
    with quiet_libraries():
        return _load_pipeline(staged)


def check_pipeline_source(view: ShapeView) -> None:
    """Refuse, before anything loads, a build whose model has no pipeline around the UNet to draw with: a
    full-size built-in (a bare UNet with random weights) or a single UNet checkpoint."""
    model = view.graph_spec.model
    if is_builtin(model) and not model.startswith("tiny-"):
        raise AtedmError(f"model '{model}' is a bare UNet with random weights (no text encoders or VAE); "
                         "to generate images, build from a diffusers pipeline folder")
    if not is_builtin(model) and Path(model).expanduser().is_file():
        raise AtedmError(f"model '{model}' is a single UNet checkpoint (no text encoders or VAE); "
                         "to generate images, build from a diffusers pipeline folder")


def _load_pipeline(staged: StagedUNet) -> Any:
    spec = staged.view.graph_spec
    family = staged.contract.family
    check_pipeline_source(staged.view)
    if is_builtin(spec.model):
        pipe = tiny_pipeline(spec.model, seed=spec.seed)
    else:
        cls = _pipeline_class(family)
        # The pipeline the build found (a unet/ folder's parent) and fingerprinted; else the model as given.
        folder = staged.manifest.pipeline.folder if staged.manifest.pipeline else spec.model
        try:
            pipe = cls.from_pretrained(folder, unet=None, torch_dtype=staged.dtype, use_safetensors=True,
                                       local_files_only=True)
        except (OSError, ValueError) as exc:
            raise AtedmError(f"cannot load the {cls.__name__} around the UNet from '{folder}': "
                             f"{first_line(exc)}") from None
    pipe.set_progress_bar_config(disable=True)
    staged.attach(pipe)
    return pipe.to(staged.device)


@dataclass(frozen=True)
class Generation:
    """What one ``generate`` did: the steps it ran, the image size, whether the input image was resized, and
    how many tokens of the prompt and the negative prompt the text encoders never saw.

    The pipeline cuts each text to ``token_limit`` tokens, its start and end tokens included; the
    libraries' own notice of it is held back (``quiet.py``), so the caller words the note from these fields.
    """

    steps: int
    width: int
    height: int
    seconds: float
    resized_from: tuple[int, int] | None = None
    changed: tuple[str, ...] = ()  # pipeline files (VAE, text encoders, ...) that differ from the build's record
    truncated_tokens: int = 0  # of the prompt
    negative_truncated_tokens: int = 0  # of the negative prompt
    token_limit: int = 77  # what the text encoders read, start and end tokens included
    more_images: tuple[Any, ...] = ()  # the call's other images, where the build's batch draws several
    written: tuple[Path, ...] = ()  # the PNG files ``generate`` wrote, one per image


def _tokenizers(pipe: Any) -> list[Any]:
    """The pipeline's tokenizers: SD's one, SDXL's two, the refiner's second only."""
    return [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]


def token_limit(pipe: Any) -> int:
    """How many tokens the pipeline's text encoders read (start and end tokens included): 77 for CLIP."""
    return min(int(t.model_max_length) for t in _tokenizers(pipe))


def dropped_tokens(pipe: Any, text: str | None) -> int:
    """How many tokens of ``text`` the pipeline cuts: counted with its own tokenizers, as it tokenizes
    (each to its ``model_max_length``), the most over its tokenizers (SDXL encodes the text with both)."""
    if not text:
        return 0
    return max([0, *(len(t(text, truncation=False).input_ids) - int(t.model_max_length) for t in _tokenizers(pipe))])


def _input_image(family: Family, image: Path | None, width: int, height: int) -> tuple[Any, tuple[int, int] | None]:
    """The refiner's input image at the build's static size (resized where it differs), else None."""
    if family is not SDXL_REFINER:
        if image is not None:
            raise AtedmError(f"--image is for SDXL refiner builds (img2img); this build is {family.description}")
        return None, None
    if image is None:
        raise AtedmError("this build is the SDXL refiner, which refines an image: pass --image PNG_OR_JPEG")
    from PIL import Image, UnidentifiedImageError

    try:
        picture = Image.open(image).convert("RGB")
    except (OSError, UnidentifiedImageError):
        raise AtedmError(f"cannot read image {image}: not a file PIL can open (expected PNG or JPEG)") from None
    if picture.size == (width, height):
        return picture, None
    return picture.resize((width, height), Image.LANCZOS), picture.size


def resolve_settings(view: ShapeView, steps: int | None, guidance: float | None) -> tuple[int, float]:
    """The run's step count and guidance scale (the spec's steps and the family's guidance where not given),
    refused where the build cannot serve them: classifier-free guidance doubles each image's rows, so a build
    of odd batch runs without it (``--guidance 1``)."""
    spec = view.graph_spec
    steps = steps or spec.steps
    guidance = view.contract.family.guidance if guidance is None else guidance
    if spec.batch % 2 and guidance > 1.0:
        raise AtedmError(f"the build has batch {spec.batch}: classifier-free guidance needs an even batch; pass --guidance 1")
    return steps, guidance


def draw(pipe: Any, staged: StagedUNet, prompt: str, *, steps: int, seed: int, guidance: float,
         negative_prompt: str | None = None, picture: Any = None, strength: float = 0.3,
         on_step: Callable[[int, int], None] | None = None, shape: ShapeView | None = None) -> tuple[Any, Generation]:
    """One pipeline call with ``staged`` as ``pipe``'s UNet: the first image (PIL) and what the call did.

    The one place that calls the pipeline, so ``generate`` (one image to a file) and ``eval`` (many images through
    one loaded pipeline) draw the same way. ``seconds`` is the wall time of the pipeline call alone (text encoders,
    denoising loop, VAE decode), not of loading or writing. The build's static batch sets the images per call:
    with classifier-free guidance (scale > 1) each image is a row pair, so batch 2 gives one image. The libraries'
    bars, notices and warnings stay out of the caller's output (``quiet.py``); the tokens the pipeline cut from
    each text are counted instead. ``shape``: the view (``buildfolder.find_view``) of the build's shape to draw at; the
    build's first shape by default.
    """
    import time

    spec = (shape or staged.view).graph_spec

    def callback(pipeline: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        if on_step:
            on_step(step, steps)
        return kwargs

    size = {"image": picture, "strength": strength} if picture is not None else {"height": spec.height, "width": spec.width}
    with quiet_libraries():
        truncated = dropped_tokens(pipe, prompt), dropped_tokens(pipe, negative_prompt if guidance > 1.0 else None)
        start = time.perf_counter()
        result = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                      num_images_per_prompt=images_per_call(spec.batch, guidance),
                      generator=torch.Generator().manual_seed(seed), callback_on_step_end=callback, **size)
        seconds = time.perf_counter() - start
    return result.images[0], Generation(steps, spec.width, spec.height, seconds, truncated_tokens=truncated[0],
                                        negative_truncated_tokens=truncated[1], token_limit=token_limit(pipe),
                                        more_images=tuple(result.images[1:]))


def images_per_call(batch: int, guidance: float) -> int:
    """How many images one pipeline call draws at a static UNet ``batch``: a row pair each under guidance."""
    return batch // 2 if guidance > 1.0 else batch


def image_files(output: Path, count: int) -> list[Path]:
    """Where ``generate`` writes ``count`` images: ``output``, then ``<stem>-2.png``, ``<stem>-3.png``, …"""
    return [output, *(output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(2, count + 1))]


def generate(staged: StagedUNet, prompt: str, output: Path, *, negative_prompt: str | None = None,
             steps: int | None = None, seed: int = 0, guidance: float | None = None, image: Path | None = None,
             strength: float = 0.3, on_step: Callable[[int, int], None] | None = None, width: int | None = None,
             height: int | None = None, batch: int | None = None) -> Generation:
    """Run the family's pipeline with ``staged`` as its UNet and write its images as PNG: the first to ``output``,
    where the build's batch draws several the others beside it (``image_files``).

    ``width``/``height``/``batch`` pick one of the build's shapes (the first that matches; the first shape when
    none is given). Everything is checked before the pipeline loads (output file, the shape, guidance against the
    batch, strength, input image); the PNG appears whole or not at all. The result counts the prompt tokens the
    pipeline cut (``truncated_tokens``) and names the pipeline files changed since the build.
    """
    if output.suffix.lower() != ".png":
        raise AtedmError(f"output {output} must be a .png file")
    check_output_file(output)
    shape = find_view(staged.manifest, width, height, batch)
    spec = shape.graph_spec
    steps, guidance = resolve_settings(shape, steps, guidance)
    if not 0.0 < strength <= 1.0:
        raise AtedmError(f"--strength must be in (0, 1], got {strength}")
    files = image_files(output, images_per_call(spec.batch, guidance))
    for path in files[1:]:
        check_output_file(path)
    picture, resized = _input_image(staged.contract.family, image, spec.width, spec.height)
    pipe = load_pipeline(staged)
    drawn, done = draw(pipe, staged, prompt, steps=steps, seed=seed, guidance=guidance,
                       negative_prompt=negative_prompt, picture=picture, strength=strength, on_step=on_step,
                       shape=shape)
    for picture_drawn, path in zip((drawn, *done.more_images), files, strict=True):
        write_png(picture_drawn, path)
    recorded = staged.manifest.pipeline
    return replace(done, resized_from=resized, changed=tuple(pipeline_changes(recorded)) if recorded else (),
                   more_images=(), written=tuple(files))


def write_png(image: Any, output: Path) -> None:
    """Write beside the target and rename, so a failed or interrupted write leaves no partial file.

    The file is created with mode 0666 less the umask, what any program's new file gets (``mkstemp`` would
    make it 0600: an image only its owner can read). Its hidden name fits what ``check_output_file`` allows.
    """
    tmp = output.parent / f".{output.name}.{secrets.token_hex(3)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG")
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
