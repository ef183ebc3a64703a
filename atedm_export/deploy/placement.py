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
from collections.abc import Collection, Iterator
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


@contextmanager
def staged_entries(repository: Path, replace: Collection[str], last: str = "") -> Iterator[Path]:
    """Yield an empty hidden work folder beside ``repository``; when the body ends, its entries go in.

    A missing repository is the work folder renamed (one rename); an existing one gets each entry renamed
    in, after the entries named in ``replace`` are moved aside (they are deleted once all is in). ``last``
    is moved in last: the record that marks the deployment, so it never lists models that are not there.
    OS errors become one-line ``DeployError``s naming the file.
    """
    with parents_made(repository), exclusive(repository, "deploy"):
        work = repository.parent / f".{repository.name}.partial-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
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
    aside = repository.parent / f".{repository.name}.old-{os.getpid()}"
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
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
