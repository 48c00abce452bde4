"""`latentmill run` works like make: before any stage runs, each stage's lineage record (the settings of
its recipe sections that change its output, and the fingerprints of what the stages before it made) is
compared with the record kept when it last finished (WORK/lineage/STAGE.json). A stage whose record
matches is kept; one whose settings or inputs changed is redone from clean outputs, and so is every stage
after it that reads what it makes. `run --dry-run` prints this plan; `run` prints it, then follows it.

No path enters a record (files named by a setting are taken by content), so a moved or copied work folder
re-runs as a no-op.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from latentmill.curate.lineage import content_fingerprint, differences, fingerprint, settings_of
from latentmill.curate.records import read_optional
from latentmill.curate.storage import location, move, remove, write_json
from latentmill.errors import InputError
from latentmill.layout import Layout
from latentmill.schema import from_section
from latentmill.stages import PLACEHOLDERS, STAGES, Stage, producer

KEEP, RUN, REDO, CONTINUE = "keep", "run", "redo", "continue"


@dataclass
class Step:
    stage: Stage
    action: str  # keep, run (never finished), redo (changed: cleared first), continue (train: more steps)
    reasons: list[str] = field(default_factory=list)
    record: dict = field(default_factory=dict)

    def describe(self) -> str:
        why = "; ".join(self.reasons)
        return f"[{self.stage.name}] {self.action}" + (f": {why}" if why else "")


def stage_record(stage: Stage, recipe: dict, layout: Layout, urls: str | None, made: dict) -> dict:
    """The lineage record the stage would have now: its sections' settings, and its inputs' fingerprints
    (`made`: stage name -> the output fingerprint of what it made, None where it is about to change)."""
    settings: dict = {}
    for name, load in sorted(stage.sections.items()):
        config = from_section(load(), recipe.get(name) or {}, **PLACEHOLDERS.get(name, {}))
        settings[name] = settings_of(config)
    for name, cls in sorted(stage.lists.items()):
        settings[name] = [settings_of(from_section(cls, item)) for item in recipe.get(name) or []]
    inputs = {}
    for name in stage.inputs:
        made_by = producer(name)
        if made_by is None:
            inputs[name] = _external(name, recipe, layout, urls)
        elif made_by is not stage and made_by.applies(recipe):
            inputs[name] = made.get(made_by.name)
    body = {"stage": stage.name, "settings": settings, "models": {}, "inputs": inputs}
    return body | {"fingerprint": fingerprint(body)}


def _external(name: str, recipe: dict, layout: Layout, urls: str | None) -> str | None:
    """The user's own input (the URL table or image folder), by content."""
    if name != "urls":
        return None
    source = (recipe.get("urls") or {}).get("source", "file")
    path = (
        layout.sample_table if source == "sample-server" else urls or (recipe.get("urls") or {}).get("path")
    )
    return content_fingerprint(path) if path and location(path).exists() else None


def completion(layout: Layout, stage: Stage) -> dict | None:
    """What the stage's last finished run recorded (None: it never finished)."""
    path = layout.lineage / f"{stage.name}.json"
    fix = f"delete it, and `latentmill run` does the {stage.name} stage again"
    fields = {"fingerprint": str, "output": (str, type(None)), "record": dict}
    return read_optional(path, fix=fix, fields=fields)


def plan(recipe: dict, layout: Layout, stages: list[Stage], urls: str | None = None) -> list[Step]:
    """For each stage of `stages` that applies: keep, run, redo or continue, and why."""
    made = made_now(layout)  # stage -> output fingerprint of what it made, for the stages after it
    steps = []
    for stage in stages:
        if not stage.applies(recipe):
            continue
        record = stage_record(stage, recipe, layout, urls, made)
        done = completion(layout, stage)
        present = all(layout.present(name) for name in stage.outputs if producer(name) is stage)
        if done is None:
            step = Step(stage, RUN, ["not finished yet" if present else "not done yet"], record)
        elif done["fingerprint"] != record["fingerprint"]:
            reasons = [_reason(line, stage) for line in differences(done["record"], record)]
            step = Step(stage, REDO, reasons, record)
        elif not present:
            step = Step(stage, RUN, ["its outputs are missing"], record)
        elif stage.pending and stage.pending(recipe, layout):
            step = Step(stage, CONTINUE, [stage.pending(recipe, layout)], record)
        else:
            step = Step(stage, KEEP, ["up to date"], record)
        if step.action != KEEP:
            made[stage.name] = None  # what it makes next is new: every stage reading it follows
        steps.append(step)
    return steps


def made_now(layout: Layout) -> dict[str, str | None]:
    """Each stage's output fingerprint as its completion record says (None: never finished)."""
    return {stage.name: (completion(layout, stage) or {}).get("output") for stage in STAGES}


def _reason(line: str, stage: Stage) -> str:
    if line.startswith("inputs.") and line.endswith(": changed"):
        name = line[len("inputs.") : -len(": changed")]
        made_by = producer(name)
        return f"{name} changed (made again by the {made_by.name} stage)" if made_by else f"{name} changed"
    return line


def clear(step: Step, layout: Layout) -> list[tuple[Path, Path]]:
    """Remove what a changed stage made before it is redone (a training run is moved aside to
    runs/.replaced/NAME, not deleted), and its completion record; returns (run, where it went) of each run
    moved aside."""
    moved = []
    remove(layout.lineage / f"{step.stage.name}.json")
    for name in step.stage.outputs:
        if producer(name) is not step.stage:
            continue  # e.g. fit-head adds a column to scores/, which the score stage made
        for path in layout.paths(name):
            if name == "runs":
                aside = layout.runs / ".replaced" / path.name
                remove(aside)
                move(path, aside)
                moved.append((path, aside))
            else:
                remove(path)
    return moved


def finish(step: Step, recipe: dict, layout: Layout, urls: str | None, report: dict) -> None:
    """Record that the stage finished: its record (taken again now, as its inputs are all made), the
    fingerprint of what it made, its summary."""
    record = stage_record(step.stage, recipe, layout, urls, made_now(layout))
    extra = step.stage.produced(layout) if step.stage.produced else {}
    output = fingerprint({"stage": step.stage.name, "settings": extra, "inputs": record["fingerprint"]})
    body = {"fingerprint": record["fingerprint"], "output": output, "record": record}
    write_json(layout.lineage / f"{step.stage.name}.json", body | {"report": _jsonable(report)})


def _jsonable(report: dict) -> dict:
    return json.loads(json.dumps(report, default=str))


def stale(layout: Layout) -> dict[str, str]:
    """Stages whose inputs were made again since they finished (recipe-free: from the records alone)."""
    out: dict[str, str] = {}
    for stage in STAGES:  # in order: a stage reading a stale stage's output is stale too
        done = _readable_completion(layout, stage)
        inputs = done["record"].get("inputs") if done else None
        for name, recorded in (inputs if isinstance(inputs, dict) else {}).items():
            made_by = producer(name)
            upstream = _readable_completion(layout, made_by) if made_by else None
            if made_by and made_by.name in out:
                out[stage.name] = f"stale: {name} comes from the {made_by.name} stage, which is stale"
                break
            if made_by and upstream and upstream["output"] != recorded:
                out[stage.name] = f"stale: {name} was made again by the {made_by.name} stage"
                break
    return out


def _readable_completion(layout: Layout, stage: Stage) -> dict | None:
    """completion(), with a damaged record taken as none (status shows it as damaged on its own row)."""
    try:
        return completion(layout, stage)
    except InputError:
        return None
