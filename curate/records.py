"""The one checked reader of the JSON records latentmill writes (stats files, state.json, lineage records,
manifests): a record that is cut, empty, not JSON or of the wrong shape is an InputError naming the file,
what is wrong and the fix, never a raw JSONDecodeError or KeyError from deep inside a command."""

from __future__ import annotations

import json

from latentmill.curate.storage import location
from latentmill.errors import InputError


def read_record(path, kind: type = dict, fix: str = "", fields: dict[str, type | tuple] | None = None):
    """The JSON value in `path`, checked to be a `kind` (and, for a dict, to hold `fields` of their types);
    `fix` is what the message tells the user to do about a damaged one."""
    path = location(path)
    fix = fix or f"delete {path} (latentmill writes it again)"
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise InputError(
            f"{path}: not text, so not a record latentmill wrote (damaged?). Fix: {fix}."
        ) from None
    if not text.strip():
        raise InputError(f"{path}: empty (cut off as it was written?). Fix: {fix}.")
    try:
        value = json.loads(text)
    except ValueError as err:
        raise InputError(f"{path}: damaged JSON ({err.msg} at line {err.lineno}). Fix: {fix}.") from None
    if not isinstance(value, kind):
        raise InputError(
            f"{path}: holds a JSON {type(value).__name__}, where latentmill writes a {kind.__name__}. Fix: {fix}."
        )
    for name, types in (fields or {}).items():
        if name not in value:
            raise InputError(f"{path}: has no {name!r} field. Fix: {fix}.")
        if not isinstance(value[name], types):
            raise InputError(
                f"{path}: its {name!r} is a {type(value[name]).__name__} ({str(value[name])[:40]!r}). Fix: {fix}."
            )
    return value
