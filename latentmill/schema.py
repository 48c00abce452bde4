"""Each option declared once: a stage config's dataclass field carries its help, range and choices, and the
command-line options, the recipe keys and the checks are all made from it.

    @dataclass
    class EncodeConfig(StageConfig):
        SECTION = "encode"
        resolution: int = opt(512, "Bucket area is at most RESOLUTION² px.", low=1)

gives `latentmill encode --resolution N`, the recipe key `encode.resolution`, and a `validate()` that
refuses `resolution: 0` with a message naming both spellings. The flag is the key with dashes (`min_side`
-> `--min-side`); a repeatable option takes the singular (`--head` for `heads`). Old spellings listed in
`old` keep working for one release, with a warning.

This module is the schema only; it does not import click. The command line makes its options from it in
latentmill/cli/options.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import MISSING
from typing import ClassVar

from latentmill.errors import InputError


@dataclasses.dataclass(frozen=True)
class Spec:
    help: str = ""
    low: float | None = None  # smallest allowed value
    high: float | None = None  # largest allowed value
    low_open: bool = False  # the value must be strictly above `low`
    choices: tuple | None = None
    flag: str | None = None  # only where the flag is not --KEY
    short: str | None = None  # e.g. "-o"
    old: tuple[str, ...] = ()  # deprecated flag spellings, still accepted with a warning
    old_key: str | None = None  # the recipe key's deprecated spelling
    cli: bool = True  # False: a recipe key without a flag (set by the runner, or a tuning knob)
    metavar: str | None = None
    path: bool = False  # a file or folder: shown as PATH, and recorded in lineage by its content
    # a model: a name or id, or a local file or folder (recorded by content where it is one); no other
    # setting is ever read as a path, whatever the current directory holds (curate/lineage.py)
    model: bool = False
    # the release that added the option: at its default, it stays out of lineage records, so outputs made
    # before it existed still count as made with the same settings (no redo after an upgrade)
    since: str | None = None
    separated: bool = False  # a list given as one comma-separated value (`--mix 0.8,0.2`), not repeated


def opt(default=MISSING, help: str = "", *, factory=MISSING, **spec):
    """A config field with its option spec (see Spec)."""
    metadata = {"spec": Spec(help=help, **spec)}
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def spec_of(field: dataclasses.Field) -> Spec | None:
    return field.metadata.get("spec")


def flag_of(field: dataclasses.Field) -> str:
    spec = spec_of(field)
    return (spec and spec.flag) or "--" + field.name.replace("_", "-")


def kind_of(cls, field: dataclasses.Field) -> tuple[str, bool, type | None]:
    """("bool"|"int"|"float"|"str"|"list"|"dict", optional, element type of a list)."""
    hint = typing.get_type_hints(cls)[field.name]
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = len(args) < len(typing.get_args(hint)), args[0]
    origin = typing.get_origin(hint) or hint
    if origin in (list, tuple):
        return "list", optional, (typing.get_args(hint) or (str,))[0]
    return {bool: "bool", int: "int", float: "float", str: "str", dict: "dict"}[origin], optional, None


class StageConfig:
    """Mixin of the stage configs: `validate()` checks every declared field, then `check_more()`."""

    SECTION: ClassVar[str] = ""
    # fields that do not change the stage's output (workers, devices, cadence, where the output goes): left
    # out of its lineage record (latentmill.curate.lineage), so changing them never redoes finished work
    RUNTIME: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if spec_of(f) is not None]

    @classmethod
    def name(cls, key: str) -> str:
        """How messages name a key: as the recipe and the command line spell it."""
        field = next((f for f in dataclasses.fields(cls) if f.name == key), None)
        flag = f" ({flag_of(field)})" if field is not None and spec_of(field) and spec_of(field).cli else ""
        return f"{cls.SECTION}.{key}{flag}"

    def validate(self):
        for field in self.option_fields():
            check_value(type(self), field, getattr(self, field.name))
        self.check_more()
        return self

    def check_more(self) -> None:
        """Rules between fields; a config with such rules overrides this."""


def check_value(cls, field: dataclasses.Field, value) -> None:
    spec, (kind, optional, element) = spec_of(field), kind_of(cls, field)
    name = cls.name(field.name)
    if value is None:
        if optional:
            return
        raise InputError(f"{name} must be set; {spec.help}")
    if kind == "bool" and not isinstance(value, bool):
        raise InputError(f"{name} = {value!r}: use true or false.")
    if kind in ("int", "float") and (
        isinstance(value, bool) or not isinstance(value, int if kind == "int" else (int, float))
    ):
        raise InputError(f"{name} = {value!r}: use a {'whole number' if kind == 'int' else 'number'}.")
    if kind == "float" and not math.isfinite(value):
        raise InputError(f"{name} = {value!r}: use a finite number.")
    if kind == "str" and not isinstance(value, str):
        raise InputError(f"{name} = {value!r}: use text.")
    if kind == "list" and (
        not isinstance(value, (list, tuple))
        or not all(isinstance(v, element) or (element is float and type(v) is int) for v in value)
    ):
        raise InputError(f"{name} = {value!r}: use a list of {element.__name__} values.")
    if kind == "dict" and not isinstance(value, dict):
        raise InputError(f"{name} = {value!r}: use a mapping (key: value).")
    if spec.choices is not None and value not in spec.choices:
        near = difflib.get_close_matches(str(value), [str(c) for c in spec.choices], n=1, cutoff=0.5)
        raise InputError(
            f"{name} = {value!r}: use one of {', '.join(map(str, spec.choices))}."
            + (f" Did you mean {near[0]!r}?" if near else "")
        )
    if kind in ("int", "float"):
        low_ok = spec.low is None or (value > spec.low if spec.low_open else value >= spec.low)
        if not low_ok or (spec.high is not None and value > spec.high):
            raise InputError(f"{name} = {value!r}: use a number {_bounds(spec)}.")


def _bounds(spec: Spec) -> str:
    low = f"{'>' if spec.low_open else '>='} {spec.low:g}" if spec.low is not None else ""
    if spec.high is None:
        return low
    return f"between {spec.low:g} and {spec.high:g}" if spec.low is not None else f"<= {spec.high:g}"


def from_section(cls, body: dict, **extra):
    """A validated config from a recipe section's mapping (unknown keys are refused by the recipe)."""
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in (body or {}).items()}
    return cls(**(values | extra)).validate()


def check_saved(cls, values: dict, path, fix: str) -> dict:
    """A config that latentmill saved (a run's started.json, a checkpoint's state.json): each declared
    setting in it of its declared type and bounds, else an InputError naming the file and `fix`."""
    fields = {f.name: f for f in cls.option_fields()}
    for key, value in values.items():
        if key in fields and value is not None:
            try:
                check_value(cls, fields[key], value)
            except InputError as err:
                raise InputError(
                    f"{path}: a saved setting is not what latentmill writes ({err}) Fix: {fix}."
                ) from None
    return values
