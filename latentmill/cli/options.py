"""Option groups shared by several commands."""

from __future__ import annotations

import math

import click

from latentmill.curate.tables import DEFAULT_COLUMNS

POSITIVE = click.IntRange(min=1)  # counts that must be at least one: steps, batch sizes, sizes
COUNT = click.IntRange(min=0)  # counts where 0 means none or off


class Finite(click.FloatRange):
    """A float range that also refuses nan and inf (click's FloatRange lets nan through: nan < x is False)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


PROBABILITY = Finite(0.0, 1.0)
NONNEGATIVE = Finite(min=0.0)
POSITIVE_FLOAT = Finite(min=0.0, min_open=True)


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


def progress_bar(total: int | None, desc: str, unit: str = "rows"):
    """A tqdm bar on stderr with a rate; `update(n)` advances it."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, leave=False)


def executor_options(func):
    """--executor local|ray, --address, --actors, --shard-retries: where the shard stages run."""
    func = click.option(
        "--threads",
        type=POSITIVE,
        help="torch CPU threads per worker; the same number gives byte-identical "
        "outputs across executors and machines.",
    )(func)
    func = click.option(
        "--shard-retries", default=2, show_default=True, type=COUNT, help="Ray: retries of a failed shard."
    )(func)
    func = click.option("--actors", type=POSITIVE, help="Ray: actors (default: one per GPU, or 2 on CPUs).")(
        func
    )
    func = click.option(
        "--address", help="Ray: the cluster ('auto', ray://HOST:10001); default: Ray on 127.0.0.1."
    )(func)
    func = click.option(
        "--executor",
        type=click.Choice(["local", "ray"]),
        default="local",
        show_default=True,
        help="Run shards here, or on a Ray cluster (an actor per GPU holding the model).",
    )(func)
    return func


def executor_from(kwargs: dict):
    from latentmill.curate.executors import ExecutorConfig

    return ExecutorConfig(
        kind=kwargs.pop("executor"),
        address=kwargs.pop("address"),
        actors=kwargs.pop("actors"),
        retries=kwargs.pop("shard_retries"),
    )
