"""Reading the files a user hands us (specs, schedules, manifests, configs, graphs), one line per failure.

Third-party readers fail in their own words and with their own tracebacks: ``UnicodeDecodeError`` for a
UTF-16 or binary spec, protobuf's ``DecodeError`` and onnxruntime's ``InvalidProtobuf`` for an ``.onnx``
that is not a model, ``OSError`` for an unreadable file. ``decoding`` is the one place that turns each of
them into an ``AtedmError`` naming the file and what it was expected to be. The readers below also refuse
what those libraries accept silently: a YAML mapping with a key given twice (PyYAML keeps the last one: a
spec saying ``height: 256`` first would build at the second height) and JSON's ``NaN``/``Infinity``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from .errors import AtedmError, first_line


def _decode_errors() -> tuple[type[BaseException], ...]:
    """The exception types a reader raises on a file that is not what its name says.

    onnxruntime's types are only looked up where onnxruntime is already imported: a reader that never
    imported it cannot raise them, and importing it here would cost every command its start-up.
    """
    from google.protobuf.message import DecodeError

    found: list[type[BaseException]] = [DecodeError, yaml.YAMLError, json.JSONDecodeError]
    ort = sys.modules.get("onnxruntime.capi.onnxruntime_pybind11_state")
    if ort is not None:
        found += [ort.InvalidProtobuf, ort.InvalidGraph, ort.Fail, ort.NoSuchFile]
    return tuple(found)


@contextmanager
def decoding(path: str | Path, expected: str, error: type[AtedmError] = AtedmError) -> Iterator[None]:
    """Within the block, a file that cannot be read or decoded is one ``error`` naming ``path`` and
    ``expected`` (``"a graph spec (YAML)"``)."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                    f"expected {expected}") from None
    except AtedmError:
        raise
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or first_line(exc)}; expected {expected}") from None
    except _decode_errors() as exc:
        raise error(f"{path} is not {expected} ({first_line(exc)})") from None


def check_distinct(folders: Sequence[Path], what: str = "build") -> None:
    """Refuse a folder given twice (one line naming both spellings): it would be measured or compared with itself."""
    seen: dict[Path, Path] = {}
    for folder in folders:
        key = Path(folder).resolve()
        if key in seen:
            raise AtedmError(f"{what} {folder} is given twice (as {seen[key]} and {folder})")
        seen[key] = Path(folder)


def is_readable_file(path: Path) -> bool:
    """A file to read: a regular file, or a pipe or device (``<(echo …)``, ``/dev/stdin``); never a folder."""
    return path.exists() and not path.is_dir()


def read_text(path: Path, expected: str, error: type[AtedmError] = AtedmError) -> str:
    """A text file's contents (UTF-8)."""
    with decoding(path, expected, error):
        return path.read_text(encoding="utf-8")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping key given twice (YAML 1.2 says keys are unique)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                line = first.setdefault(key, key_node.start_mark.line)
            except TypeError:
                continue  # an unhashable key: SafeLoader's own error names it
            if line != key_node.start_mark.line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first on line {line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path, expected: str, error: type[AtedmError] = AtedmError) -> Any:
    """A YAML file's data, with duplicate keys refused; errors say where (``line N``)."""
    text = read_text(path, expected, error)
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise error(f"{path}: not valid YAML{where} ({problem})") from None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    twice = next((key for key in keys if keys.count(key) > 1), None)
    if twice is not None:
        raise ValueError(f"key '{twice}' is given twice in one object")
    return dict(pairs)


def load_json(path: Path, expected: str, error: type[AtedmError] = AtedmError) -> Any:
    """A JSON file's data; ``NaN`` and ``Infinity`` (Python's extensions to JSON) and a key given twice in one
    object (which JSON parsers resolve each their own way) are refused."""
    text = read_text(path, expected, error)
    try:
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}; expected {expected}") from None
    except ValueError as exc:
        raise error(f"{path}: {exc}; expected {expected}") from None


def load_onnx(path: Path, error: type[AtedmError] = AtedmError) -> Any:
    """An ONNX graph's structure (its external weights are not read)."""
    import onnx

    with decoding(path, "an ONNX model", error):
        return onnx.load(str(path), load_external_data=False)
