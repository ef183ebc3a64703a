"""Drawing the image sets: the unpruned one, then one per build, each image timed, reused where it still matches.

The plan's one pipeline takes each set's UNet in turn and draws every prompt still missing, through
``runtime.pipeline.draw`` (the call ``generate`` makes). A set whose images all match their records runs
nothing. Between sets the backend drops its sessions, so only one set's graphs sit in memory at a time.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..runtime.pipeline import draw, write_png
from .request import EvalPlan, Job
from .state import ImageKey

#: ``(label, event, seconds or None)``: one line of progress.
Progress = Callable[[str, str, "float | None"], None]


@dataclass
class ImageSet:
    """One set's images on disk, in prompt order, and each pipeline call's wall time."""

    label: str
    build: Path | None  # None: the unpruned set
    paths: list[Path]
    seconds: list[float]
    reused: int = 0
    drawn: int = 0
    schedule: str | None = None  # the build's DSAP schedule
    identity: str = ""

    @property
    def seconds_per_image(self) -> float:
        """The median pipeline call: robust to the first call, which also opens the graphs' sessions."""
        return statistics.median(self.seconds)


def draw_all(plan: EvalPlan, progress: Progress) -> list[ImageSet]:
    """Every set of the plan, unpruned first; the eval folder and its record are created here."""
    plan.state.create()
    return [_draw_set(plan, job, progress) for job in plan.jobs]


def _key(plan: EvalPlan, job: Job, index: int) -> ImageKey:
    return ImageKey(prompt=plan.prompts[index], seed=plan.seeds[index], steps=plan.steps, guidance=plan.guidance,
                    backend=job.staged.backend.name, device=str(job.staged.device), build=job.identity)


def _draw_set(plan: EvalPlan, job: Job, progress: Progress) -> ImageSet:
    """Reuse the images whose records match, draw the others (one loaded pipeline), and time each call."""
    state, count = plan.state, len(plan.prompts)
    (state.folder / "images" / job.label).mkdir(parents=True, exist_ok=True)
    seconds: list[float | None] = [state.reusable(job.label, i, _key(plan, job, i)) for i in range(count)]
    missing = [i for i, s in enumerate(seconds) if s is None]
    reused = count - len(missing)
    if reused:
        progress(job.label, f"reused {reused} of {count} images drawn earlier with the same settings", None)
    if missing:
        job.staged.attach(plan.pipe)
        try:
            for n, index in enumerate(missing, 1):
                seconds[index] = _draw_one(plan, job, index)
                progress(job.label, f"image {index + 1}/{count} ({n}/{len(missing)} to draw), seed {plan.seeds[index]}",
                         seconds[index])
        finally:
            job.staged.backend.release()
    build = job.build
    return ImageSet(job.label, build.folder if build else None, [state.image_path(job.label, i) for i in range(count)],
                    [float(s) for s in seconds], reused=reused, drawn=len(missing),
                    schedule=build.view.graph_spec.dsap.name if build else None, identity=job.identity)


def _draw_one(plan: EvalPlan, job: Job, index: int) -> float:
    """Draw image ``index``, write its PNG and then its record; the seconds of the pipeline call."""
    key = _key(plan, job, index)
    plan.state.forget(job.label, index)
    image, done = draw(plan.pipe, job.staged, key.prompt, steps=key.steps, seed=key.seed, guidance=key.guidance)
    write_png(image, plan.state.image_path(job.label, index))
    plan.state.record(job.label, index, key, done.seconds)
    return done.seconds
