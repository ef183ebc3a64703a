"""What an eval asks, checked whole before any image is drawn or any file written, and the plan it runs.

``prepare`` reads every input and refuses a bad one in one line: prompts, seeds, builds (one model, size,
batch, precision; the backend's files checked), the output folder's record, the reference folder, the
pipeline around the UNet, the CLIP checkpoint and the Inception file (all loaded, so a broken file fails
here, not after an hour of drawing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import AtedmError, first_line
from ..runtime.pipeline import check_pipeline_source, load_pipeline, resolve_settings
from ..runtime.staged import StagedUNet
from ..staging import check_apart
from .builds import UNPRUNED, BuildInfo, baseline_identity, common_steps, load_builds
from .metrics import InceptionFeatures, load_clip, load_inception, load_lpips
from .prompts import choose_prompts
from .state import EvalState

#: What a reference folder's images may be.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class EvalRequest:
    """The eval as the user asked it (the CLI's options)."""

    builds: tuple[Path, ...]
    out: Path
    prompts_file: Path | None = None
    coco_captions: Path | None = None
    limit: int | None = None
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    backend: str = "onnxruntime"
    device: str | None = None
    engine_options: dict[str, Any] = field(default_factory=dict)
    clip: Path | None = None
    inception: Path | None = None
    reference: Path | None = None


@dataclass
class Job:
    """One image set to draw: its label, the UNet that draws it, and the identity its images are recorded with."""

    label: str
    staged: StagedUNet
    identity: str
    build: BuildInfo | None  # None: the unpruned set


@dataclass
class EvalPlan:
    """Everything checked and loaded: the prompts, seeds and settings, the sets to draw and the metrics' tools."""

    request: EvalRequest
    prompts: list[str]
    prompt_source: str
    steps: int
    guidance: float
    jobs: list[Job]
    state: EvalState
    pipe: Any = None  # the family's pipeline, loaded once: every set's UNet is attached to it in turn
    clip: Any = None  # torchmetrics CLIPScore
    inception: InceptionFeatures | None = None
    lpips: Any = None  # torchmetrics LPIPS
    reference: list[Path] | None = None
    notes: list[str] = field(default_factory=list)
    metric_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def seeds(self) -> list[int]:
        """Image ``i`` is drawn with seed ``base + i``, in every set."""
        return [self.request.seed + i for i in range(len(self.prompts))]

    @property
    def backend_name(self) -> str:
        return self.jobs[0].staged.backend.name

    @property
    def device(self) -> str:
        return str(self.jobs[0].staged.device)



def settings_of(prompts: list[str], seed: int, steps: int, guidance: float) -> dict[str, Any]:
    """What the eval folder's record holds: the question every set answers."""
    return {"prompts": prompts, "seed": seed, "steps": steps, "guidance": guidance}


def eval_inputs(request: EvalRequest) -> dict[str, Path | None]:
    """What an eval reads: its builds, prompts or captions, reference images and metric models."""
    builds = {f"build {index + 1}": build for index, build in enumerate(request.builds)}
    return {**builds, "prompts": request.prompts_file, "captions": request.coco_captions,
            "reference": request.reference, "Inception model": request.inception, "CLIP model": request.clip}


def prepare(request: EvalRequest) -> EvalPlan:
    """Check every input and load what the run needs; nothing is drawn or written."""
    check_apart(request.out, eval_inputs(request))
    prompts, source = choose_prompts(request.prompts_file, request.coco_captions, request.limit)
    if request.seed + len(prompts) - 1 > MAX_SEED:
        raise AtedmError(f"--seed {request.seed}: image i takes seed {request.seed}+i, past {MAX_SEED} for "
                         f"{len(prompts)} images")
    builds = load_builds(list(request.builds))
    first = builds[0].view
    steps, guidance = resolve_settings(first, common_steps(builds, request.steps), request.guidance)
    check_pipeline_source(first)
    reference = _reference_images(request.reference, request.inception)
    if request.inception and len(prompts) < 2:
        raise AtedmError("FID and KID compare distributions and need at least 2 images; give more prompts")
    state = EvalState.check(request.out, settings_of(prompts, request.seed, steps, guidance))
    jobs = _jobs(builds, request)
    # One pipeline for every set: the builds share the model and its pipeline files (load_builds), so text
    # encoders, VAE and scheduler are the same; loading it here also proves it loads before anything is drawn.
    pipe = load_pipeline(jobs[0].staged)
    metric_device = jobs[0].staged.device if jobs[0].staged.device.type == "cuda" else torch.device("cpu")
    plan = EvalPlan(request, prompts, source, steps, guidance, jobs, state, pipe, reference=reference,
                    metric_device=metric_device)
    _load_metric_tools(plan)
    return plan


def _jobs(builds: list[BuildInfo], request: EvalRequest) -> list[Job]:
    """The unpruned set (the first build's baseline graph, on that build's backend) and one set per build.

    Each build's backend is loaded here, so its files are checked against the manifest (``Backend.check_build_files``)
    before anything is drawn; sessions and engines open lazily or are released between sets.
    """
    jobs = []
    for build in builds:
        staged = StagedUNet.load(build.folder, backend=request.backend, device=request.device, **request.engine_options)
        jobs.append(Job(build.label, staged, build.identity, build))
    first = jobs[0].staged
    unpruned = StagedUNet(first.backend, unpruned=True)
    return [Job(UNPRUNED, unpruned, baseline_identity(first.view), None), *jobs]


def _reference_images(folder: Path | None, inception: Path | None) -> list[Path] | None:
    """The reference folder's images, sorted by name, each decoded whole now: a truncated or broken file fails in
    one line before the first image is drawn, not after every image (minutes here, hours at COCO-5k)."""
    if folder is None:
        return None
    if inception is None:
        raise AtedmError("--reference is the real image set FID and KID compare against; they need --inception FILE")
    if not folder.is_dir():
        raise AtedmError(f"--reference {folder}: no such folder; expected a folder of images (e.g. COCO val2017)")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(images) < 2:
        raise AtedmError(f"--reference {folder} holds {len(images)} images ({', '.join(IMAGE_SUFFIXES)}); FID and KID "
                         "need at least 2")
    from PIL import Image, UnidentifiedImageError

    for path in images:
        try:
            with Image.open(path) as image:
                image.load()  # the whole body: a valid header over a truncated body fails here
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            raise AtedmError(f"--reference: cannot read image {path}: {first_line(exc)}") from None
    return images


def _load_metric_tools(plan: EvalPlan) -> None:
    """LPIPS where it loads offline (else a note), CLIP with ``--clip``, Inception with ``--inception``."""
    request, device = plan.request, plan.metric_device
    plan.lpips, note = load_lpips(device)
    if note:
        plan.notes.append(note)
    if request.clip:
        plan.clip = load_clip(request.clip, device)
    else:
        plan.notes.append("CLIP score skipped: pass --clip PATH (a transformers CLIP checkpoint folder)")
    if request.inception:
        plan.inception = load_inception(request.inception, device)
    else:
        plan.notes.append("FID and KID skipped: pass --inception FILE (NVlabs' inception-2015-12-05.pt)")
