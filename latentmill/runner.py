"""`latentmill run`: a recipe's stages in order (the stage table, latentmill.stages), into one work folder
(latentmill.layout), each skipping finished work; and `latentmill status`, read from the same table.

A stage starts only when the paths it reads exist (those an earlier stage of this recipe writes), so
`run --until` then a later `run` continue where the first stopped, and a stage is never fed half a
pipeline. A killed run, run again, continues where it stopped.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from latentmill.errors import InputError
from latentmill.layout import Layout
from latentmill.stages import STAGE_NAMES, STAGES, Context, Stage, producer, section


def run_recipe(
    recipe: dict,
    work: str | Path,
    urls: str | None = None,
    until: str | None = None,
    executor=None,
    log=print,
    start: str | None = None,
) -> dict:
    """Run the recipe's stages from `start` up to `until` (both inclusive; default: all of them); return
    what each stage reported."""
    for option, name in (("--until", until), ("start", start)):
        if name and name not in STAGE_NAMES:
            raise InputError(f"{option} {name!r}: use one of {', '.join(STAGE_NAMES)}.")
    first = STAGE_NAMES.index(start) if start else 0
    last = STAGE_NAMES.index(until) if until else len(STAGES) - 1
    layout = Layout(work)
    layout.urls.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    with ExitStack() as stack:
        ctx = Context(recipe, layout, executor or section(recipe, "executor"), urls, log, stack)
        for stage in STAGES[first : last + 1]:
            if not stage.applies(recipe):
                continue
            check_inputs(stage, recipe, layout)
            report[stage.name] = stage.run(ctx)
            log(_indent(f"[{stage.name}] ", stage.summary(report[stage.name])))
    return report


def check_inputs(stage: Stage, recipe: dict, layout: Layout) -> None:
    """Refuse to start `stage` while a path it reads, written by an earlier stage of this recipe, is missing."""
    missing = []
    for name in stage.inputs:
        made_by = producer(name)
        if made_by is None or made_by is stage or not made_by.applies(recipe) or layout.present(name):
            continue
        missing.append(f"{layout.describe(name)} (written by the {made_by.name} stage)")
    if missing:
        raise InputError(
            f"the {stage.name} stage reads {'; '.join(missing)}, not there yet: run those stages first "
            f"(`latentmill run RECIPE -w {layout.work}` runs every stage in order)."
        )


def _indent(prefix: str, text: str) -> str:
    lines = text.splitlines() or [""]
    return "\n".join([prefix + lines[0]] + [" " * len(prefix) + line for line in lines[1:]])


def status(work: str | Path) -> list[dict]:
    """Every stage's progress in WORK, from the stage table: shards done of total, samples kept, and which
    of its outputs are there."""
    layout = Layout(work)
    rows = []
    for stage in STAGES:
        done, detail = stage.status(layout, stage)
        present = [name for name in stage.outputs if layout.present(name)]
        rows.append({"stage": stage.name, "done": done, "detail": detail, "outputs": present})
    return rows
