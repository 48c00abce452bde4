"""The one checked reader of the records latentmill writes (stats files, state.json, started.json, lineage
records, funnels, manifests, sample indexes, statistics caches): a record that is cut, empty, not JSON (or
not an .npz) or of the wrong shape is an InputError naming the file, what is wrong and the fix, never a raw
JSONDecodeError, KeyError, TypeError or BadZipFile from deep inside a command."""

from __future__ import annotations

import json

from latentmill.curate.storage import location
from latentmill.errors import InputError

NUMBER = (int, float)


def _is(value, types) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:
        return False  # JSON's true is not a count
    return isinstance(value, types)


def _name(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    words = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}
    words |= {bool: "true or false", type(None): "null"}
    return " or ".join(words.get(t, t.__name__) for t in types)


def read_record(path, kind: type | tuple = dict, fix: str = "", fields: dict | None = None):
    """The JSON value in `path`, checked to be a `kind` (and, for a dict, to hold `fields` of their types:
    name -> type or tuple of types); `fix` is what the message tells the user to do about a damaged one. A
    missing file is FileNotFoundError, left to the caller (most records are optional)."""
    path = location(path)
    fix = fix or f"delete {path} (latentmill writes it again)"
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise InputError(
            f"{path}: not text, so not a record latentmill wrote (damaged?). Fix: {fix}."
        ) from None
    except IsADirectoryError:
        raise InputError(f"{path}: a folder where latentmill keeps a file. Fix: {fix}.") from None
    if not text.strip():
        raise InputError(f"{path}: empty (cut off as it was written?). Fix: {fix}.")
    try:
        value = json.loads(text)
    except RecursionError:
        raise InputError(f"{path}: nested too deeply to be a record latentmill wrote. Fix: {fix}.") from None
    except ValueError as err:
        where = f" at line {err.lineno}" if hasattr(err, "lineno") else ""
        raise InputError(f"{path}: damaged JSON ({getattr(err, 'msg', err)}{where}). Fix: {fix}.") from None
    if not _is(value, kind):
        raise InputError(
            f"{path}: holds {_name(type(value))}, where latentmill writes {_name(kind)}. Fix: {fix}."
        )
    for name, types in (fields or {}).items():
        if name not in value:
            raise InputError(f"{path}: has no {name!r} field. Fix: {fix}.")
        if not _is(value[name], types):
            shown = json.dumps(value[name])[:40]
            raise InputError(f"{path}: its {name!r} is {shown}, not {_name(types)}. Fix: {fix}.")
    return value


def read_optional(path, kind: type | tuple = dict, fix: str = "", fields: dict | None = None):
    """read_record, or None where the file does not exist."""
    path = location(path)
    if not path.exists():
        return None
    return read_record(path, kind, fix, fields)


def read_arrays(path, fields: dict[str, int], fix: str = "") -> dict:
    """The arrays of an .npz latentmill wrote (no pickles), each of `fields` present with its number of
    dimensions (name -> ndim); a file that is no zip, is cut, or lacks a key is an InputError."""
    import zipfile

    import numpy as np

    path = location(path)
    fix = fix or f"delete {path} (latentmill writes it again)"
    with path.open("rb") as f:
        if f.read(4) != b"PK\x03\x04":  # an .npz is a zip
            raise InputError(f"{path}: not an .npz (cut off or damaged?). Fix: {fix}.")
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in fields if name in stored.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        pickled = "pickle" in str(err)
        reason = "pickled objects, which latentmill never writes" if pickled else "a damaged .npz (cut off?)"
        raise InputError(f"{path}: {reason}. Fix: {fix}.") from None
    for name, ndim in fields.items():
        if name not in arrays:
            raise InputError(f"{path}: has no {name!r} array. Fix: {fix}.")
        if arrays[name].ndim != ndim:
            raise InputError(
                f"{path}: its {name!r} has {arrays[name].ndim} dimensions, not {ndim}. Fix: {fix}."
            )
    return arrays


def read_log(path) -> list[dict]:
    """The entries of a log.jsonl that have a numeric step: a line cut off by a kill, or damaged, is
    skipped (the log is appended as training runs, so its last line may be half written)."""
    entries = []
    for line in location(path).read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(entry, dict) and _is(entry.get("step"), NUMBER):
            entries.append(entry)
    return entries
