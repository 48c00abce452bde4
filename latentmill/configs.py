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
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import MISSING
from typing import ClassVar

import click

from latentmill.curate.errors import InputError


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
    path: bool = False  # a file or folder: shown as PATH
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


class Separated(click.ParamType):
    """A list in one value, comma-separated (`0.8,0.2`), each item converted by `item`."""

    name = "list"

    def __init__(self, item: click.ParamType):
        self.item = item

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        return [self.item.convert(part.strip(), param, ctx) for part in str(value).split(",") if part.strip()]


class Finite(click.FloatRange):
    """A float range that also refuses nan and inf (click's FloatRange lets nan through)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)

    def _describe_range(self) -> str:
        return "" if self.min is None and self.max is None else super()._describe_range()


def click_type(cls, field: dataclasses.Field):
    spec, (kind, _, element) = spec_of(field), kind_of(cls, field)
    if spec.choices is not None:
        return click.Choice([str(c) for c in spec.choices])
    kind = element.__name__ if kind == "list" else kind
    if kind == "int" and spec.low is None and spec.high is None:
        return click.INT
    if kind == "int":
        low = None if spec.low is None else int(spec.low) + (1 if spec.low_open else 0)
        return click.IntRange(min=low, max=None if spec.high is None else int(spec.high))
    if kind == "float":
        return Finite(spec.low, spec.high, min_open=spec.low_open)
    return click.Path() if spec.path else click.STRING


def click_options(cls, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()):
    """A decorator adding one click option per declared field of `cls` (with `only`/`skip` by key)."""

    def decorate(func):
        for field in reversed(cls.option_fields()):
            spec = spec_of(field)
            if not spec.cli or field.name in skip or (only is not None and field.name not in only):
                continue
            kind = kind_of(cls, field)[0]
            flag = flag_of(field)
            decls = [d for d in (spec.short, flag) if d]
            default = None if field.default is MISSING else field.default
            required = field.default is MISSING and field.default_factory is MISSING
            kw = {"help": spec.help, "metavar": spec.metavar, "required": required}
            if kind == "bool":
                if default:
                    decls = [f"{flag}/--no-{flag[2:]}"]
                kw |= {"is_flag": True, "default": bool(default)}
            elif kind == "list" and spec.separated:
                kw |= {"type": Separated(click_type(cls, field)), "default": None}
            elif kind == "list":
                kw |= {"multiple": True, "type": click_type(cls, field)}
            else:
                kw |= {
                    "type": click_type(cls, field),
                    "default": default,
                    "show_default": default is not None,
                }
            for i, old in enumerate(spec.old):
                func = click.option(old, f"{field.name}__old{i}", hidden=True, type=kw.get("type"))(func)
            func = click.option(*decls, field.name, **kw)(func)
        return func

    return decorate


def config_from(cls, kwargs: dict, **extra):
    """Pop `cls`'s options out of a command's kwargs into a validated config (`extra`: fields set by the command)."""
    values = {}
    for field in cls.option_fields():
        for i, old in enumerate(spec_of(field).old):
            given = kwargs.pop(f"{field.name}__old{i}", None)
            if given is not None:
                click.echo(
                    f"Warning: {old} is now {flag_of(field)}; the old spelling goes in the next release.",
                    err=True,
                )
                kwargs[field.name] = given
        if field.name in kwargs:
            value = kwargs.pop(field.name)
            if isinstance(value, tuple):  # a repeatable option: none given keeps the config's default
                if not value:
                    continue
                value = list(value)
            values[field.name] = value
    return cls(**(values | extra)).validate()


def given_on_command_line(cls, ctx: click.Context) -> list[str]:
    """The keys of `cls` whose option was typed on the command line, in either spelling."""
    typed = click.core.ParameterSource.COMMANDLINE
    return [
        field.name
        for field in cls.option_fields()
        if any(
            ctx.get_parameter_source(name) == typed
            for name in (field.name, *(f"{field.name}__old{i}" for i in range(len(spec_of(field).old))))
        )
    ]


def from_section(cls, body: dict, **extra):
    """A validated config from a recipe section's mapping (unknown keys are refused by the recipe)."""
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in (body or {}).items()}
    return cls(**(values | extra)).validate()


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str) -> str:
    """ "auto" -> cuda when a GPU is visible, else cpu; any other name as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device_precision(device: str, precision: str) -> tuple[str, str]:
    """The device and the precision "auto" stands for: bf16 on CUDA, fp32 elsewhere."""
    device = resolve_device(device)
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") else "fp32"
    return device, precision


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
