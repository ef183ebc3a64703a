"""Put a deployment's entries into a repository folder that may hold other models: all or nothing, only ours.

A Triton repository is often shared: other teams' models sit beside ours. So a deploy never replaces the
folder, only entries in it: it writes its entries into a hidden work folder beside the repository (the
same file system, so each move is a rename), then moves aside what an earlier deploy wrote there (the
entries ``replace`` names, read from that deploy's record by the caller), renames each new entry in, and
deletes what it moved aside. Any failure (an error, a full disk, Ctrl-C) renames everything back: the
repository is left as it was. Entries nobody named are never moved, opened or deleted.

The lock and the hidden folders' names are ``staging``'s (``.NAME.lock``, ``.NAME.partial-PID``,
``.NAME.old-PID`` beside the repository), so a writer killed outright is cleaned up the same way as a build's.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..staging import exclusive, parents_made
from .config import DeployError


def check_not_a_build(repository: Path, manifest_file: str) -> None:
    """Refuse a repository folder that is a build folder (it holds a build's manifest): a deploy never writes
    into what another command wrote and reads."""
    if (repository / manifest_file).is_file():
        raise DeployError(f"repository {repository} is a build folder (it holds {manifest_file}); deploy writes a "
                          "Triton repository beside builds, never into one: choose another --triton folder")


def check_movable(repository: Path) -> None:
    """Refuse a repository that is a mount point: entries cannot be renamed into it from beside it."""
    if repository.is_dir() and os.path.ismount(repository):
        raise DeployError(f"repository {repository} is a mount point; deploy writes beside it and renames into it, "
                          "so expected a folder on the same file system as its parent (deploy into a folder inside it)")


def hidden_folder(repository: Path, kind: str) -> Path:
    """A fresh, empty hidden folder beside ``repository``: ``.NAME.partial-PID`` (``kind`` partial) for what is being
    written, ``.NAME.old-PID`` (old) for what is on its way out; ``staging``'s names, so a writer killed outright is
    cleaned up as a build's is."""
    folder = repository.parent / f".{repository.name}.{kind}-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


@contextmanager
def staged_entries(repository: Path, replace: Collection[str], last: str = "") -> Iterator[Path]:
    """Yield an empty hidden work folder beside ``repository``; when the body ends, its entries go in.

    A missing repository is the work folder renamed (one rename); an existing one gets each entry renamed
    in, after the entries named in ``replace`` are moved aside (they are deleted once all is in). ``last``
    is moved in last: the record that marks the deployment, so it never lists models that are not there.
    OS errors become one-line ``DeployError``s naming the file.
    """
    with parents_made(repository), exclusive(repository, "deploy"):
        work = hidden_folder(repository, "partial")
        try:
            yield work
            if repository.exists():
                _swap_entries(work, repository, replace, last)
            else:
                work.rename(repository)
        except OSError as exc:
            raise DeployError(f"deploy failed: {exc.strerror or exc} ({exc.filename or work})") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)  # empty after a success; our new entries after a failure


def _swap_entries(work: Path, repository: Path, replace: Collection[str], last: str) -> None:
    """Move ``replace`` aside and ``work``'s entries in; on any failure undo every move, in reverse."""
    aside = hidden_folder(repository, "old")
    moves: list[tuple[Path, Path]] = []
    try:
        for name in sorted(n for n in replace if os.path.lexists(repository / n)):
            _move(repository / name, aside / name, moves)
        for entry in sorted(work.iterdir(), key=lambda p: (p.name == last, p.name)):
            target = repository / entry.name
            if os.path.lexists(target):  # written by someone else since the deploy checked
                raise DeployError(f"{target} appeared during the deploy; nothing was changed")
            _move(entry, target, moves)
    except BaseException:
        for source, target in reversed(moves):
            target.rename(source)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)  # the earlier deploy's entries after a success; empty otherwise


def _move(source: Path, target: Path, moves: list[tuple[Path, Path]]) -> None:
    source.rename(target)
    moves.append((source, target))


@contextmanager
def staged_version(repository: Path, last: str, check: Callable[[], object]) -> Iterator[Path]:
    """Yield an empty hidden work folder beside ``repository``, laid out as it is; when the body ends, merge it in.

    For a new version of a deployment: the work folder holds ``<model>/<version>/`` for every model, each model's
    ``config.pbtxt``, and the record. A version folder is renamed into its model's folder (never over one); a model
    the repository lacks comes in whole; any other file replaces ours, the old one moved aside. The model ``last``
    (the router) comes after the graph models it calls, and top-level files (the record) after every model.
    ``check`` runs on the merged repository; if it or any move fails, every move is undone in reverse and the
    repository is as it was.
    """
    with exclusive(repository, "deploy"):
        work, aside = hidden_folder(repository, "partial"), hidden_folder(repository, "old")
        try:
            yield work
            _merge(work, repository, aside, last, check)
        except OSError as exc:
            raise DeployError(f"deploy failed: {exc.strerror or exc} ({exc.filename or work})") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(aside, ignore_errors=True)


def _merge(work: Path, repository: Path, aside: Path, last: str, check: Callable[[], object]) -> None:
    moves: list[tuple[Path, Path]] = []
    try:
        for entry in sorted(work.iterdir(), key=lambda p: (p.is_file(), p.name == last, p.name)):
            target = repository / entry.name
            if entry.is_dir() and target.is_dir():
                for child in sorted(entry.iterdir(), key=lambda p: (p.is_file(), p.name)):
                    _merge_entry(child, target / child.name, aside / entry.name / child.name, moves)
            else:
                _merge_entry(entry, target, aside / entry.name, moves)
        check()
    except BaseException:
        for source, target in reversed(moves):
            target.rename(source)
        raise


def _merge_entry(source: Path, target: Path, aside: Path, moves: list[tuple[Path, Path]]) -> None:
    """A file replaces ``target`` (moved to ``aside`` first); a folder goes where nothing is."""
    if os.path.lexists(target):
        if source.is_dir() or target.is_dir():
            raise DeployError(f"{target} appeared during the deploy; nothing was changed")
        aside.parent.mkdir(parents=True, exist_ok=True)
        _move(target, aside, moves)
    _move(source, target, moves)
