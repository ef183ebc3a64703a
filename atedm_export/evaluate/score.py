"""The metrics over the image folders, read in batches so a set of thousands of images never sits in memory.

Per set: fidelity to the unpruned images (PSNR, SSIM, LPIPS; the pruned sets only), CLIP score against the
prompts (every set, the unpruned one included: the number to hold the pruned ones against), and FID and KID
against the real set: the ``--reference`` folder (every set scored) or, without one, the unpruned set (the
pruned sets scored: how far pruning moves the distribution).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .builds import UNPRUNED
from .metrics import INCEPTION_SIZE, Distribution, Fidelity, clip_compute, clip_update, kid_subset_size
from .request import EvalPlan
from .run import ImageSet, Progress

#: Images per batch: small enough for 1024² sets on a CPU, large enough to keep the networks busy.
BATCH = 16


def load_images(paths: list[Path], size: int | None = None) -> Tensor:
    """``uint8 [N, 3, H, W]`` images (RGB), resized to ``size``×``size`` with PIL's bicubic filter where given:
    how clean-fid resizes for the Inception network, so a reference set of any size is read the same way."""
    from PIL import Image

    arrays = []
    for path in paths:
        with Image.open(path) as image:
            picture = image.convert("RGB")
        if size is not None and picture.size != (size, size):
            picture = picture.resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(picture, dtype=np.uint8))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def batches(paths: list[Path]) -> Iterator[tuple[int, list[Path]]]:
    for start in range(0, len(paths), BATCH):
        yield start, paths[start:start + BATCH]


def score(plan: EvalPlan, sets: list[ImageSet], progress: Progress) -> dict[str, dict[str, float]]:
    """Every metric the plan can compute, per set label."""
    results: dict[str, dict[str, float]] = {s.label: {} for s in sets}
    unpruned = next(s for s in sets if s.label == UNPRUNED)
    for image_set in sets:
        if image_set.label != UNPRUNED:
            progress(image_set.label, "fidelity to the unpruned images (PSNR, SSIM"
                     + (", LPIPS)" if plan.lpips is not None else ")"), None)
            results[image_set.label].update(_fidelity(plan, image_set, unpruned))
        if plan.clip is not None:
            progress(image_set.label, "CLIP score", None)
            results[image_set.label]["clip_score"] = _clip(plan, image_set)
    if plan.inception is not None:
        for label, values in _distribution(plan, sets, unpruned, progress).items():
            results[label].update(values)
    return results


def _fidelity(plan: EvalPlan, image_set: ImageSet, unpruned: ImageSet) -> dict[str, float]:
    fidelity = Fidelity(plan.lpips, plan.metric_device)
    for start, paths in batches(image_set.paths):
        fidelity.update(load_images(paths), load_images(unpruned.paths[start:start + len(paths)]))
    return fidelity.compute()


def _clip(plan: EvalPlan, image_set: ImageSet) -> float:
    plan.clip.reset()
    for start, paths in batches(image_set.paths):
        clip_update(plan.clip, load_images(paths), plan.prompts[start:start + len(paths)])
    return clip_compute(plan.clip)


def _distribution(plan: EvalPlan, sets: list[ImageSet], unpruned: ImageSet,
                  progress: Progress) -> dict[str, dict[str, float]]:
    """FID and KID of each set against the real set, whose features are extracted once."""
    real = plan.reference or unpruned.paths
    scored = sets if plan.reference else [s for s in sets if s.label != UNPRUNED]
    subset = kid_subset_size(len(real), len(plan.prompts))
    distribution = Distribution.create(plan.inception, subset, plan.metric_device)
    progress("reference" if plan.reference else UNPRUNED, f"Inception features of the real set ({len(real)} images)",
             None)
    for _, paths in batches(real):
        distribution.update(load_images(paths, INCEPTION_SIZE), real=True)
    results = {}
    for image_set in scored:
        progress(image_set.label, "FID and KID", None)
        for _, paths in batches(image_set.paths):
            distribution.update(load_images(paths, INCEPTION_SIZE), real=False)
        results[image_set.label] = distribution.compute()
    return results
