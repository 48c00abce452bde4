"""Recipes: YAML shipped as package data, validated against a closed schema (the sections and config
dataclasses of the stage table, latentmill.stages: a section's keys are its stage's flags), with
`section.key=value` overrides. Every section is
checked, names, types, ranges and choices, before the first stage runs; an unknown key is an error naming
the nearest."""

from __future__ import annotations

import dataclasses
import difflib
from importlib import resources
from pathlib import Path

import yaml

from latentmill.boundedyaml import load_yaml
from latentmill.curate.storageoptions import check_options
from latentmill.errors import InputError, warn
from latentmill.schema import from_section, spec_of
from latentmill.stages import LISTS, PLACEHOLDERS, SECTIONS

SCALARS = {"description"}
MAPPINGS = {"storage_options"}  # passed as they are (to fsspec)
RENAMED_SECTIONS = {"fit_heads": "fit_head"}  # old section name -> new, accepted with a warning
RUN_MANAGED = {
    "train": {"shards", "output", "init_from", "resume"},  # set by the runner, not by recipes
    "download": {"resolver"},
}


def list_recipes() -> dict[str, str]:
    """Shipped recipe name -> its one-line description."""
    out = {}
    for entry in sorted(resources.files("latentmill.recipes").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            out[entry.name[:-5]] = yaml.safe_load(entry.read_text()).get("description", "")
    return out


def _nearest(word: str, choices) -> str:
    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{near[0]}'?" if near else ""


def recipe_text(name_or_path: str) -> str:
    """The YAML text of a shipped recipe (by name) or of a recipe file."""
    return _read(name_or_path)[0]


def _read(name_or_path: str) -> tuple[str, str]:
    """(text, source) of a recipe: a YAML file, or a shipped name."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path.read_text(), str(path)
    shipped = resources.files("latentmill.recipes") / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise InputError(
            f"recipe {name_or_path!r}: not a YAML file nor a shipped recipe.{_nearest(name_or_path, list_recipes())} "
            f"Shipped: {', '.join(list_recipes())}."
        )
    return shipped.read_text(), name_or_path


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> dict:
    """A validated recipe dict: a shipped name (`demo`) or a YAML file, then `section.key=value` overrides."""
    text, source = _read(name_or_path)
    try:
        recipe = load_yaml(text, source) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{source}: not valid YAML ({err}).") from None
    if not isinstance(recipe, dict):
        raise InputError(
            f"{source}: a recipe is a mapping of sections (urls:, download:, train: ...), not a "
            f"{type(recipe).__name__}. See recipes/demo.yaml."
        )
    for override in overrides:
        key, sep, value = override.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot:
            raise InputError(f"--set {override!r}: write section.key=value, e.g. --set train.steps=500.")
        recipe.setdefault(section, {})
        if not isinstance(recipe[section], dict):
            raise InputError(f"--set {override!r}: {section} is not a section of keys.")
        try:
            recipe[section][field] = load_yaml(value, f"--set {key}")
        except yaml.YAMLError as err:
            raise InputError(
                f"--set {override!r}: the value is not plain YAML ({str(err).splitlines()[0]}); write a "
                f"number, a word, or a [list]."
            ) from None
    validate(recipe, source)
    return recipe


def validate(recipe: dict, source: str) -> None:
    """Every section and list item checked as its stage config checks it: names, types, ranges, choices.
    Renamed keys are accepted (in place) with a warning."""
    known = set(SECTIONS) | SCALARS | MAPPINGS | set(LISTS)
    for old, new in RENAMED_SECTIONS.items():
        if old in recipe and new not in recipe:
            warn(f"{source}: the section {old} is now {new}; the old name goes in the next release.")
            recipe[new] = recipe.pop(old)
    for name, body in recipe.items():
        if name not in known:
            raise InputError(
                f"{source}: unknown section {name!r}.{_nearest(name, known)} Sections: {', '.join(sorted(known))}."
            )
        if name in SCALARS:
            continue
        if name in MAPPINGS:
            if not isinstance(body or {}, dict) or not all(isinstance(k, str) for k in body or {}):
                raise InputError(
                    f"{source}: {name} is a mapping of fsspec options (endpoint_url: http://10.0.0.5:9000), "
                    f"not a {type(body).__name__}."
                )
            check_options(body or {}, source)
            continue
        if name in LISTS:
            if not isinstance(body or [], list):
                raise InputError(
                    f"{source}: {name} is a list (- key: value ...), not a {type(body).__name__}."
                )
            for i, item in enumerate(body or []):
                _check_mapping(LISTS[name], item, source, f"{name}[{i}]")
            continue
        _check_mapping(SECTIONS[name](), body, source, name)
    if "dedup" in recipe and not (recipe.get("score") or {}).get("save_embeddings"):
        raise InputError(
            f"{source}: dedup compares the saved CLIP embeddings; set score.save_embeddings: true."
        )
    if recipe.get("fit_head") and not (recipe.get("score") or {}).get("save_embeddings"):
        raise InputError(
            f"{source}: fit_head fits heads on the saved CLIP embeddings; set score.save_embeddings: true."
        )


def load_section_file(path: str | Path, name: str, given: dict | None = None) -> dict:
    """A YAML file of one section's keys (`train --config FILE`: the keys of a recipe's `train:`),
    checked as the recipe's section is: unknown keys named with the nearest, values validated, with the
    options `given` on the command line over the file's (they override it, so a rule such as "give --model"
    counts them)."""
    try:
        body = load_yaml(Path(path).read_text(), str(path)) or {}
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror}).") from None
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({err}).") from None
    if isinstance(body, dict) and set(body) == {name}:  # a recipe-shaped file: {train: {...}}
        body = body[name] or {}
    _check_mapping(SECTIONS[name](), body, str(path), name, given)
    return body


def _check_mapping(schema, body, source: str, where: str, given: dict | None = None) -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    allowed = set(fields) - RUN_MANAGED.get(where, set())
    if not isinstance(body or {}, dict):
        label = where if "[" in where else f"section {where}"
        raise InputError(
            f"{source}: {label} is a mapping of keys (key: value), not a {type(body).__name__}. "
            f"Its keys: {', '.join(sorted(allowed))}."
        )
    renamed = {spec_of(f).old_key: f.name for f in fields.values() if spec_of(f) and spec_of(f).old_key}
    for key in list(body or {}):
        if key in renamed and renamed[key] not in body:
            warn(
                f"{source}: {where}.{key} is now {where}.{renamed[key]}; the old key goes in the next release."
            )
            body[renamed[key]] = body.pop(key)
    for key in body or {}:
        if key not in allowed:
            raise InputError(
                f"{source}: unknown key {where}.{key}.{_nearest(key, allowed)} "
                f"Valid keys of {where}: {', '.join(sorted(allowed))}."
            )
    try:
        placeholders = {k: v for k, v in PLACEHOLDERS.get(where, {}).items() if k not in (given or {})}
        from_section(schema, (body or {}) | (given or {}), **placeholders)
    except InputError as err:
        raise InputError(f"{source}: {str(err).replace(f'{schema.SECTION}.', f'{where}.', 1)}") from None
    except TypeError as err:  # a required key missing
        raise InputError(f"{source}: {where}: {err} (keys: {', '.join(sorted(allowed))}).") from None
