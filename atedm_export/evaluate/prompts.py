"""The prompts an eval draws: a text file (one a line), the captions of a COCO captions JSON, or a built-in set.

The built-in set is written for this project, varied on purpose (people, animals, objects, scenes, text,
styles, counts, long and short) so a handful of images shows where pruning hurts; it is a smoke test of
fidelity, not a benchmark. The paper's protocol uses MS-COCO 2017 val captions (``docs/quality.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import AtedmError
from ..userfiles import is_readable_file, load_json, read_text

#: Varied prompts for a quick look at what pruning changes (written for this project).
BUILTIN_PROMPTS: tuple[str, ...] = (
    "a red fox standing in fresh snow at dawn, soft light",
    "a portrait photo of an elderly fisherman with a grey beard, 85mm lens",
    "a bowl of ramen with a soft-boiled egg, top-down food photography",
    "a lighthouse on a rocky cliff during a storm, waves crashing",
    "an isometric illustration of a tiny cozy library with plants",
    "three yellow rubber ducks floating in a blue bathtub",
    "a street sign that says OPEN LATE, neon, rainy night",
    "a watercolor painting of a hot air balloon over green hills",
    "a close-up of a hummingbird drinking from a purple flower",
    "a vintage red bicycle leaning against a brick wall",
    "a futuristic city skyline at sunset with flying cars",
    "a cat wearing a tiny knitted hat, studio lighting",
    "a wooden table with a chessboard mid-game, shallow depth of field",
    "an astronaut riding a horse on the moon, photorealistic",
    "a snowy mountain lake reflecting pine trees, morning mist",
    "a plate of colorful macarons arranged in a spiral",
)


def prompts_from_file(path: Path) -> list[str]:
    """One prompt per line of a UTF-8 text file; blank lines are skipped, surrounding spaces trimmed."""
    if not is_readable_file(path):
        raise AtedmError(f"--prompts {path}: no such file")
    prompts = [line.strip() for line in read_text(path, "a UTF-8 text file, one prompt per line").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise AtedmError(f"--prompts {path} holds no prompts (every line is blank)")
    return prompts


def coco_captions(path: Path) -> list[str]:
    """One caption per image of a COCO captions JSON (``captions_val2017.json``), images in ascending id.

    COCO gives each image about five captions; the protocol draws one image per COCO image, so each image
    contributes the caption with the lowest annotation id (a fixed, reproducible choice).
    """
    if not is_readable_file(path):
        raise AtedmError(f"--coco-captions {path}: no such file")
    data = load_json(path, "a COCO captions JSON (annotations/captions_val2017.json)")
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list) or not annotations:
        raise AtedmError(f"--coco-captions {path} has no 'annotations' list; expected a COCO captions JSON "
                         "(annotations/captions_val2017.json)")
    first: dict[int, tuple[int, str]] = {}
    for item in annotations:
        if not _is_caption(item):
            raise AtedmError(f"--coco-captions {path}: an annotation without an integer image_id and a caption "
                             f"({str(item)[:80]}); expected a COCO captions JSON")
        key, ident = item["image_id"], item.get("id", 0)
        if key not in first or ident < first[key][0]:
            first[key] = (ident, " ".join(item["caption"].split()))
    return [caption for _, (_, caption) in sorted(first.items())]


def _is_caption(item: Any) -> bool:  # noqa: ANN401 - JSON
    def integer(value: Any) -> bool:  # noqa: ANN401 - JSON; true is no image id
        return isinstance(value, int) and not isinstance(value, bool)

    return isinstance(item, dict) and integer(item.get("image_id")) and isinstance(item.get("caption"), str) \
        and integer(item.get("id", 0)) and bool(item["caption"].strip())


def choose_prompts(prompts_file: Path | None, coco: Path | None, limit: int | None) -> tuple[list[str], str]:
    """The prompts of this eval and where they came from (for the report): the first ``limit`` of the source."""
    if prompts_file and coco:
        raise AtedmError("give --prompts FILE or --coco-captions JSON, not both")
    if prompts_file:
        prompts, source = prompts_from_file(prompts_file), f"file {prompts_file}"
    elif coco:
        prompts, source = coco_captions(coco), f"COCO captions {coco}"
    else:
        prompts, source = list(BUILTIN_PROMPTS), "built-in set"
    return prompts[:limit] if limit else prompts, source
