"""Recipes: YAML shipped as package data, validated against a closed schema (the stages' own config
dataclasses), with `section.key=value` overrides. An unknown section or key is an error naming the nearest."""

from __future__ import annotations

import dataclasses
import difflib
import math
from importlib import resources
from pathlib import Path

import yaml

from latentmill.curate.download import DownloadConfig
from latentmill.curate.encode import EncodeConfig
from latentmill.curate.errors import InputError
from latentmill.curate.executors import ExecutorConfig
from latentmill.curate.prefilter import PrefilterConfig


@dataclasses.dataclass
class UrlsSection:
    source: str = "file"  # file (the table given with --urls or `path`) or sample-server (the demo's)
    path: str | None = None
    photo_views: int = 1  # sample-server: crops per bundled photograph (12 photographs)
    synthetic: int = 24  # sample-server: synthetic pictures


@dataclasses.dataclass
class SelectSection:
    preset: str | None = None
    where: list = dataclasses.field(default_factory=list)
    min_aesthetic: float | None = None
    max_pwatermark: float | None = None
    max_punsafe: float | None = None
    min_similarity: float | None = None
    min_side: int | None = None
    min_area: int | None = None
    max_aspect: float | None = None


@dataclasses.dataclass
class FitHead:
    target: str  # a numeric column carried in the image shards' JSON (from the URL table)
    column: str  # the score column the fitted head writes
    kind: str = "linear"
    epochs: int = 300
    alpha: float | None = None  # ridge penalty of a linear regressor (None: cross-validated)


@dataclasses.dataclass
class TrainStage:
    name: str
    resolution: int
    steps: int | None = None


def _score_config():
    from latentmill.filters.score import ScoreConfig

    return ScoreConfig


def _train_config():
    from latentmill.train.config import TrainConfig

    return TrainConfig


SECTIONS = {
    "urls": lambda: UrlsSection, "prefilter": lambda: PrefilterConfig, "download": lambda: DownloadConfig,
    "score": _score_config, "select": lambda: SelectSection, "encode": lambda: EncodeConfig,
    "train": _train_config, "executor": lambda: ExecutorConfig,
}
SCALARS = {"description"}
LISTS = {"stages": TrainStage, "fit_heads": FitHead}
RUN_MANAGED = {"train": {"shards", "output", "init_from", "resume"},  # set by the runner, not by recipes
               "download": {"resolver"}}


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


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> dict:
    """A validated recipe dict: a shipped name (`demo`) or a YAML file, then `section.key=value` overrides."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        text, source = path.read_text(), str(path)
    else:
        shipped = resources.files("latentmill.recipes") / f"{name_or_path}.yaml"
        if not shipped.is_file():
            raise InputError(f"recipe {name_or_path!r}: not a YAML file nor a shipped recipe.{_nearest(name_or_path, list_recipes())} "
                             f"Shipped: {', '.join(list_recipes())}.")
        text, source = shipped.read_text(), name_or_path
    try:
        recipe = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{source}: not valid YAML ({err}).") from None
    if not isinstance(recipe, dict):
        raise InputError(f"{source}: a recipe is a mapping of sections (urls:, download:, train: ...), not a "
                         f"{type(recipe).__name__}. See recipes/demo.yaml.")
    for override in overrides:
        key, sep, value = override.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot:
            raise InputError(f"--set {override!r}: write section.key=value, e.g. --set train.steps=500.")
        recipe.setdefault(section, {})
        if not isinstance(recipe[section], dict):
            raise InputError(f"--set {override!r}: {section} is not a section of keys.")
        recipe[section][field] = yaml.safe_load(value)
    validate(recipe, source)
    return recipe


def validate(recipe: dict, source: str) -> None:
    known = set(SECTIONS) | SCALARS | set(LISTS)
    for section, body in recipe.items():
        if section not in known:
            raise InputError(f"{source}: unknown section {section!r}.{_nearest(section, known)} Sections: {', '.join(sorted(known))}.")
        if section in SCALARS:
            continue
        if section in LISTS:
            fields = {f.name for f in dataclasses.fields(LISTS[section])}
            if not isinstance(body or [], list):
                raise InputError(f"{source}: {section} is a list of stages (- name: ...), not a {type(body).__name__}.")
            for i, item in enumerate(body or []):
                if not isinstance(item, dict):
                    raise InputError(f"{source}: {section}[{i}] is a mapping of keys ({', '.join(sorted(fields))}), "
                                     f"not a {type(item).__name__}.")
                for key in item:
                    if key not in fields:
                        raise InputError(f"{source}: unknown key {section}[{i}].{key}.{_nearest(key, fields)}")
            continue
        schema = SECTIONS[section]()
        if not isinstance(body or {}, dict):
            raise InputError(f"{source}: section {section} is a mapping of keys (key: value), not a {type(body).__name__}.")
        fields = {f.name: f for f in dataclasses.fields(schema)}
        allowed = set(fields) - RUN_MANAGED.get(section, set())
        for key, value in (body or {}).items():
            if key not in allowed:
                raise InputError(f"{source}: unknown key {section}.{key}.{_nearest(key, allowed)} "
                                 f"Valid keys of {section}: {', '.join(sorted(allowed))}.")
            default = fields[key].default
            if isinstance(default, bool) and not isinstance(value, bool):
                raise InputError(f"{source}: {section}.{key} must be true or false, got {value!r}.")
            if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                    isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise InputError(f"{source}: {section}.{key} must be a finite number, got {value!r}.")
        if section == "train":  # ranges too, before any stage runs
            try:
                schema(**{"shards": "-", "output": "-", **(body or {})}).check()
            except InputError as err:
                raise InputError(f"{source}: {err}") from None


def section(recipe: dict, name: str, **extra):
    """The dataclass config of one section (defaults where the recipe is silent)."""
    values = dict(recipe.get(name) or {}) | extra
    if name == "score" and "fitted_heads" in values:
        values["fitted_heads"] = list(values["fitted_heads"])
    return SECTIONS[name]()(**values)
