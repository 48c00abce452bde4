"""`latentmill run`: a recipe's stages in order (the stage table, latentmill.stages), into one work folder
(latentmill.layout), as the make-like plan says (latentmill.plan): finished stages whose settings and
inputs are unchanged are kept, changed ones and those after them redone; and `latentmill status`, read
from the same table, with stale stages marked.

A stage starts only when the paths it reads exist (those an earlier stage of this recipe writes), so
`run --until` then a later `run` continue where the first stopped, and a stage is never fed half a
pipeline. A killed run, run again, continues where it stopped.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from latentmill.curate.storage import make_folder
from latentmill.curate.storage import options as storage_options
from latentmill.curate.storage import set_options as set_storage_options
from latentmill.errors import InputError
from latentmill.layout import Layout
from latentmill.plan import KEEP, REDO, clear, completion, finish, plan, stale
from latentmill.preflight import preflight
from latentmill.sources import from_folder
from latentmill.stages import STAGE_NAMES, STAGES, Context, Stage, producer, section


def run_recipe(
    recipe: dict,
    work: str | Path,
    urls: str | None = None,
    until: str | None = None,
    executor=None,
    log=print,
    start: str | None = None,
    dry_run: bool = False,
) -> dict:
    """Run the recipe's stages from `start` up to `until` (both inclusive; default: all of them) as the
    plan says (latentmill.plan: keep what is up to date, redo what changed); return what each stage
    reported (a kept stage: what it reported when it finished). `dry_run`: print the plan, run nothing."""
    for option, name in (("--until", until), ("start", start)):
        if name and name not in STAGE_NAMES:
            raise InputError(f"{option} {name!r}: use one of {', '.join(STAGE_NAMES)}.")
    first = STAGE_NAMES.index(start) if start else 0
    last = STAGE_NAMES.index(until) if until else len(STAGES) - 1
    # the recipe's storage_options, under those given with --storage-option
    set_storage_options((recipe.get("storage_options") or {}) | storage_options())
    layout = Layout(work)
    chosen = STAGES[first : last + 1]
    if chosen and not any(stage.applies(recipe) for stage in chosen):
        raise InputError(
            f"--until {until or STAGE_NAMES[-1]}: "
            + (
                f"the {chosen[0].name} stage does not run"
                if len(chosen) == 1
                else f"none of the stages {', '.join(s.name for s in chosen)} runs"
            )  # fmt: skip
            + " for this recipe"
            f"{' (its pictures come from a folder, which the download stage packs)' if from_folder(recipe) else ''}"
            f", so nothing would be done. Run until a later stage."
        )
    preflight(recipe, list(chosen), urls)  # every missing file or model, at once
    steps = plan(recipe, layout, list(STAGES[first : last + 1]), urls)
    for step in steps:
        log(step.describe())
    if dry_run:
        return {"plan": [{"stage": s.stage.name, "action": s.action, "reasons": s.reasons} for s in steps]}
    make_folder(layout.urls)
    report: dict = {}
    with ExitStack() as stack:
        ctx = Context(recipe, layout, executor or section(recipe, "executor"), urls, log, stack)
        for step in steps:
            stage = step.stage
            if step.action == KEEP:
                report[stage.name] = (completion(layout, stage) or {}).get("report") or {}
                continue
            if step.action == REDO:
                for moved, aside in clear(step, layout):
                    log(
                        f"[{stage.name}] moved the replaced run {moved} to {aside} (delete it when it is not needed)"
                    )
            check_inputs(stage, recipe, layout)
            report[stage.name] = stage.run(ctx)
            log(_indent(f"[{stage.name}] ", stage.summary(report[stage.name])))
            finish(step, recipe, layout, urls, report[stage.name])
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
    old = stale(layout)
    rows = []
    for stage in STAGES:
        try:
            completion(layout, stage)  # a damaged record: its row says so, the others still show
            done, detail = stage.status(layout, stage)
        except InputError as err:
            done, detail = "damaged", str(err)
        present = [name for name in stage.outputs if layout.present(name)]
        if stage.name in old:
            detail = f"{old[stage.name]}; {detail}" if detail else old[stage.name]
        rows.append(
            {
                "stage": stage.name,
                "done": done,
                "detail": detail,
                "outputs": present,
                "stale": stage.name in old,
            }
        )
    return rows
