"""The eval folder's record, so a rerun reuses every image that was drawn as it would be drawn now.

``DIR/eval-state.json`` holds what the whole eval asks (prompts, base seed, steps, guidance) and marks the
folder as one an eval made: an eval writes into a new or empty folder, or one whose record asks the same
question, and nowhere else. Each image has a sidecar, ``DIR/images/<label>/<index>.json``, beside its PNG:
prompt, seed, steps, guidance, backend, device, the identity of the graphs that drew it, and the seconds the
pipeline call took. A sidecar per image (rather than one growing file) keeps each record one small write,
also at 30k images; it is written after its PNG, so an image interrupted between the two is drawn again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import AtedmError
from ..staging import check_writable, write_atomically
from ..userfiles import load_json

FORMAT = "atedm-export.eval/1"
STATE = "eval-state.json"


@dataclass(frozen=True)
class ImageKey:
    """Everything an image depends on: an image whose sidecar holds the same key is the same image."""

    prompt: str
    seed: int
    steps: int
    guidance: float
    backend: str
    device: str
    build: str  # the graphs' identity: a build's manifest sha256, or the baseline's files for the unpruned set


class EvalState:
    """The record of one eval folder: its settings, and each image's sidecar."""

    def __init__(self, folder: Path, settings: dict[str, Any], exists: bool) -> None:
        self.folder = folder
        self.settings = settings
        self.exists = exists  # the folder already holds this eval's record

    @classmethod
    def check(cls, folder: Path, settings: dict[str, Any]) -> EvalState:
        """The folder's record, read and compared with ``settings``; nothing is written (``create`` does that).

        Refused in one line: a file in the folder's place, a folder whose parent is missing, a non-empty folder
        without an eval record, a record of another format, or one that asks another question (other prompts,
        seed, steps or guidance), for which a new folder is the answer.
        """
        if folder.exists() and not folder.is_dir():
            raise AtedmError(f"--out {folder} is a file; expected a folder for the eval's images and reports")
        if not folder.exists():
            if not folder.parent.is_dir():
                raise AtedmError(f"--out {folder}: folder {folder.parent} does not exist")
            check_writable(folder.parent, folder)  # before the pipeline loads, not after
            return cls(folder, settings, exists=False)
        check_writable(folder, folder / STATE)
        record = folder / STATE
        if not record.is_file():
            if any(folder.iterdir()):
                raise AtedmError(f"--out {folder} is not empty and holds no eval record ({STATE}); eval writes only "
                                 "into a new or empty folder, or one an earlier eval made")
            return cls(folder, settings, exists=False)
        data = load_json(record, f"an atedm-export eval record ({STATE})")
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("settings"), dict):
            raise AtedmError(f"{record} is not an eval record this atedm-export reads (format {FORMAT!r}); "
                             "use a new --out folder")
        _check_same(folder, data["settings"], settings)
        return cls(folder, settings, exists=True)

    def create(self) -> None:
        """Make the folder and its record, where this is a new eval."""
        if not self.exists:
            self.folder.mkdir(exist_ok=True)
            record = {"format": FORMAT, "settings": self.settings}
            write_atomically(self.folder / STATE, json.dumps(record, indent=2) + "\n")
            self.exists = True

    def image_path(self, label: str, index: int) -> Path:
        return self.folder / "images" / label / f"{index}.png"

    def reusable(self, label: str, index: int, key: ImageKey) -> float | None:
        """The recorded seconds of image ``index`` of ``label`` where its PNG exists and its sidecar holds ``key``."""
        png, sidecar = self.image_path(label, index), self._sidecar(label, index)
        if not png.is_file() or not sidecar.is_file():
            return None
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # a sidecar we cannot read is a reason to draw the image again, not to stop
        seconds = data.get("seconds") if isinstance(data, dict) else None
        if not isinstance(seconds, int | float) or {k: v for k, v in data.items() if k != "seconds"} != asdict(key):
            return None
        return float(seconds)

    def forget(self, label: str, index: int) -> None:
        """Drop an image's sidecar before it is drawn again: a PNG never pairs with an older image's record."""
        self._sidecar(label, index).unlink(missing_ok=True)

    def record(self, label: str, index: int, key: ImageKey, seconds: float) -> None:
        """Record a drawn image (its PNG already in place)."""
        write_atomically(self._sidecar(label, index), json.dumps({**asdict(key), "seconds": seconds}, indent=2) + "\n")

    def _sidecar(self, label: str, index: int) -> Path:
        return self.image_path(label, index).with_suffix(".json")


def _check_same(folder: Path, recorded: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse a folder whose record asks another question, naming the first setting that differs."""
    for key, value in wanted.items():
        if recorded.get(key) != value:
            was = recorded.get(key)
            shown = (f"{len(was) if isinstance(was, list) else '?'} other prompts" if key == "prompts"
                     else f"{key} {was}")
            raise AtedmError(f"--out {folder} holds an eval of {shown} (this one asks {_brief(key, value)}); "
                             "use a new --out folder")


def _brief(key: str, value: Any) -> str:  # noqa: ANN401
    return f"{len(value)} prompts" if key == "prompts" else f"{key} {value}"
