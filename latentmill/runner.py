"""`latentmill run`: a recipe's stages in order, into one work folder (latentmill.layout), each skipping
finished work.

The stage table below is the one list of stages: each names its recipe section, the layout paths it
reads and writes, how it knows it is done, how it runs, and its summary (the one its command prints).
`run`, `status`, `report` and `demo` all read it. Every stage is resumable on its own (done shards are
skipped, training goes on from its last checkpoint), so a killed run, run again, continues where it
stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from latentmill.errors import InputError
from latentmill.layout import Layout
from latentmill.progress import progress_bar
from latentmill.recipe import section
from latentmill.sources import from_folder, url_source
from latentmill.stagestatus import (
    dedup_status,
    download_status,
    encode_status,
    export_status,
    fit_head_status,
    prefilter_status,
    select_status,
    shard_status,
    train_status,
)


@dataclass
class Context:
    """What a stage's `run` gets: the recipe, the work folder, the executor, the URL table, the log."""

    recipe: dict
    layout: Layout
    executor: object
    urls: str | None
    log: Callable
    stack: ExitStack
    allowed: dict = field(default_factory=dict)  # the demo server's allow-list for prefilter and download
    table: Path | None = None  # the URL table, once found (the demo's server started once per run)


@dataclass(frozen=True)
class Stage:
    name: str
    section: str  # the recipe section (config) it reads
    inputs: tuple[str, ...]  # Layout attributes
    outputs: tuple[str, ...]
    run: Callable[[Context], dict]
    summary: Callable[[dict], str]
    status: Callable[[Layout], tuple[str, str]]  # (done, detail) for `latentmill status`
    applies: Callable[[dict], bool] = lambda recipe: True


# --- the stages, in order ----------------------------------------------------------------------------------


def _prefilter(ctx: Context) -> dict:
    from latentmill.curate.prefilter import prefilter

    table, lay = url_source(ctx), ctx.layout
    if lay.kept_funnel.exists():
        return json.loads(lay.kept_funnel.read_text())
    with progress_bar(None, "[prefilter]", "rows") as bar:
        return prefilter(
            table, lay.kept, section(ctx.recipe, "prefilter", **ctx.allowed), progress=bar.update
        )


def _download(ctx: Context) -> dict:
    from latentmill.curate.download import download

    if from_folder(ctx.recipe):  # a folder of the user's own images: packed into image shards instead
        from latentmill.curate.pack import pack_images

        return pack_images(url_source(ctx), ctx.layout.images, section(ctx.recipe, "pack"))
    url_source(ctx)  # the demo's server must be up while img2dataset downloads
    return download(ctx.layout.kept, ctx.layout.images, section(ctx.recipe, "download", **ctx.allowed))


def _score(ctx: Context) -> dict:
    from latentmill.filters.score import score

    with progress_bar(None, "[score]", "img") as bar:
        return score(
            ctx.layout.images,
            ctx.layout.scores,
            section(ctx.recipe, "score"),
            progress=bar.update,
            executor=ctx.executor,
        )


def _fit_head(ctx: Context) -> dict:
    """Fit each head on the sample's own labels (a URL-table column carried in the image shards) and add
    its column to the scores, as `latentmill fit-head --labels images/ --add-column` does."""
    from latentmill.filters.fithead import FitHeadConfig, fit_and_add
    from latentmill.schema import from_section

    lay, out = ctx.layout, {}
    for spec in ctx.recipe.get("fit_head") or []:
        config = from_section(FitHeadConfig, spec)
        column = config.column or config.target
        out[column] = fit_and_add(
            config, lay.images, lay.embeddings, lay.scores, lay.head(column), add_column=True
        )
    return out


def _dedup(ctx: Context) -> dict:
    from latentmill.filters.dedup import dedup

    with progress_bar(None, "[dedup]", "part") as bar:
        return dedup(
            ctx.layout.scores,
            ctx.layout.dedup,
            section(ctx.recipe, "dedup"),
            images=ctx.layout.images,
            executor=ctx.executor,
            progress=bar.update,
        )


def _select(ctx: Context) -> dict:
    from latentmill.filters.select import select

    extra = {"dedup": str(ctx.layout.dedup)} if "dedup" in ctx.recipe else {}
    return select(ctx.layout.scores, ctx.layout.selection, section(ctx.recipe, "select", **extra))


def _resolutions(recipe: dict) -> list[int]:
    return sorted({s["resolution"] for s in _train_stages(recipe)})


def _train_stages(recipe: dict) -> list[dict]:
    return recipe.get("stages") or [{"name": "main", "resolution": section(recipe, "encode").resolution}]


def _encode(ctx: Context) -> dict:
    from latentmill.curate.encode import encode

    out = {}
    for resolution in _resolutions(ctx.recipe):
        with progress_bar(None, f"[encode {resolution}]", "img") as bar:
            manifest = encode(
                ctx.layout.images,
                ctx.layout.latents(resolution),
                section(ctx.recipe, "encode", resolution=resolution),
                selection=ctx.layout.selection,
                executor=ctx.executor,
                progress=bar.update,
            )
        out[resolution] = manifest
    if "train" in ctx.recipe and not all(m["samples"] for m in out.values()):
        raise InputError(
            "no latents to train on: the selection kept nothing. Loosen the select thresholds "
            "(latentmill select ... or --set select.KEY=VALUE) and run again."
        )
    return out


def _train(ctx: Context) -> dict:
    from latentmill.train.checkpoint import checkpoints, last_state
    from latentmill.train.loop import train

    out, previous = {}, None
    for stage in _train_stages(ctx.recipe):
        run = ctx.layout.run(stage["name"])
        overrides = {
            "shards": str(ctx.layout.latents(stage["resolution"])),
            "output": str(run),
            "resume": bool(checkpoints(run)),  # a stopped run continues, a new one starts
            "init_from": str(previous) if previous else None,
        }
        if stage.get("steps"):
            overrides["steps"] = stage["steps"]
        config = section(ctx.recipe, "train", **overrides)
        state = last_state(run)
        if state and state["step"] >= config.steps:
            out[stage["name"]] = {"step": state["step"], "loss": state.get("loss"), "finished_before": True}
        else:
            with progress_bar(config.steps, f"[train {stage['name']}]", "step") as bar:
                metrics = train(config, progress=lambda m, bar=bar: bar.update(m["step"] - bar.n))
            out[stage["name"]] = {"step": metrics.get("step"), "loss": metrics.get("loss")}
        previous = run
    return out


def _export(ctx: Context) -> dict:
    from latentmill.train.export import export_format, export_run, export_target

    train_section = ctx.recipe.get("train") or {}
    run = ctx.layout.run(_train_stages(ctx.recipe)[-1]["name"])
    config = section(ctx.recipe, "export")
    format = export_format(config.format, bool(train_section.get("lora_rank")))
    text = train_section.get("text_encoder", "")
    if format == "pipeline" and (not text or str(text).startswith("openclip:")):
        return {
            "skipped": "a StableDiffusionPipeline needs a CLIPTextModel text encoder folder (this run used an "
            "open_clip text tower); `latentmill sample` generates from the run directly"
        }
    output = ctx.layout.export
    done = export_target(run, output, format)
    if not done.exists():
        export_run(run, output, format, use_ema=config.ema, vae=config.vae)
    return {"path": str(done if format != "pipeline" else output), "format": format}


def _summaries():
    from latentmill.curate.download import format_summary
    from latentmill.curate.encode import format_encode_summary
    from latentmill.curate.pack import format_pack_summary
    from latentmill.curate.prefilter import format_prefilter_funnel
    from latentmill.filters.dedup import format_dedup_funnel
    from latentmill.filters.fithead import format_metrics
    from latentmill.filters.score import format_score_totals  # (torch: imported once score has run)
    from latentmill.filters.select import format_select_funnel

    return {
        "prefilter": format_prefilter_funnel,
        "download": lambda out: format_pack_summary(out) if "packed" in out else format_summary(out),
        "score": format_score_totals,
        "fit-head": lambda out: "\n".join(f"{column}: {format_metrics(m)}" for column, m in out.items()),
        "dedup": format_dedup_funnel,
        "select": format_select_funnel,
        "encode": lambda out: "\n".join(format_encode_summary(m) for m in out.values()),
        "train": lambda out: "\n".join(
            f"{name}: step {m['step']}, loss {m['loss']}"
            + (" (finished before)" if m.get("finished_before") else "")
            for name, m in out.items()
        ),
        "export": lambda out: out.get("path") or f"skipped: {out['skipped']}",
    }


def _summary(name: str) -> Callable[[dict], str]:
    return lambda out: _summaries()[name](out)


STAGES: tuple[Stage, ...] = (
    Stage(
        "prefilter",
        "prefilter",
        ("urls",),
        ("kept", "kept_funnel"),
        _prefilter,
        _summary("prefilter"),
        prefilter_status,
        applies=lambda recipe: not from_folder(recipe),
    ),
    Stage("download", "download", ("kept",), ("images",), _download, _summary("download"), download_status),
    Stage(
        "score",
        "score",
        ("images",),
        ("scores", "embeddings"),
        _score,
        _summary("score"),
        shard_status(lambda lay: lay.scores, "*.stats.json"),
    ),
    Stage(
        "fit-head",
        "fit_head",
        ("images", "embeddings", "scores"),
        ("heads", "scores"),
        _fit_head,
        _summary("fit-head"),
        fit_head_status,
        applies=lambda recipe: bool(recipe.get("fit_head")),
    ),
    Stage(
        "dedup",
        "dedup",
        ("scores", "embeddings", "images"),
        ("dedup",),
        _dedup,
        _summary("dedup"),
        dedup_status,
        applies=lambda recipe: "dedup" in recipe,
    ),
    Stage(
        "select", "select", ("scores", "dedup"), ("selection",), _select, _summary("select"), select_status
    ),
    Stage(
        "encode", "encode", ("images", "selection"), ("latents",), _encode, _summary("encode"), encode_status
    ),
    Stage(
        "train",
        "train",
        ("latents",),
        ("runs",),
        _train,
        _summary("train"),
        train_status,
        applies=lambda recipe: "train" in recipe,
    ),
    Stage(
        "export",
        "export",
        ("runs",),
        ("export",),
        _export,
        _summary("export"),
        export_status,
        applies=lambda recipe: "train" in recipe,
    ),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


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
            report[stage.name] = stage.run(ctx)
            log(_indent(f"[{stage.name}] ", stage.summary(report[stage.name])))
    return report


def _indent(prefix: str, text: str) -> str:
    lines = text.splitlines() or [""]
    return "\n".join([prefix + lines[0]] + [" " * len(prefix) + line for line in lines[1:]])


def status(work: str | Path) -> list[dict]:
    """Every stage's progress in WORK, from the stage table: shards done of total, samples kept."""
    layout = Layout(work)
    rows = []
    for stage in STAGES:
        done, detail = stage.status(layout)
        rows.append({"stage": stage.name, "done": done, "detail": detail})
    return rows
