"""Output folders that appear whole or not at all: build folders and Triton repositories.

Work is written into a hidden sibling folder and renamed into place only when complete, so an error,
a full disk or Ctrl-C never leaves a half-written folder where a runtime or a server could load it.
A lock file beside the output (``.NAME.lock``, holding the writer's process id) keeps two writers from
the same output at once; a writer killed outright (SIGKILL, an out-of-memory kill) leaves its lock and
hidden folders behind, and the next writer into the same place removes them once their process is gone.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import AtedmError


#: What the hidden siblings add to an output's name (``.NAME.partial-PID``): the name must leave room for it.
_SIBLING_EXTRA = len(".") + len(".partial-") + 10


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _check_name(out: Path, folder: Path, extra: int, why: str) -> None:
    """Refuse a name the file system would refuse once ``extra`` bytes are added to it (``why``)."""
    limit = _name_max(folder) - extra
    if len(out.name.encode()) > limit:
        raise AtedmError(f"output name '{out.name[:40]}…' is {len(out.name.encode())} bytes; expected at most {limit} "
                         f"(the file system's {limit + extra}, less room for {why})")


def check_writable(folder: Path, target: Path) -> None:
    """Create and remove a temporary file in ``folder``: the one test that also holds for root on a read-only
    mount, where ``os.access`` says yes."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise AtedmError(f"cannot write {target}: folder {folder} is not writable ({exc.strerror or exc})") from None


def check_apart(out: Path, inputs: dict[str, Path | None], out_label: str = "--out",
                error: type[AtedmError] = AtedmError) -> None:
    """Refuse an output that is, holds or lies inside one of the command's inputs (``inputs``: each by what it is,
    ``{"build": path}``; None where not given): the output would replace, delete or write into what the command
    reads. Paths are compared resolved, so a link or a ``..`` does not hide an overlap."""
    target = out.expanduser().resolve()
    for label, given in inputs.items():
        if given is None:
            continue
        source = Path(given).expanduser().resolve()
        if target == source or target.is_relative_to(source) or source.is_relative_to(target):
            raise error(f"{out_label} {target} and {label} {source} overlap; expected an output folder outside every "
                        "input that holds none of them")


def check_destination(out: Path, force: bool, owner_file: str | None = None,
                      inputs: dict[str, Path | None] | None = None) -> None:
    """Refuse an output folder that exists (without ``force``), is a file, has a name the file system refuses,
    or cannot be written; missing parent folders are fine (``staged_folder`` makes them, as ``mkdir -p`` would).

    ``--force`` replaces only a folder this tool wrote, one holding ``owner_file`` (a build's manifest): never a
    folder of the user's own. ``inputs``: what the command reads, which the output may not be, hold or lie in
    (``check_apart``)."""
    _check_name(out, out.parent if out.parent.is_dir() else Path("."), _SIBLING_EXTRA, "the hidden work folder")
    check_apart(out, inputs or {})
    if out.exists() and not force:
        raise AtedmError(f"output folder {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise AtedmError(f"output path {out} exists and is not a folder")
    if out.exists() and owner_file is not None and not (out / owner_file).is_file():
        raise AtedmError(f"output folder {out} was not written by atedm-export (it holds no {owner_file}); --force "
                         "replaces only a folder this tool wrote: choose another --out, or move it away")
    parent = nearest_existing(out.parent)
    if not parent.is_dir():
        raise AtedmError(f"cannot create {out}: {parent} is a file, not a folder")
    check_writable(parent, out)


def nearest_existing(folder: Path) -> Path:
    """``folder`` or its nearest ancestor that exists: where the missing folders of an output would be made."""
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_output_file(path: Path, suffixes: tuple[str, ...] = ()) -> None:
    """Refuse an output file that could not be written (no such folder, a folder in its place, a read-only
    folder, a name too long, a format we do not write), before the work that produces it."""
    if suffixes and path.suffix.lower() not in suffixes:
        raise AtedmError(f"output {path} must be a {' or '.join(suffixes)} file")
    folder = path.parent.resolve()
    if not folder.is_dir():
        raise AtedmError(f"cannot write {path}: folder {path.parent} does not exist")
    _check_name(path, folder, len(".tmp") + 8, "the temporary name it is written under")
    if path.is_dir():
        raise AtedmError(f"cannot write {path}: it is a folder; expected a file name")
    check_writable(folder, path)


def write_atomically(path: Path, text: str) -> None:
    """Write beside the target and rename: a reader (or a rerun after Ctrl-C) sees the old file or the new one."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(3)}.tmp"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def staged_folder(out: Path, what: str = "build") -> Iterator[Path]:
    """Yield an empty hidden work folder beside ``out``; on success it replaces ``out``, else it is removed.

    Missing parent folders are made (as ``mkdir -p``) and removed again if the work fails: nothing is left
    behind, not even an empty ``build/``. OS errors (a full disk, permissions) become one-line ``AtedmError``s
    naming the file.
    """
    with parents_made(out):
        with exclusive(out, what):
            yield from _work_folder(out, what)


@contextmanager
def parents_made(out: Path) -> Iterator[None]:
    """Make ``out``'s missing parent folders for the ``with`` body (as ``mkdir -p``); if the body fails, remove
    those that are still empty: a failed command leaves no folder it made."""
    made = []  # innermost first
    parent = out.parent.absolute()
    while not parent.exists():
        made.append(parent)
        parent = parent.parent
    for folder in reversed(made):
        folder.mkdir()
    try:
        yield
    except BaseException:
        for folder in made:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def _work_folder(out: Path, what: str) -> Iterator[Path]:
    """The body of ``staged_folder`` under the lock: the hidden folder, moved into place or removed."""
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
def exclusive(out: Path, what: str) -> Iterator[None]:
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
