"""The report's account of how a work folder was made: each rule's count in the funnels, the resolved
settings of every stage a recipe ran (collapsed), and each training run's story (its steps, the steps it
was resumed at, the settings changed then; the runs a changed recipe replaced)."""

from __future__ import annotations

import json
from pathlib import Path

from markupsafe import Markup

from latentmill.curate.records import read_optional
from latentmill.layout import Layout
from latentmill.reporthtml import concat, html


def rule_rows(lay: Layout) -> list[tuple[str, str, int]]:
    """(stage, rule, rows it dropped) of the prefilter's and select's funnels, in the order they apply."""
    rows = []
    for stage, path in (("prefilter", lay.kept_funnel), ("select", lay.select_funnel)):
        funnel = read_optional(path, fix="run the stage again with --overwrite") if path.exists() else None
        for step in (funnel or {}).get("steps") or []:
            if isinstance(step, dict) and isinstance(step.get("dropped"), int):
                rows.append((stage, str(step.get("rule")), step["dropped"]))
    return rows


def rules_table(lay: Layout) -> Markup | None:
    rows = rule_rows(lay)
    if not rows:
        return None
    body = concat(html("<tr><td>{}</td><td>{}</td><td>{:,}</td></tr>", s, r, n) for s, r, n in rows)
    return html('<h3>Dropped, by rule</h3><table class="funnel"><tr><th>stage</th><th>rule</th>'
                "<th>dropped</th></tr>{}</table>", body)  # fmt: skip


def folder_input(lay: Layout) -> int | None:
    """For a folder source (`images pack`): the images that went in, packed or dropped."""
    from latentmill.curate.lineage import IMAGE_SHARDS_RECORD

    record = read_optional(lay.images / IMAGE_SHARDS_RECORD, fix="pack the folder again with --overwrite")
    if not record or record.get("stage") != "pack":
        return None
    total = 0
    for stats in sorted(lay.images.glob("*_stats.json")):
        found = read_optional(stats, fix="delete it and pack again") or {}
        total += int(found.get("successes") or 0) + sum(int(n) for n in (found.get("dropped") or {}).values())
    return total


def settings_section(lay: Layout) -> Markup | None:
    """Every stage the recipe ran, its resolved settings in a collapsed block."""
    if not lay.lineage.exists():
        return None
    parts = []
    for path in sorted(lay.lineage.glob("*.json")):
        done = read_optional(path, fix="delete it, and `latentmill run` does that stage again") or {}
        record = done.get("record") or {}
        settings = {k: record.get(k) for k in ("settings", "models") if record.get(k)}
        text = json.dumps(settings, indent=2, sort_keys=True, default=str)
        parts.append(html("<details><summary>{}</summary><pre>{}</pre></details>", path.stem, text))
    return concat(parts) or None


def run_story(run: Path) -> str:
    """One line of a run: its steps, where it was resumed (and what changed then)."""
    from latentmill.train.checkpoint import checkpoints

    found = checkpoints(run)
    if not found:
        return "no checkpoint yet"
    state = read_optional(found[-1] / "state.json", fix=f"delete {found[-1]}") or {}
    steps = (state.get("config") or {}).get("steps")
    line = f"step {state.get('step')}" + (f" of {steps}" if steps else "")
    resumed = state.get("resumed_at") or []
    if resumed:
        line += f"; resumed at step {', '.join(str(s) for s in resumed)}"
    changes = [c for c in state.get("changes") or [] if isinstance(c, dict) and "key" in c]
    if changes:
        line += "; changed on resume: " + ", ".join(
            f"{c['key']} {c.get('from')!r} -> {c.get('to')!r} at step {c.get('step')}" for c in changes
        )
    return line


def runs_section(lay: Layout) -> Markup | None:
    runs = lay.run_folders()
    replaced = sorted(p for p in (lay.runs / ".replaced").iterdir() if p.is_dir()) if (lay.runs / ".replaced").exists() else []  # fmt: skip
    if not runs and not replaced:
        return None
    items = [html("<li><b>{}</b>: {}</li>", run.name, run_story(run)) for run in runs]
    items += [
        html(
            "<li><b>{}</b> (replaced by a changed recipe, kept in {}): {}</li>", run.name, run, run_story(run)
        )
        for run in replaced
    ]
    return html("<ul>{}</ul>", concat(items))
