"""Output folders that appear whole or not at all: build folders and Triton repositories.

Work is written into a hidden sibling folder and renamed into place only when complete, so an error,
a full disk or Ctrl-C never leaves a half-written folder where a runtime or a server could load it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import AtedmError


def check_destination(out: Path, force: bool) -> None:
    """Refuse an output folder that exists (without ``force``), is a file, or cannot be written."""
    if out.exists() and not force:
        raise AtedmError(f"output folder {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise AtedmError(f"output path {out} exists and is not a folder")
    parent = out.parent
    if not parent.is_dir():
        raise AtedmError(f"cannot create {out}: parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AtedmError(f"cannot write to {parent}: permission denied")


@contextmanager
def staged_folder(out: Path, what: str = "build") -> Iterator[Path]:
    """Yield an empty hidden work folder beside ``out``; on success it replaces ``out``, else it is removed.

    OS errors (a full disk, permissions) become one-line ``AtedmError``s naming the file.
    """
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
        _move_into_place(work, out)
    except OSError as exc:
        raise AtedmError(f"{what} failed: {exc.strerror or exc} ({exc.filename or work})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _move_into_place(work: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    work.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
