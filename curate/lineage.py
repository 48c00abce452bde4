"""Lineage: what an output was made from, so that a re-run never keeps an output that no longer matches.

A lineage record is a small JSON object:

    {"stage": "score",
     "settings": {...},   # the config fields that change the output's bytes (Spec.affects), paths left out
     "models": {...},     # models, heads and other files the output depends on, by content
     "inputs": {...},     # the input folders or files, by their own lineage fingerprint or by content
     "labels": {...},     # how messages show each model and input (the path as given): not fingerprinted
     "fingerprint": "..."}

The fingerprint is a sha256 of the canonical JSON of settings, models and inputs; no path enters it, so a
moved or copied work folder keeps its fingerprints. Stage folders keep their record in `lineage.json`; a
command run into a folder made with other settings refuses (exit 2, each difference named, `--overwrite`
to redo), and with `--overwrite` clears the folder's outputs before it writes anything new.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from latentmill.curate.downloadresults import STATE_DIR
from latentmill.curate.storage import file_version, is_remote, location, make_folder, remove, write_json
from latentmill.errors import InputError
from latentmill.schema import spec_of

LINEAGE = "lineage.json"
_WHOLE_FILE_BYTES = 64 << 20  # files up to this size are hashed whole; larger ones by size, head and tail
_EDGE_BYTES = 4 << 20


def settings_of(config, skip: tuple[str, ...] = ()) -> dict:
    """The fields of a config that change its stage's output (all but its class's RUNTIME ones, and those
    added later (`since`) while at their default), minus `skip` (paths recorded as models or inputs)."""
    out = {}
    runtime = set(getattr(type(config), "RUNTIME", ())) | set(skip)
    for field in dataclasses.fields(config):
        spec, value = spec_of(field), getattr(config, field.name)
        if spec is None or field.name in runtime or (spec.since and value == field.default):
            continue  # an option newer than a record, at its default, made no difference to it
        out[field.name] = _portable(value) if (spec.path or spec.model) else _plain(value)
    return out


def _portable(value):
    """A path or model setting as the record keeps it: a string naming an existing file or folder becomes
    its content fingerprint (a path is not what made the output; the file is). Only options declared
    `path` or `model` are read this way, so no record depends on what the current directory holds."""
    if isinstance(value, str) and value and _exists(value):
        return "content:" + content_fingerprint(value)
    if isinstance(value, (list, tuple)):
        return [_portable(v) for v in value]
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    return value


def _plain(value):
    """Any other setting: its value, as JSON keeps it (tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def content_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, in name order).
    Files over 64 MiB are hashed by size, first and last 4 MiB, so large weight files stay cheap."""
    root = location(path)
    root = root if is_remote(root) else root.resolve()
    digest = hashlib.sha256()
    for name, file in _files(root):
        if file.name.endswith(LINEAGE):
            continue
        digest.update(name.encode("utf-8", "surrogateescape"))  # a file name need not be UTF-8
        size, version = file_version(file)
        digest.update(_file_digest(str(file), size, version))
    return digest.hexdigest()[:16]


def _files(root) -> list[tuple[str, object]]:
    """(name relative to root, path) of a file ("" for itself) or of every file under a folder, sorted."""
    if root.is_file():
        return [("", root)]
    if is_remote(root):
        base = root.path.rstrip("/") + "/"
        found = root.fs.find(root.path)
        return [(f[len(base) :], root / f[len(base) :]) for f in sorted(found) if f.startswith(base)]
    return [(str(p.relative_to(root)), p) for p in sorted(root.rglob("*")) if p.is_file()]


def _exists(spec: str) -> bool:
    try:
        return location(spec).exists()
    except (OSError, ValueError):
        return False


@lru_cache(maxsize=65536)
def _file_digest(file: str, size: int, version: str) -> bytes:
    """A file's digest, cached in this process by (path, size, mtime or ETag)."""
    digest = hashlib.sha256(str(size).encode())
    with location(file).open("rb") as f:
        if size <= _WHOLE_FILE_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(f.read(_EDGE_BYTES))
            f.seek(size - _EDGE_BYTES)
            digest.update(f.read(_EDGE_BYTES))
    return digest.digest()


def model_fingerprint(spec: str | None) -> str | None:
    """A model, head or other file named by a setting: its content when it is a local file or folder,
    else the name itself (an architecture name such as `tiny`, or a model hub id)."""
    if not spec:
        return None
    return "content:" + content_fingerprint(spec) if _exists(spec) else f"name:{spec}"


def input_fingerprint(path: str | Path) -> str | None:
    """An input folder or file: the fingerprint of its lineage record when latentmill made it, else its
    content (a URL table, image shards made elsewhere); None when it does not exist."""
    path = location(path)
    record = read_record(path)
    if record is not None:
        return record["fingerprint"]
    return content_fingerprint(path) if path.exists() else None


def make_record(
    stage: str,
    config=None,
    inputs: dict[str, str | Path | None] | None = None,
    models: dict[str, str | None] | None = None,
    settings: dict | None = None,
) -> dict:
    """A stage output's lineage record: the config's settings (RUNTIME fields left out, files by
    content) and `settings` beside them, `inputs` (paths) and `models` (paths or names) by content."""
    settings = (settings_of(config) if config is not None else {}) | (settings or {})
    models, inputs = models or {}, inputs or {}
    body = {
        "stage": stage,
        "settings": json.loads(json.dumps(settings, default=str)),
        "models": {k: model_fingerprint(v) for k, v in sorted(models.items())},
        "inputs": {k: input_fingerprint(v) if v else None for k, v in sorted(inputs.items())},
    }
    labels = {f"models.{k}": v for k, v in models.items() if v}
    labels |= {f"inputs.{k}": str(v) for k, v in inputs.items() if v}
    if config is not None:  # how a setting naming a file is shown: as it was given
        for key, value in settings.items():
            if "content:" in json.dumps(value, default=str):
                labels[f"settings.{key}"] = json.dumps(getattr(config, key, value), default=str)
    return body | {"labels": labels, "fingerprint": fingerprint(body)}


def fingerprint(body: dict) -> str:
    keys = ("stage", "settings", "models", "inputs")
    canonical = json.dumps({k: body.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def differences(old: dict, new: dict) -> list[str]:
    """What changed between two records, one line each: `settings.min_side: 256 -> 512`,
    `models.vae: changed (vae/)`, `inputs.selection: changed (selection/)`."""
    lines = []
    for part in ("settings", "models", "inputs"):
        before, now = _flat(old.get(part) or {}, part), _flat(new.get(part) or {}, part)
        for name in sorted(set(before) | set(now)):
            if before.get(name) == now.get(name):
                continue
            shown = (before.get(name), now.get(name))
            files = ["content:" in json.dumps(v, default=str) for v in shown]
            by_label = any(files) and (all(files) or any(v in (None, [], {}, "") for v in shown))
            if part == "settings" and not by_label:  # a value against a value (or a file): show both
                lines.append(f"{name}: {_show(shown[0])} -> {_show(shown[1])}")
            else:
                label = new.get("labels", {}).get(name) or old.get("labels", {}).get(name)
                lines.append(f"{name}: changed" + (f" ({label})" if label else ""))
    return lines


def _flat(values: dict, prefix: str) -> dict:
    """Nested settings as dotted names: {"select": {"where": [...]}} -> {"settings.select.where": [...]}."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out |= _flat(value, f"{prefix}.{key}")
        else:
            out[f"{prefix}.{key}"] = value
    return out


def _show(value) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, str) and value.startswith("content:"):
        return f"a file or folder ({value[8:20]}…)"
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


def read_record(output: str | Path) -> dict | None:
    """The lineage record an output keeps (None: it has none, or one that is not a record: damaged or
    hand-edited, it vouches for nothing and the output is taken by content)."""
    try:
        record = json.loads(record_path(output).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("fingerprint"), str) else None


# image shard folders keep it in _latentmill/: img2dataset takes every other name there for a shard
IMAGE_SHARDS_RECORD = Path(STATE_DIR) / LINEAGE


def record_path(output: str | Path) -> Path:
    """Where an output keeps its record: FOLDER/lineage.json (FOLDER/_latentmill/lineage.json in an image
    shard folder), or FILE.lineage.json beside a file."""
    output = location(output)
    if (output / IMAGE_SHARDS_RECORD).exists() or (output / IMAGE_SHARDS_RECORD.parent).is_dir():
        return output / IMAGE_SHARDS_RECORD
    if output.is_dir() or (not output.is_file() and not output.suffix):
        return output / LINEAGE
    return location(str(output) + "." + LINEAGE)


def claim(
    output: str | Path,
    record: dict,
    overwrite: bool,
    clear: Callable[[], None],
    flag: str = "--overwrite",
) -> bool:
    """Make `output` an output of `record` before anything is written into it: a folder made with other
    settings or inputs is refused (InputError naming each difference and `flag`), or with `overwrite`
    cleared by `clear()`. Returns True when it cleared something."""
    path = record_path(output)
    old = None
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (ValueError, RecursionError):
            old = {}
        old = old if isinstance(old, dict) else {}
    cleared = False
    if old is not None and old.get("fingerprint") != record["fingerprint"]:
        changed = differences(old, record) or ["its lineage record is unreadable"]
        if not overwrite:
            raise InputError(
                f"{output}: made with other settings or inputs ({'; '.join(changed)}). Give {flag} to "
                f"redo it with these (its outputs are replaced), or write to a new folder."
            )
        clear()
        cleared = True
    make_folder(path.parent)
    write_json(path, record)
    return cleared


def remove_files(folder: str | Path, patterns: tuple[str, ...]) -> None:
    """Delete a folder's files matching any of `patterns` (what `clear` does for a shard folder)."""
    folder = location(folder)
    if not folder.exists():
        return
    for pattern in patterns:
        for path in folder.glob(pattern):
            if path.is_file():
                remove(path)
