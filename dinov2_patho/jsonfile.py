"""JSON and JSON-lines files the project reads back (manifests, progress markers, metrics.jsonl):
a missing, unreadable, non-UTF-8, truncated, non-JSON or wrong-shaped file is one JsonFileError naming
the file, what is wrong and what to do, never a JSONDecodeError / KeyError / TypeError traceback.

A `shape` says what the value must be: a type (int, float, str, bool, None, list, dict, list[str],
dict[str, int], str | None, Any), a dict {key: shape} (an object holding at least those keys), or a
dataclass (an object with its fields, no others; the reader returns the instance). A key whose shape
admits null may be absent.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from pathlib import Path
from typing import Any

from dinov2_patho.errors import UserError
from dinov2_patho.logging import get_logger
from dinov2_patho.textfile import decode_text

log = get_logger(__name__)

_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
          bool: "true/false", type(None): "null"}


class JsonFileError(UserError):
    """A JSON file the project wrote (or a benchmark ships) that cannot be read back as it should be."""


class _Mismatch(Exception):
    pass


def _kind(value: Any) -> str:
    return _KINDS.get(type(value), type(value).__name__)


@functools.cache
def _fields(cls: type) -> dict[str, tuple[Any, bool]]:
    """A dataclass's field name -> (shape, required)."""
    hints = typing.get_type_hints(cls)
    missing = dataclasses.MISSING
    return {f.name: (hints[f.name], f.default is missing and f.default_factory is missing)
            for f in dataclasses.fields(cls)}


def _admits_none(shape: Any) -> bool:
    return shape is None or shape is Any or type(None) in typing.get_args(shape)


def _convert(value: Any, shape: Any, where: str) -> Any:
    """`value` checked against `shape` (dataclasses built); _Mismatch naming `where` otherwise."""
    if shape is None or type(shape) is type and shape in _KINDS:  # first: once a record in JSON lines
        shape = type(None) if shape is None else shape
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if shape is float
              else type(value) is shape if shape in (int, bool) else isinstance(value, shape))
        if not ok:
            raise _Mismatch(f"{where} is {_kind(value)}, not {_KINDS[shape]}")
        return value
    if shape is Any:
        return value
    if isinstance(shape, dict):
        obj = _convert(value, dict, where)
        for key, sub in shape.items():
            if key not in obj and not _admits_none(sub):
                raise _Mismatch(f"no key {key!r} in {where}")
        checked = {key: _convert(obj[key], sub, f"{where}.{key}") for key, sub in shape.items() if key in obj}
        # the same object unless a value was built (a dataclass): no copy per record of a long JSON-lines file
        return obj if all(checked[key] is obj[key] for key in checked) else {**obj, **checked}
    if dataclasses.is_dataclass(shape):
        obj = _convert(value, dict, where)
        fields = _fields(shape)
        for key in obj:
            if key not in fields:
                raise _Mismatch(f"unexpected key {key!r} in {where}")
        for key, (_, required) in fields.items():
            if required and key not in obj:
                raise _Mismatch(f"no key {key!r} in {where}")
        return shape(**{key: _convert(v, fields[key][0], f"{where}.{key}") for key, v in obj.items()})
    if isinstance(shape, types.UnionType) or typing.get_origin(shape) is typing.Union:
        for arm in typing.get_args(shape):
            try:
                return _convert(value, arm, where)
            except _Mismatch:
                continue
        arms = " or ".join(_KINDS.get(arm, str(arm)) for arm in typing.get_args(shape))
        raise _Mismatch(f"{where} is {_kind(value)}, not {arms}")
    origin, args = typing.get_origin(shape), typing.get_args(shape)
    if origin is list:
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(_convert(value, list, where))]
    if origin is dict:
        return {k: _convert(v, args[1], f"{where}.{k}") for k, v in _convert(value, dict, where).items()}
    raise TypeError(f"not a JSON shape: {shape!r}")  # a bug of the caller, not of the file


def parse_json(path: Path, text: str, what: str, fix: str, *, shape: Any = dict, version: int | None = None,
               line: int | None = None) -> Any:
    """The JSON value of `text` (the file `path`, or its line `line`), checked (see read_json)."""
    def error(why: str) -> JsonFileError:
        it = f"{path}:" if line is None else f"{path}: line {line} is"
        return JsonFileError(f"{it} not a {what} ({why}); {fix}")

    if not text.strip():
        raise JsonFileError(f"{path}: empty, not a {what}; {fix}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}" if line is None else f"column {e.colno}"
        raise error(f"not JSON: {e.msg} at {where}; truncated or damaged") from None
    except (ValueError, RecursionError) as e:  # an integer of > 4300 digits, nesting too deep
        raise error(f"not JSON: {e}") from None
    if version is not None and isinstance(value, dict) and value.get("format_version") != version:
        found = value.get("format_version")
        raise JsonFileError(f"{path}: {what} of format {found!r}, this code reads {version}; {fix}")
    try:
        return _convert(value, shape, "the top level")
    except _Mismatch as e:
        raise error(str(e)) from None


def read_bytes(path: str | Path, what: str, fix: str) -> bytes:
    """The bytes of `path`; a missing or unreadable file is a JsonFileError naming it."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise JsonFileError(f"{path}: missing, no {what}; {fix}") from None
    except OSError as e:
        raise JsonFileError(f"{path}: cannot read the {what} ({e.strerror or e}); {fix}") from None


def _decode(path: Path, data: bytes, what: str, fix: str) -> str:
    try:
        return decode_text(path, data)
    except UserError as e:
        raise JsonFileError(f"{e}: a damaged {what}; {fix}") from None


def read_json(path: str | Path, what: str, fix: str, *, shape: Any = dict, version: int | None = None) -> Any:
    """The JSON value in `path`, a `what` ("cluster tree manifest"), checked to be of `shape` (dataclasses
    are built) and, with `version`, to hold that `format_version`. Anything else is one JsonFileError:
    "<path>: <what is wrong>; <fix>" (`fix` says what to do: rebuild, delete the directory)."""
    path = Path(path)
    return parse_json(path, _decode(path, read_bytes(path, what, fix), what, fix), what, fix, shape=shape,
                      version=version)


def complete_lines(path: str | Path, what: str, fix: str) -> tuple[bytes, str | None]:
    """The bytes of the JSON-lines file `path`, checked to be UTF-8 text, without a last line cut
    short — not JSON and no line break after it: what a writer killed mid-line (SIGKILL, a SLURM
    requeue) leaves — and a note naming the line left out (None when there was none)."""
    path = Path(path)
    data = read_bytes(path, what, fix)
    note = None
    head, _, last = data.rpartition(b"\n")
    if last.strip():
        try:
            json.loads(last.decode("utf-8"))
        except (ValueError, RecursionError):
            number = data.count(b"\n") + 1
            note = f"{path}: last line {number} is incomplete (a run killed while writing it); left out"
            data = head
    _decode(path, data, what, fix)  # pyarrow takes bytes that are not UTF-8, then fails on its column names
    return data, note


def parse_lines(path: str | Path, data: bytes, what: str, fix: str, *, shape: Any = dict) -> list[Any]:
    """Every record of `data` (the lines of `path`, blank lines skipped), each of `shape`, or a
    JsonFileError naming the first bad line."""
    path = Path(path)
    lines = _decode(path, data, what, fix).split("\n")
    return [parse_json(path, line, what, fix, shape=shape, line=number)
            for number, line in enumerate(lines, 1) if line.strip()]


def read_json_lines(path: str | Path, what: str, fix: str, *, shape: Any = dict) -> list[Any]:
    """The records of the JSON-lines file `path`, each of `shape`: a last line cut short by a killed
    writer is left out with a warning naming it, a bad line before it is a JsonFileError naming it."""
    data, note = complete_lines(path, what, fix)
    if note is not None:
        log.warning(note)
    return parse_lines(path, data, what, fix, shape=shape)


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The dotted key where two JSON-like values first differ (None if equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            diff = first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if diff is not None:
                return diff
        return None
    return None if a == b else f"{prefix[:-1]} ({a!r} there, {b!r} now)"
