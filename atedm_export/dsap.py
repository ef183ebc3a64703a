"""DSAP: denoising-steps-aware pruning schedules.

A schedule is a list of stages over the denoising steps, as fractions of the step count; each stage
gives a keep ratio per attention block (1.0 = unpruned) and becomes one static graph. Early steps lay
out the image and prune less; later steps refine it and prune more.

Block ratios are keyed by roles (``@down-first``: the first attention block of each down stage; see
``ROLES``), which every family resolves to its own blocks, or by ``fnmatch`` patterns over diffusers
module names (``down_blocks.1.attentions.*``) for one model. Later keys override earlier ones, and a key
that matches no block is an error, so a typo never silently leaves a block unpruned.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import PlanError, SpecError, format_validation_error
from .shapes import AttentionBlock
from .pruning import AtedmOptions, PruningOptions, StagePlan, method_of
from .userfiles import load_yaml

Ratio = Annotated[float, Field(gt=0.0, le=1.0)]

_POSITION = re.compile(r"^(?:(down|up)_blocks\.(\d+)|(mid)_block)\.attentions\.(\d+)$")


def _position(name: str) -> tuple[str, int, int]:
    """``(part, stage, index)`` of a diffusers attention block name: ``up_blocks.1.attentions.2`` → ``(up, 1, 2)``."""
    match = _POSITION.match(name)
    if match is None:
        return ("other", 0, 0)
    part, stage, mid, index = match.groups()
    return (part or mid, int(stage or 0), int(index))


Tokens = dict[str, int]  # attention block name → its token count at the spec's resolution


def _first_of_each_stage(tokens: Tokens, part: str, last: bool) -> list[str]:
    chosen: dict[int, tuple[int, str]] = {}
    for name in tokens:
        where, stage, index = _position(name)
        if where == part and (stage not in chosen or (index > chosen[stage][0]) == last):
            chosen[stage] = (index, name)
    return [name for _, name in chosen.values()]


def _by_part(part: str) -> Callable[[Tokens], list[str]]:
    return lambda tokens: [n for n in tokens if _position(n)[0] == part]


def _token_level(pick: Callable[..., int]) -> Callable[[Tokens], list[str]]:
    def members(tokens: Tokens) -> list[str]:
        level = pick(tokens.values())
        return [n for n, count in tokens.items() if count == level]

    return members


#: Roles a schedule names blocks by, so one preset fits every family: role → (what it means, resolver).
ROLES: dict[str, tuple[str, Callable[[Tokens], list[str]]]] = {
    "down-first": ("the first attention block of each down stage",
                   lambda tokens: _first_of_each_stage(tokens, "down", last=False)),
    "up-last": ("the last attention block of each up stage", lambda tokens: _first_of_each_stage(tokens, "up", last=True)),
    "finest": ("the blocks at the finest token level (most tokens)", _token_level(max)),
    "coarsest": ("the blocks at the coarsest token level (fewest tokens)", _token_level(min)),
    "down": ("every attention block of the down path", _by_part("down")),
    "mid": ("the mid block's attention", _by_part("mid")),
    "up": ("every attention block of the up path", _by_part("up")),
}


def resolve(key: str, tokens: Tokens) -> list[str]:
    """The blocks a schedule key names: ``@role`` or an ``fnmatch`` pattern over module names."""
    if key.startswith("@"):
        role = ROLES.get(key[1:])
        if role is None:
            raise PlanError(f"unknown block role '{key}'; expected one of: {', '.join('@' + r for r in ROLES)}")
        return role[1](tokens)
    return fnmatch.filter(list(tokens), key)


def block_roles(tokens: Tokens) -> dict[str, list[str]]:
    """The roles each block plays in this model (what ``flops`` and ``inspect`` show beside it)."""
    members = {role: set(resolver(tokens)) for role, (_, resolver) in ROLES.items() if role not in ("down", "mid", "up")}
    return {name: [role for role, names in members.items() if name in names] for name in tokens}


class Stage(BaseModel):
    """One DSAP stage: the steps up to ``until`` (a fraction of all steps), and its keep ratios."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    until: float = Field(gt=0.0, le=1.0)
    keep: Ratio = 1.0
    blocks: dict[str, Ratio] = Field(default_factory=dict)

    @field_validator("blocks")
    @classmethod
    def _known_roles(cls, blocks: dict[str, float]) -> dict[str, float]:
        """A mistyped role is refused with the spec, before any model is loaded or graph exported."""
        for key in blocks:
            if key.startswith("@") and key[1:] not in ROLES:
                raise ValueError(f"unknown block role '{key}'; expected one of: {', '.join('@' + r for r in ROLES)}")
        return blocks

    def ratios(self, blocks: list[AttentionBlock]) -> dict[str, float]:
        """Keep ratio of every attention block of the model in this stage."""
        ratios = {b.name: self.keep for b in blocks}
        tokens = {b.name: b.tokens for b in blocks}
        for key, ratio in self.blocks.items():
            matched = resolve(key, tokens)
            if not matched:
                raise PlanError(
                    f"stage '{self.name}': block '{key}' matches no attention block; "
                    f"the model has: {', '.join(ratios)}"
                )
            ratios.update(dict.fromkeys(matched, ratio))
        return ratios


class Schedule(BaseModel):
    """Stages in step order; the last one ends at 1.0, so every step belongs to exactly one stage."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = "custom"
    description: str = ""
    stages: tuple[Stage, ...] = Field(min_length=1)  # a tuple: a cached preset cannot be changed by a caller

    @model_validator(mode="after")
    def _ordered(self) -> Schedule:
        ends = [s.until for s in self.stages]
        if any(b <= a for a, b in zip(ends, ends[1:])):
            raise ValueError(f"stage 'until' fractions must increase, got {ends}")
        if ends[-1] != 1.0:
            raise ValueError(f"the last stage must end at until: 1.0, got {ends[-1]}")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return self

    def step_ranges(self, num_steps: int) -> list[range]:
        """The steps of each stage for a run of ``num_steps``: consecutive, disjoint, covering all steps.

        Stage j ends at step ``round(until_j × num_steps)`` (halves round up); a stage may be empty
        when the run is too short for it.
        """
        if num_steps < 1:
            raise PlanError(f"number of steps must be >= 1, got {num_steps}")
        bounds = [0] + [min(num_steps, math.floor(s.until * num_steps + 0.5 + 1e-9)) for s in self.stages]
        bounds[-1] = num_steps
        return [range(a, max(a, b)) for a, b in zip(bounds, bounds[1:])]

    def stage_index(self, step: int, num_steps: int) -> int:
        """Index of the stage that runs denoising step ``step`` (0-based) of ``num_steps``."""
        if not 0 <= step < num_steps:
            raise PlanError(f"step {step} is outside a run of {num_steps} steps")
        return next(i for i, r in enumerate(self.step_ranges(num_steps)) if step in r)


def keep_count(ratio: float, tokens: int) -> int:
    """Static keep count of a block: ``round(ratio × N)``, at least one token."""
    return max(1, min(tokens, round(ratio * tokens)))


def stage_plan(stage: Stage, blocks: list[AttentionBlock], options: PruningOptions = AtedmOptions()) -> StagePlan:
    """The static plan of one stage: blocks whose keep count is below their token count are pruned.

    A keep count below what the method can run (ToMe leaves at least its destination grid) is refused here,
    from the spec, before anything is exported."""
    ratios = stage.ratios(blocks)
    keep = {b.name: keep_count(ratios[b.name], b.tokens) for b in blocks}
    pruned = {b.name: keep[b.name] for b in blocks if keep[b.name] < b.tokens}
    method = method_of(options)
    for block in blocks:
        least = method.least_kept((block.height, block.width), options)
        if block.name in pruned and pruned[block.name] < least:
            raise PlanError(f"stage '{stage.name}': {method.name} keeps at least {least} of {block.name}'s "
                            f"{block.tokens} tokens (a keep ratio of {least / block.tokens:.3g}), "
                            f"the schedule asks {ratios[block.name]:g}")
    return StagePlan(pruned, options, {b.name: b.tokens for b in blocks})


def presets_dir() -> Path:
    return Path(str(resources.files("atedm_export") / "graphs" / "schedules"))


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


@cache
def load_preset(name: str) -> Schedule:
    """A built-in schedule (``paper``, ``uniform-63``, ``dagger``, ``none``) from ``graphs/schedules``."""
    path = presets_dir() / f"{name}.yaml"
    if not path.is_file():
        raise SpecError(f"unknown schedule '{name}'; expected one of: {', '.join(preset_names())}")
    return parse_schedule(load_yaml(path, "a DSAP schedule (YAML)", SpecError), source=str(path))


def is_preset(source: str) -> bool:
    return source in preset_names()


def preset_named(source: str) -> str | None:
    """The preset a schedule source names (``paper``, also written ``paper.yaml``, where no such file is
    here), else None: the source is a file."""
    name = source.removesuffix(".yaml")
    return name if is_preset(name) and not Path(source).is_file() else None


def load_schedule(source: str, base: Path | None = None) -> Schedule:
    """A schedule by preset name (``preset_named``) or from a YAML file, a relative path read from ``base``
    (the spec's folder) where given, else from the working directory."""
    if preset := preset_named(source):
        return load_preset(preset)
    path = Path(source).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if not path.is_file():
        if not source.endswith((".yaml", ".yml")) and "/" not in source:
            return load_preset(source)  # a mistyped preset name: the error lists the presets
        raise SpecError(f"schedule file {path} not found; expected a YAML file or one of: {', '.join(preset_names())}")
    data = load_yaml(path, "a DSAP schedule (YAML)", SpecError)
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return parse_schedule(data, source=str(path))


def parse_schedule(data: object, source: str = "schedule") -> Schedule:
    try:
        return Schedule.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, source)) from None
