"""The stage table: the one list of a recipe's stages, in order.

Each row names the recipe sections the stage reads (and their config classes), the work-folder paths
(latentmill.layout attributes) it reads and writes, how it runs, the summary its command prints, and how
`latentmill status` reads its progress. The recipe schema (latentmill.recipe), the runner's input checks,
`status` and `run --until` are all made from this table; to add a stage, add a row (ARCHITECTURE.md).
Every stage is resumable on its own (done shards are skipped, training goes on from its last checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

from latentmill import stagestatus
from latentmill.curate.download import DownloadConfig
from latentmill.curate.encode import EncodeConfig
from latentmill.curate.executors import ExecutorConfig
from latentmill.curate.pack import PackConfig
from latentmill.curate.prefilter import PrefilterConfig
from latentmill.filters.dedup import DedupConfig
from latentmill.filters.fithead import FitHeadConfig
from latentmill.filters.select import SelectConfig
from latentmill.layout import Layout
from latentmill.progress import progress_bar
from latentmill.schema import StageConfig, from_section, opt
from latentmill.sources import UrlsSection, from_folder, url_source
from latentmill.train.commandconfigs import ExportConfig
from latentmill.train.config import TrainConfig


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
    table: object = None  # the URL table's path, once found (the demo's server started once per run)


@dataclass(frozen=True, kw_only=True)
class Stage:
    name: str
    sections: dict[str, Callable[[], type]]  # recipe section -> its config class (loaded on first use)
    lists: dict[str, type] = field(default_factory=dict)  # recipe sections that are lists of configs
    inputs: tuple[str, ...]  # Layout attributes it reads (checked before it starts)
    outputs: tuple[str, ...]  # Layout attributes it writes
    run: Callable[[Context], dict]
    summary: Callable[[dict], str]
    status: Callable  # (Layout, Stage) -> (done, detail), for `latentmill status`
    applies: Callable[[dict], bool] = lambda recipe: True
    # work left although its lineage matches (training to more steps): (recipe, Layout) -> reason or None
    pending: Callable | None = None
    # what identifies its output beyond its lineage record (the step a run reached): Layout -> dict
    produced: Callable | None = None


@dataclass
class TrainStage(StageConfig):
    """One item of `stages:`: a training stage at one resolution, started from the previous stage's weights."""

    SECTION = "stages"
    name: str = opt(help="The run's name: WORK/runs/NAME.")
    resolution: int = opt(help="Latents of this resolution (encoded once per resolution).", low=1)
    steps: int | None = opt(None, "Steps of this stage (default: train.steps).", low=1)


PLACEHOLDERS = {"train": {"shards": "-", "output": "-"}}  # required train fields the runner fills in


def section(recipe: dict, name: str, **extra):
    """The validated config of one recipe section (defaults where the recipe is silent)."""
    return from_section(SECTIONS[name](), recipe.get(name) or {}, **extra)


# --- the stages, in order ----------------------------------------------------------------------------------


def _prefilter(ctx: Context) -> dict:
    from latentmill.curate.prefilter import prefilter

    table, lay = url_source(ctx), ctx.layout
    if lay.kept_funnel.exists():
        from latentmill.curate.prefilter import check_kept
        from latentmill.curate.records import read_record

        fix = "delete it and run the prefilter stage again (it is quick)"
        return check_kept(read_record(lay.kept_funnel, fix=fix, fields={"kept_rows": int, "input_rows": int}))
    with progress_bar(None, "[prefilter]", "rows") as bar:
        return prefilter(
            table, lay.kept, section(ctx.recipe, "prefilter", **ctx.allowed), progress=bar.update
        )


def _download(ctx: Context) -> dict:
    from latentmill.curate.download import download

    if from_folder(ctx.recipe):  # a folder of the user's own images: packed into image shards instead
        from latentmill.curate.pack import pack_images

        return pack_images(url_source(ctx), ctx.layout.images, section(ctx.recipe, "pack"), overwrite=True)
    url_source(ctx)  # the demo's server must be up while img2dataset downloads
    config = section(ctx.recipe, "download", **ctx.allowed)
    return download(ctx.layout.kept, ctx.layout.images, config, overwrite=True)  # as the plan decided


def _score(ctx: Context) -> dict:
    from latentmill.filters.score import score

    lay, config = ctx.layout, section(ctx.recipe, "score")
    with progress_bar(None, "[score]", "img") as bar:  # overwrite: the plan decided this stage runs
        return score(lay.images, lay.scores, config, bar.update, ctx.executor, overwrite=True)


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
            config, lay.images, lay.embeddings, lay.scores, lay.head(column), add_column=True, overwrite=True
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
                overwrite=True,  # the plan (latentmill.plan) decided this stage runs with these settings
            )
        out[resolution] = manifest  # (no latents at all: encode says why, exit 3)
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
                from latentmill.evaluation import training_eval

                metrics = train(
                    config,
                    progress=lambda m, bar=bar: bar.update(m["step"] - bar.n),
                    log=ctx.log,
                    evaluate=training_eval(config),
                )
            out[stage["name"]] = {"step": metrics.get("step"), "loss": metrics.get("loss")}
        previous = run
    return out


def _training_left(recipe: dict, layout: Layout) -> str | None:
    from latentmill.train.checkpoint import last_state

    for stage in _train_stages(recipe):
        target = stage.get("steps") or section(recipe, "train", **PLACEHOLDERS["train"]).steps
        state = last_state(layout.run(stage["name"]))
        reached = state["step"] if state else 0
        if reached < target:
            return f"{stage['name']} is at step {reached} of {target}"
    return None


def _steps_reached(layout: Layout) -> dict:
    from latentmill.train.checkpoint import last_state

    return {run.name: (last_state(run) or {}).get("step") for run in layout.run_folders()}


def _export(ctx: Context) -> dict:
    from latentmill.train.export import export_format, export_run, export_target

    train_section = ctx.recipe.get("train") or {}
    run = ctx.layout.run(_train_stages(ctx.recipe)[-1]["name"])
    config = section(ctx.recipe, "export")
    format = export_format(config.format, bool(train_section.get("lora_rank")))
    text = train_section.get("text_encoder", "")
    if format in ("pipeline", "single-file") and (not text or str(text).startswith("openclip:")):
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
    from latentmill.curate.downloadresults import format_summary
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


def _score_config():
    from latentmill.filters.score import ScoreConfig  # imports torch: only when a recipe is loaded

    return ScoreConfig


def _constant(cls: type) -> Callable[[], type]:
    return lambda: cls


URLS = {"urls": _constant(UrlsSection)}
EXECUTOR = {"executor": _constant(ExecutorConfig)}

STAGES: tuple[Stage, ...] = (
    Stage(
        name="prefilter",
        sections={**URLS, "prefilter": _constant(PrefilterConfig)},
        inputs=("urls",),
        outputs=("kept", "kept_funnel"),
        run=_prefilter,
        summary=_summary("prefilter"),
        status=stagestatus.prefilter_status,
        applies=lambda recipe: not from_folder(recipe),
    ),
    Stage(
        name="download",
        sections={**URLS, "download": _constant(DownloadConfig), "pack": _constant(PackConfig)},
        inputs=("urls", "kept"),
        outputs=("images",),
        run=_download,
        summary=_summary("download"),
        status=stagestatus.download_status,
    ),
    Stage(
        name="score",
        sections={"score": _score_config, **EXECUTOR},
        inputs=("images",),
        outputs=("scores", "embeddings"),
        run=_score,
        summary=_summary("score"),
        status=stagestatus.shard_status("*.stats.json"),
    ),
    Stage(
        name="fit-head",
        sections={},
        lists={"fit_head": FitHeadConfig},
        inputs=("images", "embeddings", "scores"),
        outputs=("heads", "scores"),
        run=_fit_head,
        summary=_summary("fit-head"),
        status=stagestatus.fit_head_status,
        applies=lambda recipe: bool(recipe.get("fit_head")),
    ),
    Stage(
        name="dedup",
        sections={"dedup": _constant(DedupConfig), **EXECUTOR},
        inputs=("scores", "embeddings", "images"),
        outputs=("dedup",),
        run=_dedup,
        summary=_summary("dedup"),
        status=stagestatus.dedup_status,
        applies=lambda recipe: "dedup" in recipe,
    ),
    Stage(
        name="select",
        sections={"select": _constant(SelectConfig)},
        inputs=("scores", "dedup"),
        outputs=("selection",),
        run=_select,
        summary=_summary("select"),
        status=stagestatus.select_status,
    ),
    Stage(
        name="encode",
        sections={"encode": _constant(EncodeConfig), **EXECUTOR},
        inputs=("images", "selection"),
        outputs=("latents",),
        run=_encode,
        summary=_summary("encode"),
        status=stagestatus.encode_status,
    ),
    Stage(
        name="train",
        sections={"train": _constant(TrainConfig)},
        lists={"stages": TrainStage},
        inputs=("latents",),
        outputs=("runs",),
        run=_train,
        summary=_summary("train"),
        status=stagestatus.train_status,
        applies=lambda recipe: "train" in recipe,
        pending=_training_left,
        produced=_steps_reached,
    ),
    Stage(
        name="export",
        sections={"export": _constant(ExportConfig), "train": _constant(TrainConfig)},
        inputs=("runs",),
        outputs=("export",),
        run=_export,
        summary=_summary("export"),
        status=stagestatus.export_status,
        applies=lambda recipe: "train" in recipe,
    ),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
# the recipe's sections, from the table: section name -> config class loader; list sections -> item class
SECTIONS: dict[str, Callable[[], type]] = {name: load for s in STAGES for name, load in s.sections.items()}
LISTS: dict[str, type] = {name: cls for s in STAGES for name, cls in s.lists.items()}


def producer(output: str) -> Stage | None:
    """The first stage that writes a Layout path (None: the user's own input)."""
    return next((s for s in STAGES if output in s.outputs), None)
