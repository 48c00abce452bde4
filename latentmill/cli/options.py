"""Click options made from the config schema (latentmill.schema), and option groups shared by commands."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING

import click

from latentmill.curate.tables import DEFAULT_COLUMNS
from latentmill.errors import warn
from latentmill.schema import flag_of, kind_of, spec_of

POSITIVE = click.IntRange(min=1)  # counts that must be at least one: steps, sizes


class Location(click.Path):
    """A local path (checked as click.Path checks it) or a storage URL (s3://bucket/prefix, gs://…),
    passed on as text; with exists=True a URL must name an object or a prefix holding some."""

    name = "location"

    def convert(self, value, param, ctx):
        from latentmill.curate.storage import is_remote, location

        text = str(value)
        if not is_remote(text):
            return super().convert(value, param, ctx)
        try:
            where = location(text)
            if self.exists and not where.exists():
                self.fail(
                    f"{text}: nothing there (no such object or prefix, or the bucket is missing).", param, ctx
                )
        except click.BadParameter:
            raise
        except Exception as err:  # the store itself refused: say why, as exit 2
            from latentmill.curate.storage import explain

            self.fail(explain(err) or f"{text}: {err}", param, ctx)
        return text


def column_options(func):
    """--url-col, --caption-col, --width-col, ...: name a table's columns when they are not LAION's."""
    for role in reversed(list(DEFAULT_COLUMNS)):
        defaults = " or ".join(DEFAULT_COLUMNS[role])
        func = click.option(
            f"--{role}-col",
            f"{role}_col",
            default=None,
            metavar="NAME",
            help=f"Column holding the {role} (default: {defaults}).",
        )(func)
    return func


def columns_from(kwargs: dict) -> dict[str, str | None]:
    """Pop the --*-col options out of a command's kwargs into a role -> column mapping."""
    return {role: kwargs.pop(f"{role}_col", None) for role in DEFAULT_COLUMNS}


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
    return Location() if spec.path else click.STRING


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
                warn(f"{old} is now {flag_of(field)}; the old spelling goes in the next release.")
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


def overwrite_option(func):
    """--overwrite: redo an output folder that was made with other settings or inputs (else refused)."""
    return click.option(
        "--overwrite",
        is_flag=True,
        help="The output was made with other settings or inputs: redo it with these (else refused).",
    )(func)
