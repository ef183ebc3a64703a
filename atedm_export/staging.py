"""Output folders that appear whole or not at all: build folders and Triton repositories.

Work is written into a hidden sibling folder and renamed into place only when complete, so an error,
a full disk or Ctrl-C never leaves a half-written folder where a runtime or a server could load it.
A lock file beside the output (``.NAME.lock``, holding the writer's process id) keeps two writers from
the same output at once; a writer killed outright (SIGKILL, an out-of-memory kill) leaves its lock and
hidden folders behind, and the next writer into the same place removes them once their process is gone.
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


def check_output_file(path: Path) -> None:
    """Refuse an output file that could not be written (no such folder, or a folder in its place), before
    the work that produces it."""
    if not path.parent.resolve().is_dir():
        raise AtedmError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise AtedmError(f"cannot write {path}: it is a folder; expected a file name")


@contextmanager
def staged_folder(out: Path, what: str = "build") -> Iterator[Path]:
    """Yield an empty hidden work folder beside ``out``; on success it replaces ``out``, else it is removed.

    OS errors (a full disk, permissions) become one-line ``AtedmError``s naming the file.
    """
    with _exclusive(out, what):
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _owner(path: Path) -> int | None:
    """The process id a lock file or a hidden work folder's name records, if any."""
    text = path.read_text().strip() if path.is_file() else path.name.rpartition("-")[2]
    return int(text) if text.isdigit() else None


@contextmanager
def _exclusive(out: Path, what: str) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``out`` for the ``with`` body: one writer per output at a time.

    The lock is created exclusively (``O_EXCL``), so of two writers starting together exactly one wins;
    a lock whose process is gone is stale and taken over, with that process's hidden folders.
    """
    lock = out.parent / f".{out.name}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner = _owner(lock)
            if owner is not None and _alive(owner):
                raise AtedmError(f"another {what} into {out} is running (process {owner}); "
                                 "wait for it to finish or choose another output folder") from None
            lock.unlink(missing_ok=True)
    else:
        raise AtedmError(f"cannot take the lock {lock}: another {what} keeps creating it")
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{os.getpid()}\n")
    try:
        _remove_stale(out)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _remove_stale(out: Path) -> None:
    """Hidden work and old folders of ``out`` whose writer is gone (killed before it could clean up)."""
    for folder in [*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.old-*")]:
        owner = _owner(folder)
        if owner is not None and owner != os.getpid() and not _alive(owner):
            shutil.rmtree(folder, ignore_errors=True)


def _move_into_place(work: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    work.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
