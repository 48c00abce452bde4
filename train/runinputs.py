"""Where a run's inputs are, so that a run works from any directory and as a copied or moved folder.

A run records each local path it was given (latent folders, the model, VAE and text-encoder folders,
`--init-from`, a LoRA adapter's base) absolute, and the place it was written at (`written_at` in
state.json). Read back (`InputPaths.find`), a recorded path is found

- inside the run, relative to where the run is now (a copy uses its own files, never the original's);
- else where it was recorded, if it is still there;
- else at the same place relative to the run (a work folder moved or copied whole, the run with it);

and where none holds, the caller gets an InputError naming what was recorded, its content fingerprint
(lineage.json) and how to point to its new place. Remote locations, model ids and tiny-config names are
not paths and are kept as given."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from latentmill.curate.storage import is_remote
from latentmill.errors import InputError

# TrainConfig keys holding local paths besides the options declared path=True or model=True
PATH_KEYS = ("output", "shards", "eval_shards")


def path_keys() -> tuple[str, ...]:
    from dataclasses import fields

    from latentmill.schema import spec_of
    from latentmill.train.config import TrainConfig

    declared = [f.name for f in fields(TrainConfig) if (s := spec_of(f)) and (s.path or s.model)]
    return tuple(dict.fromkeys([*PATH_KEYS, *declared]))


def absolute(value):
    """A path given relative to the current directory, made absolute; anything else (a model id, a tiny
    config's name, a URL, None) as it is."""
    if not isinstance(value, str) or not value or is_remote(value) or not os.path.exists(value):
        return value
    return str(Path(value).resolve())


def recorded_config(config: dict) -> dict:
    """A run's settings as state.json keeps them: every local path absolute."""
    out = dict(config)
    for key in path_keys():
        value = out.get(key)
        out[key] = [absolute(v) for v in value] if isinstance(value, list) else absolute(value)
    return out


def recorded_state(state: dict, run: Path) -> dict:
    """state.json's contents with the config's paths absolute and the run's own place recorded."""
    written_at = None if is_remote(str(run)) else str(Path(run).resolve())  # a run in a store: no local place
    return dict(state) | {"config": recorded_config(state["config"]), "written_at": written_at}


@dataclass
class InputPaths:
    """How a run opened at `run` finds the paths it recorded when it was written at `written_at`."""

    run: Path
    written_at: str | None  # None: a run from before runs recorded their place (paths as they were given)
    fingerprints: dict  # recorded path -> content fingerprint (lineage.json), for messages

    def candidates(self, value: str) -> list[Path]:
        if self.written_at is None or not os.path.isabs(value):
            return [Path(value)]
        relative = Path(os.path.relpath(value, self.written_at))
        beside = self.run / relative
        if relative.parts[:1] != ("..",):  # inside the run: the run's own copy only
            return [beside]
        return [Path(value), beside]

    def find(self, value):
        """The recorded `value` where it is now; the recorded value itself where nothing is there (a model
        id, a name; or missing: `require` says so)."""
        if not isinstance(value, str) or not value or is_remote(value):
            return value
        for candidate in self.candidates(value):
            if candidate.exists():
                return str(candidate)
        return value

    def require(self, value: str, what: str, fix: str) -> str:
        """`find`, or an InputError naming the recorded path, its fingerprint, where it was looked for and
        `fix` (how to point to its new place)."""
        found = self.find(value)
        if is_remote(found) or Path(found).exists():
            return found
        looked = " nor ".join(str(c) for c in self.candidates(value))
        content = self.fingerprints.get(value)
        known = f" (content fingerprint {content})" if content else ""
        raise InputError(
            f"{self.run}: {what} was recorded as {value}{known}, which is not there now (not at {looked}). "
            f"Move it back, or {fix}."
        )

    def config(self, config: dict) -> dict:
        out = dict(config)
        for key in path_keys():
            value = out.get(key)
            out[key] = [self.find(v) for v in value] if isinstance(value, list) else self.find(value)
        return out


def input_paths(run: Path, state: dict) -> InputPaths:
    from latentmill.curate.lineage import record_path

    fingerprints = {}
    lineage = record_path(run)
    if lineage.exists():
        import json

        try:
            record = json.loads(lineage.read_text())
        except ValueError:
            record = {}
        for part in ("inputs", "models"):
            for key, content in (record.get(part) or {}).items():
                label = (record.get("labels") or {}).get(f"{part}.{key}")
                if label:
                    fingerprints[str(absolute(label))] = content
    return InputPaths(run if is_remote(str(run)) else Path(run), state.get("written_at"), fingerprints)
