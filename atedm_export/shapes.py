"""Static shapes: one batch × height × width a build's graphs are exported at, and the named sets of them.

Every graph is static (each keep count is fixed per token count), so a build that serves several sizes
holds one graph per (shape, stage). This module is the one place that names a shape (``1216x832-b2``:
width × height, then batch), parses it from the command line (``1216x832`` or ``1216x832:4``) and loads
the built-in sets (``graphs/shapes/*.yaml``, e.g. ``sdxl-buckets``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, ValidationError

from .errors import SpecError, format_validation_error
from .userfiles import load_yaml

DEFAULT_BATCH = 2  # classifier-free guidance: the conditional and the unconditional row


def _multiple_of_8(value: int) -> int:
    if value % 8:
        raise ValueError("must be a multiple of 8 (the VAE downsamples by 8)")
    return value


#: An image side in pixels, as specs and shapes take it.
Pixels = Annotated[StrictInt, Field(ge=64, le=4096), AfterValidator(_multiple_of_8)]
#: A count (a batch, steps, a seed): an integer, never a bool (``batch: true`` is no batch of 1).
Count = StrictInt


class Shape(BaseModel):
    """One static input shape: ``batch`` images of ``width`` × ``height`` pixels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch: Count = Field(DEFAULT_BATCH, ge=1, le=64, description="2 for classifier-free guidance")
    height: Pixels
    width: Pixels

    @property
    def key(self) -> str:
        """The shape's name in file names, the manifest and messages: ``1216x832-b2`` (width × height, batch)."""
        return f"{self.width}x{self.height}-b{self.batch}"

    @property
    def latent(self) -> tuple[int, int, int]:
        """``(batch, latent height, latent width)``: what a UNet call's ``sample`` tells of its shape."""
        return self.batch, self.height // 8, self.width // 8

    def __str__(self) -> str:
        return f"{self.width}x{self.height} batch {self.batch}"


@dataclass(frozen=True)
class AttentionBlock:
    """One attention block (a ``Transformer2DModel``) and the token grid it sees at a shape's resolution: what the
    schedules (``dsap.py``) and the FLOP counts plan against, known without loading a model."""

    name: str
    height: int
    width: int
    layers: int
    channels: int

    @property
    def tokens(self) -> int:
        return self.height * self.width


def shape_keys(shapes: list[Shape] | tuple[Shape, ...]) -> str:
    """The shapes of a build, for a message: ``1024x1024-b2, 1216x832-b2``."""
    return ", ".join(s.key for s in shapes)


_CLI = re.compile(r"^(\d+)x(\d+)(?::(\d+))?$")


def parse_shape(text: str, batch: int = DEFAULT_BATCH) -> Shape:
    """``WIDTHxHEIGHT`` or ``WIDTHxHEIGHT:BATCH`` (the command line's spelling) → a ``Shape``."""
    match = _CLI.match(text.strip())
    if not match:
        raise SpecError(f"shape '{text}' is not WIDTHxHEIGHT or WIDTHxHEIGHT:BATCH (e.g. 1216x832 or 1216x832:2)")
    width, height, given = match.groups()
    try:
        return Shape(width=int(width), height=int(height), batch=int(given) if given else batch)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, f"shape '{text}'")) from None


def shape_sets_dir() -> Path:
    return Path(str(resources.files("atedm_export") / "graphs" / "shapes"))


def shape_set_names() -> list[str]:
    return sorted(p.stem for p in shape_sets_dir().glob("*.yaml"))


def load_shape_set(name: str) -> list[dict]:
    """A built-in set of shapes by name (``sdxl-buckets``), as the spec's ``shapes:`` list would write it."""
    if name not in shape_set_names():  # a name, never a path: '../schedules/paper' is no set of shapes
        raise SpecError(f"shapes: unknown set '{name}'; expected a list of shapes or one of: "
                        f"{', '.join(shape_set_names())}")
    path = shape_sets_dir() / f"{name}.yaml"
    data = load_yaml(path, "a set of shapes (YAML)", SpecError)
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        raise SpecError(f"{path}: expected a mapping with a 'shapes' list")
    return list(data["shapes"])
