"""Option groups shared by several commands."""

from __future__ import annotations

import click

from latentmill.curate.tables import DEFAULT_COLUMNS

POSITIVE = click.IntRange(min=1)  # counts that must be at least one: steps, sizes


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
