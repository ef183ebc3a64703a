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
from .errors import SpecError, format_validation_error
from .pruning import PruneOptions
from .pruning.patch import default_map_output, default_prune_point
from .userfiles import load_yaml

Precision = Literal["fp32", "fp16", "bf16"]  # registry.PRECISION_NAMES; their dtypes: contract.PRECISIONS


class PruningSpec(BaseModel):
    """The method's open choices (see ``PruneOptions``), defaults as in the paper."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    iterations: int = Field(5, ge=1, le=100, description="G-WPR power iterations (unrolled in the graph)")
    heads: Literal["mean", "max"] = "mean"
    damping: float = Field(1.0, gt=0.0, le=1.0)
    importance: Literal["self", "cross"] = "self"
    prune_point: Literal["layer", "attn1"] | None = Field(
        None, description="attn1 (default where exact: copy recovery, self importance) or layer (the paper's wording)")
    recovery: Literal["copy", "skip"] = "copy"
    selection: Literal["auto", "topk", "rank"] = Field(
        "auto", description="TopK where k <= 3840 (TensorRT's limit), rank-by-comparison above; both keep the same tokens")
    map_output: Literal["reuse", "fused"] | None = Field(
        None, description="map layer output from each head's map (reuse, the default where exact) or through the "
                          "fused attention (fused)")
    map_pool: Literal[1, 2, 4] = Field(
        1, description="approximate: the map's queries pooled over map_pool x map_pool patches (1 = exact G-WPR)")

    @model_validator(mode="before")
    @classmethod
    def _resolve_prune_point(cls, data: object) -> object:
        """Write the default prune point down, so a manifest says which one its graphs were built with."""
        if isinstance(data, dict) and data.get("prune_point") is None:
            point = default_prune_point(data.get("importance", "self"), data.get("recovery", "copy"))
            data = {**data, "prune_point": point}
        if isinstance(data, dict) and data.get("map_output") is None:
            data = {**data, "map_output": default_map_output(data.get("map_pool", 1))}
        return data

    def options(self) -> PruneOptions:
        return PruneOptions(**self.model_dump())


class GraphSpec(BaseModel):
    """Everything a build needs: model source, static shapes, precision, steps and DSAP schedule."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    model: str = Field(min_length=1, description="built-in name, local folder, .safetensors file or hub id")
    seed: int = Field(0, ge=0, description="weights seed for built-in models")
    height: int = Field(1024, ge=64, le=4096)
    width: int = Field(1024, ge=64, le=4096)
    batch: int = Field(2, ge=1, le=64, description="2 for classifier-free guidance")
    text_length: int = Field(77, ge=1, le=1024)
    precision: Precision = "fp16"
    steps: int = Field(50, ge=1, le=1000)
    schedule: str | Schedule = "paper"
    pruning: PruningSpec = PruningSpec()

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8), got {value}")
        return value

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
        if prune_point is None:
            return self
        pruning = self.pruning.model_dump()
        return self.model_copy(update={"pruning": PruningSpec.model_validate({**pruning, "prune_point": prune_point})})

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
    if not path.is_file() and (builtin_specs_dir() / f"{source}.yaml").is_file():
        path = builtin_specs_dir() / f"{source}.yaml"
    if not path.is_file():
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
    schedule = data.get("schedule")
    if isinstance(schedule, str) and not is_preset(schedule):
        data = {**data, "schedule": load_schedule(schedule, base=folder).model_dump(mode="json")}
    return data


def parse_spec(data: dict, source: str = "spec") -> GraphSpec:
    try:
        return GraphSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, source)) from None
    except SpecError as exc:
        raise SpecError(f"{source}: {exc}") from None
