"""What an eval reports: one row per image set, and the files under ``--out``.

- ``eval.json``: the settings, notes (what was skipped and why), the unpruned row and one row per build.
  JSON holds no infinity or NaN: a value that is not finite (PSNR of images identical to the unpruned ones)
  is written as ``null`` and its name listed in the row's ``"infinite"`` list; a metric not computed is absent.
- ``eval.csv``: the same rows, ``inf`` written as such, absent metrics empty.
- ``grid.png``: per prompt one row: unpruned | each build | each build's absolute difference from the
  unpruned image, amplified (the first prompts only, so the file stays viewable).
- ``quality-speed.png``: PSNR (and FID where computed) against seconds per image, one point per set.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from .builds import UNPRUNED
from .metrics import finite_or_none, kid_subset_size
from .request import EvalPlan
from .run import ImageSet

REPORT_FORMAT = "atedm-export.eval-report/1"
METRICS = ("psnr", "ssim", "lpips", "clip_score", "fid", "kid", "kid_std")
#: Prompts shown in grid.png, and the largest side of each picture in it.
GRID_ROWS = 8
GRID_CELL = 256
#: How much grid.png amplifies the absolute difference from the unpruned image (clipped at white).
DIFF_GAIN = 4


def rows(sets: list[ImageSet], scores: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per set, unpruned first: what it is, how fast it drew, and every metric computed for it."""
    unpruned = next(s for s in sets if s.label == UNPRUNED).seconds_per_image
    out = []
    for s in sets:
        row: dict[str, Any] = {"label": s.label, "build": str(s.build) if s.build else None, "schedule": s.schedule,
                               "images": len(s.paths), "drawn": s.drawn, "reused": s.reused,
                               "seconds_per_image": s.seconds_per_image,
                               "speedup_vs_unpruned": unpruned / s.seconds_per_image if s.seconds_per_image else None}
        row.update({m: scores[s.label][m] for m in METRICS if m in scores[s.label]})
        out.append(row)
    return out


def json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """The row with non-finite numbers as ``null``, named in ``"infinite"``: JSON has no infinity."""
    infinite = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    safe = {k: finite_or_none(v) if isinstance(v, float) else v for k, v in row.items()}
    return {**safe, "infinite": infinite} if infinite else safe


def settings(plan: EvalPlan) -> dict[str, Any]:
    """The eval's settings, as eval.json records them."""
    spec = plan.jobs[1].build.view.graph_spec
    request = plan.request
    fid_real = None
    if plan.inception is not None:
        fid_real = (f"reference {request.reference} ({len(plan.reference)} images)" if plan.reference
                    else "the unpruned set")
    real_count = len(plan.reference) if plan.reference else len(plan.prompts)
    return {
        "prompts": len(plan.prompts), "prompt_source": plan.prompt_source, "seed": request.seed,
        "seeds": "image i uses seed + i", "steps": plan.steps, "guidance": plan.guidance,
        "backend": plan.backend_name, "device": plan.device, "model": spec.model, "width": spec.width,
        "height": spec.height, "batch": spec.batch, "precision": spec.precision,
        "unpruned": f"the baseline graph of {request.builds[0]} at every step",
        "clip": str(request.clip) if request.clip else None,
        "inception": str(request.inception) if request.inception else None,
        "fid_kid_against": fid_real,
        "kid_subset_size": kid_subset_size(real_count, len(plan.prompts)) if plan.inception is not None else None,
        "psnr": "over the whole set: 10·log10(1/MSE), MSE over every pixel of every image in [0, 1]",
        "seconds_per_image": "median wall time of the pipeline call per image (reused images keep their recorded time)",
    }


def write_json(path: Path, plan: EvalPlan, table: list[dict[str, Any]]) -> None:
    builds = {row["label"]: json_safe(row) for row in table if row["label"] != UNPRUNED}
    data = {"format": REPORT_FORMAT, "settings": settings(plan), "notes": plan.notes,
            "unpruned": json_safe(table[0]), "builds": builds}
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, table: list[dict[str, Any]]) -> None:
    columns = ["label", "build", "schedule", "images", "seconds_per_image", "speedup_vs_unpruned", *METRICS]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in table:
            writer.writerow(["" if row.get(c) is None else row[c] for c in columns])


def write_grid(path: Path, sets: list[ImageSet]) -> None:
    """Per prompt one row: unpruned | each build | |build - unpruned| × ``DIFF_GAIN``, labels on top."""
    from PIL import Image, ImageChops, ImageDraw

    unpruned, builds = sets[0], sets[1:]
    titles = [UNPRUNED, *(s.label for s in builds), *(f"|{s.label} - unpruned| x{DIFF_GAIN}" for s in builds)]
    count = min(GRID_ROWS, len(unpruned.paths))
    with Image.open(unpruned.paths[0]) as first:
        scale = min(1.0, GRID_CELL / max(first.size))
        cell = (max(1, round(first.size[0] * scale)), max(1, round(first.size[1] * scale)))
    header = 16
    grid = Image.new("RGB", (cell[0] * len(titles), header + cell[1] * count), "white")
    pen = ImageDraw.Draw(grid)
    for column, title in enumerate(titles):
        pen.text((column * cell[0] + 3, 2), title[: max(4, cell[0] // 6)], fill="black")
    for row in range(count):
        base = _rgb(unpruned.paths[row])
        pictures = [base, *(_rgb(s.paths[row]) for s in builds)]
        diffs = [ImageChops.difference(p, base).point(lambda v: min(255, v * DIFF_GAIN)) for p in pictures[1:]]
        for column, picture in enumerate([*pictures, *diffs]):
            grid.paste(picture.resize(cell, Image.BICUBIC), (column * cell[0], header + row * cell[1]))
    grid.save(path, format="PNG")


def _rgb(path: Path) -> Any:  # noqa: ANN401 - PIL.Image.Image
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def write_plot(path: Path, table: list[dict[str, Any]]) -> None:
    """PSNR (and FID where computed) against seconds per image: one point per set, the unpruned set's time a
    dashed line where its own value cannot be drawn (PSNR against itself is infinite)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("psnr", "PSNR vs unpruned (dB, higher is closer)")]
    if any("fid" in row for row in table):
        panels.append(("fid", "FID (lower is closer)"))
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for axis, (metric, title) in zip(axes[0], panels):
        for row in table:
            value = row.get(metric)
            if value is None or not math.isfinite(value):
                if row["label"] == UNPRUNED:
                    axis.axvline(row["seconds_per_image"], linestyle="--", color="grey")
                    axis.annotate(UNPRUNED, (row["seconds_per_image"], 0.02), xycoords=("data", "axes fraction"),
                                  rotation=90, color="grey")
                continue
            axis.scatter(row["seconds_per_image"], value, color="grey" if row["label"] == UNPRUNED else None)
            axis.annotate(row["label"], (row["seconds_per_image"], value), textcoords="offset points", xytext=(4, 4))
        axis.set_xlabel("seconds per image")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=120)
    plt.close(figure)


def write_all(folder: Path, plan: EvalPlan, sets: list[ImageSet], table: list[dict[str, Any]]) -> list[Path]:
    """Every report file under the eval folder; the paths written."""
    paths = [folder / "eval.json", folder / "eval.csv", folder / "grid.png", folder / "quality-speed.png"]
    write_json(paths[0], plan, table)
    write_csv(paths[1], table)
    write_grid(paths[2], sets)
    write_plot(paths[3], table)
    return paths
