"""User-facing errors.

Every mistake a user can make (a bad spec, a missing checkpoint, a block name that does not exist)
raises an :class:`AtedmError` whose message is one line naming what is wrong and what was expected.
The CLI prints that line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Collection

from pydantic import ValidationError


class AtedmError(Exception):
    """A user error: the message is the whole story, no traceback needed."""


class SpecError(AtedmError):
    """A graph spec or schedule that does not validate."""


class ModelError(AtedmError):
    """A UNet that cannot be loaded, or that AT-EDM cannot be applied to."""


class PlanError(AtedmError):
    """A pruning plan that does not fit the model it is applied to."""


class KernelUnavailable(AtedmError):
    """``map_impl: kernels`` where the map layer's kernels cannot run (no triton, or CPU tensors without its interpreter)."""


class ManifestError(AtedmError):
    """A build folder whose manifest or artifacts cannot be trusted."""


class ShapeError(ManifestError):
    """A shape the build has no graphs for."""


class ScheduleError(ManifestError):
    """A step the build cannot run: outside the run, an unknown timestep, or a stage that was not built."""


class RefitError(AtedmError):
    """A build the LoRAs cannot be refitted into: a parameter not found, or not alone, in its weights."""


def first_line(exc: BaseException) -> str:
    """The first line of a third-party exception's message (Triton's ``.message()`` too), for a one-line error."""
    message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    return (str(message).strip().splitlines() or [type(exc).__name__])[0]


def format_validation_error(exc: ValidationError, source: str, tags: Collection[str] = ()) -> str:
    """pydantic's first error as one line: where, what is wrong, what was given. ``tags``: names pydantic puts
    in an error's location for the member of a tagged union (the pruning methods), left out of it."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"] if p not in tags) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key '{where}'"
    msg = err["msg"].removeprefix("Value error, ")
    given = err.get("input")
    shown = "" if isinstance(given, dict | list) or given is None else f" (got {given!r})"
    return f"{source}: {where}: {msg}{shown}"
