"""Graph specs: one YAML file says which UNet, at which static shapes, pruned on which schedule.

A spec is validated in full before any work starts. Errors name the field, the bad value and what is
allowed, in one line: ``tiny.yaml: height: must be a multiple of 8 (got 250)``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .contract import PRECISIONS, GraphContract
from .dsap import Schedule, is_preset, load_preset, load_schedule, parse_schedule, preset_named
from .errors import PlanError, SpecError, format_validation_error
from .pruning import METHODS, AtedmOptions, PruningOptions, parse_options
from .shapes import Count, Pixels, Shape, load_shape_set, shape_keys
from .userfiles import is_readable_file, load_yaml

Precision = Literal["fp32", "fp16", "bf16"]  # registry.PRECISION_NAMES; their dtypes: contract.PRECISIONS


class LoraSpec(BaseModel):
    """One LoRA fused into the UNet before export: a diffusers/PEFT or kohya ``.safetensors`` file and its scale."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    file: str = Field(min_length=1)
    scale: float = Field(1.0, ge=-16, le=16)

    @model_validator(mode="before")
    @classmethod
    def _text(cls, data: object) -> object:
        """``style.safetensors`` or ``style.safetensors:0.8`` (the command line's spelling) as well as a mapping."""
        if isinstance(data, str):
            file, sep, scale = data.rpartition(":")
            if sep and file and _is_number(scale):
                return {"file": file, "scale": float(scale)}
            return {"file": data}
        return data


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class GraphSpec(BaseModel):
    """Everything a build needs: model source, static shapes, precision, steps and DSAP schedule."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    model: str = Field(min_length=1, description="built-in name, local folder, .safetensors file or hub id")
    seed: Count = Field(0, ge=0, description="weights seed for built-in models")
    height: Pixels = 1024
    width: Pixels = 1024
    batch: Count = Field(2, ge=1, le=64, description="2 for classifier-free guidance")
    text_length: Count = Field(77, ge=1, le=1024)
    precision: Precision = "fp16"
    steps: Count = Field(50, ge=1, le=1000)
    schedule: str | Schedule = "paper"
    pruning: PruningOptions = AtedmOptions()
    shapes: tuple[Shape, ...] | None = Field(None, description="several static shapes; the first sets height/width/batch")
    loras: tuple[LoraSpec, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _shapes(cls, data: object) -> object:
        """``shapes:`` (a list or a built-in set's name) → its shapes, checked and distinct; ``height``, ``width`` and
        ``batch`` become the first shape's, so code that reads one shape reads the build's first. One shape is no
        list: the spec is then an ordinary single-shape spec."""
        if not isinstance(data, dict) or data.get("shapes") is None:
            return data
        listed = data["shapes"]
        if isinstance(listed, str):
            listed = load_shape_set(listed)
        if not isinstance(listed, (list, tuple)) or not listed:
            raise SpecError("shapes: expected a non-empty list of {batch, height, width} or a set's name")
        shapes = [_shape(item, i) for i, item in enumerate(listed)]
        seen: set[Shape] = set()
        for shape in shapes:
            if shape in seen:
                raise SpecError(f"shapes: {shape.key} is listed twice")
            seen.add(shape)
        first = shapes[0]
        for field in ("batch", "height", "width"):
            if field in data and data[field] != getattr(first, field):
                raise SpecError(f"{field}: {data[field]} beside shapes: give shapes, or one batch/height/width, not "
                                f"both (the first shape, {first.key}, sets them)")
        single = len(shapes) == 1
        return {**data, "shapes": None if single else [s.model_dump() for s in shapes],
                "batch": first.batch, "height": first.height, "width": first.width}

    @model_validator(mode="before")
    @classmethod
    def _method(cls, data: object) -> object:
        """``method: tome`` beside ``pruning:`` is the method's name; the options model it names holds it, so a
        spec writes it in either place (twice only if both agree)."""
        if not isinstance(data, dict) or "method" not in data:
            return data
        data = dict(data)
        method = data.pop("method")
        pruning = data.get("pruning") or {}
        if isinstance(pruning, dict):
            if pruning.get("method", method) != method:
                raise SpecError(f"method: '{method}' but pruning.method: '{pruning['method']}'; give the method once")
            data["pruning"] = {**pruning, "method": method}
        return data

    @property
    def shape_list(self) -> tuple[Shape, ...]:
        """Every static shape the build holds graphs for, the first being ``height``/``width``/``batch``."""
        return self.shapes or (Shape(batch=self.batch, height=self.height, width=self.width),)

    def at(self, shape: Shape) -> GraphSpec:
        """This spec at one of its shapes, as a single-shape spec: what one shape's graphs are exported from."""
        if shape not in self.shape_list:
            raise SpecError(f"no shape {shape.key} in this spec; it has: {shape_keys(self.shape_list)}")
        return self.model_copy(update={"batch": shape.batch, "height": shape.height, "width": shape.width,
                                       "shapes": None})

    @property
    def method(self) -> str:
        """The pruning method's name (``pruning.METHODS``)."""
        return self.pruning.method

    @field_validator("schedule", mode="before")
    @classmethod
    def _known_schedule(cls, value: object) -> object:
        # SpecError is no ValueError, so it leaves pydantic as it is: one line about the schedule itself
        # rather than pydantic's report on both arms of the union.
        if isinstance(value, str):
            return value if is_preset(value) else load_schedule(value)
        return value if isinstance(value, Schedule) else parse_schedule(value, source="schedule")

    @property
    def dsap(self) -> Schedule:
        return load_preset(self.schedule) if isinstance(self.schedule, str) else self.schedule

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision].torch

    def contract(self, unet_config: dict) -> GraphContract:
        """The graphs' static I/O for the UNet ``unet_config`` at this spec's shapes and precision."""
        return GraphContract.from_config(unet_config, self.batch, self.height, self.width, self.text_length,
                                         self.precision)

    def with_prune_point(self, prune_point: str | None) -> GraphSpec:
        """The same spec pruning at another point (``attn1`` or ``layer``), as ``--prune-point`` asks."""
        return self._with_atedm_option("--prune-point", "prune_point", prune_point)

    def with_map_batch(self, map_batch: str | None) -> GraphSpec:
        """The same spec with its explicit map layer batched another way (``head`` or ``all``), as ``--map-batch``
        asks."""
        return self._with_atedm_option("--map-batch", "map_batch", map_batch)

    def _with_atedm_option(self, flag: str, field: str, value: str | None) -> GraphSpec:
        """The same spec with one AT-EDM option set from the command line (``flag``); None leaves the spec's."""
        if value is None:
            return self
        if not isinstance(self.pruning, AtedmOptions):
            raise SpecError(f"{flag} is an AT-EDM option; this spec prunes with {self.method}")
        pruning = self.pruning.model_dump()
        return self.model_copy(update={"pruning": parse_options({**pruning, field: value})})

    def with_schedule(self, schedule: str | None) -> GraphSpec:
        """The same spec on another schedule (a preset name or a YAML file), as ``--schedule`` asks."""
        if schedule is None:
            return self
        return self.model_copy(update={"schedule": preset_named(schedule) or load_schedule(schedule)})


def builtin_specs_dir() -> Path:
    return Path(str(resources.files("atedm_export") / "graphs"))


def builtin_spec_names() -> list[str]:
    return sorted(p.stem for p in builtin_specs_dir().glob("*.yaml"))


def load_spec(source: str | Path) -> GraphSpec:
    """A spec from a YAML path, or a built-in spec by name (``tiny-sdxl``, ``sdxl-base-1024``)."""
    path = Path(source)
    if not is_readable_file(path) and (builtin_specs_dir() / f"{source}.yaml").is_file():
        path = builtin_specs_dir() / f"{source}.yaml"
    if not is_readable_file(path):
        raise SpecError(f"spec '{source}' not found; expected a YAML file or one of: {', '.join(builtin_spec_names())}")
    data = load_yaml(path, "a graph spec (YAML)", SpecError)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of spec fields, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    return parse_spec(_relative_to(data, path.parent, str(path)), str(path))


def _relative_to(data: dict, folder: Path, source: str) -> dict:
    """Relative paths in a spec (``model``, a ``schedule`` file) are the spec's folder's, written down absolute,
    so a spec builds the same from any working directory and its manifest works from anywhere."""
    from .models import is_builtin

    model = data.get("model")
    if isinstance(model, str) and model and not is_builtin(model):
        written = Path(model).expanduser()
        if not written.is_absolute() and ((folder / written).exists() or model.startswith(".")):
            data = {**data, "model": str((folder / written).resolve())}
        elif written.is_absolute():
            data = {**data, "model": str(written)}
    loras = data.get("loras")
    if isinstance(loras, list):
        data = {**data, "loras": [_lora_path(item, folder) for item in loras]}
    schedule = data.get("schedule")
    if isinstance(schedule, str) and not is_preset(schedule):
        data = {**data, "schedule": load_schedule(schedule, base=folder).model_dump(mode="json")}
    return data


def _lora_path(item: object, folder: Path) -> object:
    """A LoRA's file relative to the spec's folder, written down absolute (as ``model`` is)."""
    try:
        lora = LoraSpec.model_validate(item)
    except ValidationError:
        return item  # the spec's validation reports it, with the field's name
    path = Path(lora.file).expanduser()
    return {"file": str(path if path.is_absolute() else (folder / path).resolve()), "scale": lora.scale}


def _shape(item: object, index: int) -> Shape:
    try:
        return Shape.model_validate(item)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, f"shapes[{index}]")) from None


def parse_spec(data: dict, source: str = "spec") -> GraphSpec:
    try:
        return GraphSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, source, tags=METHODS)) from None
    except (SpecError, PlanError) as exc:
        raise SpecError(f"{source}: {exc}") from None
