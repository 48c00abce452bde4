"""`latentmill run`: the stages of a recipe in order, into one work folder, each skipping finished work.

WORK/urls (table, kept rows, funnel), images/, scores/ (+ embeddings/), selection/, latents-{res}/,
runs/{stage}/ and export/. Every stage is resumable on its own (done shards are skipped, training goes
on from its last checkpoint), so a killed run, run again, continues where it stopped.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

from latentmill.curate.errors import InputError
from latentmill.recipe import section

STAGES = ("prefilter", "download", "score", "select", "encode", "train", "export")  # fit_heads run with score


def run_recipe(recipe: dict, work: str | Path, urls: str | None = None, until: str | None = None,
               executor=None, log=print) -> dict:
    """Run the recipe's stages up to `until` (inclusive); return what each stage reported."""
    from latentmill.curate.download import download
    from latentmill.curate.encode import encode
    from latentmill.curate.prefilter import prefilter
    from latentmill.filters.score import score
    from latentmill.filters.select import select

    if until and until not in STAGES:
        raise InputError(f"--until {until!r}: use one of {', '.join(STAGES)}.")
    last = STAGES.index(until) if until else len(STAGES) - 1
    work = Path(work)
    (work / "urls").mkdir(parents=True, exist_ok=True)
    executor = executor or section(recipe, "executor")
    report: dict = {}
    with ExitStack() as stack:
        table = _url_table(recipe, work, urls, stack, log)
        # the demo's own loopback server, and only it, is an exception to the private-address guard
        port_file = work / "urls" / "server-port.txt"
        allowed = {"allow_hosts": (f"127.0.0.1:{port_file.read_text().strip()}",)} \
            if section(recipe, "urls").source == "sample-server" else {}
        kept = work / "urls" / "kept.parquet"
        if (work / "urls" / "kept.funnel.json").exists():
            report["prefilter"] = json.loads((work / "urls" / "kept.funnel.json").read_text())
        else:
            report["prefilter"] = prefilter(table, kept, section(recipe, "prefilter", **allowed))
        log(f"[prefilter] {report['prefilter']['input_rows']:,} rows -> {report['prefilter']['kept_rows']:,} kept")
        if last < 1:
            return report
        report["download"] = download(kept, work / "images", section(recipe, "download", **allowed))
        log(f"[download] {report['download']['success']:,} images, failures {report['download']['failures']}")
    if last < 2:
        return report
    report["score"] = score(work / "images", work / "scores", section(recipe, "score"), executor=executor)
    log(f"[score] {report['score']['scored']:,} of {report['score']['images']:,} images scored")
    for spec in recipe.get("fit_heads") or []:
        report.setdefault("fit_heads", {})[spec["column"]] = _fit_head(spec, work, log)
    if last < 3:
        return report
    sel = section(recipe, "select")
    thresholds = {k: getattr(sel, k) for k in ("min_aesthetic", "max_pwatermark", "max_punsafe", "min_similarity",
                                               "min_side", "min_area", "max_aspect")}
    report["select"] = select(work / "scores", work / "selection", thresholds, list(sel.where), sel.preset)
    log(f"[select] {report['select']['kept']:,} of {report['select']['input']:,} kept")
    if last < 4:
        return report
    stages = recipe.get("stages") or [{"name": "main", "resolution": section(recipe, "encode").resolution}]
    report["encode"] = {}
    for resolution in sorted({s["resolution"] for s in stages}):
        manifest = encode(work / "images", work / f"latents-{resolution}", section(recipe, "encode", resolution=resolution),
                          selection=work / "selection", executor=executor)
        report["encode"][resolution] = {k: manifest[k] for k in ("samples", "per_bucket", "dropped")}
        log(f"[encode] {manifest['samples']:,} latents at {resolution} px, dropped {manifest['dropped']}")
    if last >= 5 and "train" in recipe and not all(e["samples"] for e in report["encode"].values()):
        raise InputError("no latents to train on: the selection kept nothing. Loosen the select thresholds "
                         "(latentmill select ... or --set select.KEY=VALUE) and run again.")
    if last < 5 or "train" not in recipe:
        return report
    from latentmill.train.checkpoint import checkpoints
    from latentmill.train.loop import train

    report["train"], previous = {}, None
    for stage in stages:
        run = work / "runs" / stage["name"]
        overrides = {"shards": str(work / f"latents-{stage['resolution']}"), "output": str(run),
                     "resume": bool(checkpoints(run)),  # a stopped run continues, a new one starts
                     "init_from": str(previous) if previous else None}
        if stage.get("steps"):
            overrides["steps"] = stage["steps"]
        config = section(recipe, "train", **overrides)
        if _finished(run, config.steps):
            metrics = {"step": config.steps, "finished_before": True}
        else:
            metrics = train(config)
        report["train"][stage["name"]] = {k: metrics.get(k) for k in ("step", "loss")}
        log(f"[train] {stage['name']}: step {metrics.get('step')}, loss {metrics.get('loss')}")
        previous = run
    if last < 6:
        return report
    report["export"] = _export(recipe, previous, work / "export", log)
    return report


def _fit_head(spec: dict, work: Path, log) -> dict:
    """Fit a head on the sample's own labels (a URL-table column carried in the shards), save it in
    WORK/heads/, and add its column to the scores from the saved embeddings."""
    from latentmill.filters.fit import (
        FitConfig,
        add_head_column,
        fit_head,
        format_metrics,
        labelled_embeddings,
        labels_from_image_shards,
        save_head,
    )
    from latentmill.filters.heads import fitted_metadata

    path = work / "heads" / f"{spec['column']}.safetensors"
    if not (work / "embeddings").exists():
        raise InputError("fit_heads needs the embeddings: set score.save_embeddings: true in the recipe.")
    if not path.exists():
        labels = labels_from_image_shards(work / "images", spec["target"])
        x, y = labelled_embeddings(work / "embeddings", labels, work / "scores", source=f"{work}/images")
        config = FitConfig(target=spec["target"], column=spec["column"], kind=spec.get("kind", "linear"),
                           epochs=spec.get("epochs", 300), alpha=spec.get("alpha"))
        module, metrics = fit_head(x, y, config)
        save_head(module, path, config, x.shape[1], metrics)
    column = add_head_column(path, work / "scores", work / "embeddings")
    metrics = fitted_metadata(path)["metrics"]
    log(f"[fit-head] {column} from {spec['target']}: {format_metrics(metrics)}")
    return metrics


def _url_table(recipe: dict, work: Path, urls: str | None, stack: ExitStack, log) -> Path:
    source = section(recipe, "urls")
    if source.source == "sample-server":
        import pyarrow as pa
        import pyarrow.parquet as pq

        from latentmill.curate.imageserver import ImageServer, prerender, sample_rows

        # the same port on every run of this work folder: a resumed download must find the same URLs
        port_file = work / "urls" / "server-port.txt"
        port = int(port_file.read_text()) if port_file.exists() else 0
        try:
            server = stack.enter_context(ImageServer(port=port, slow_s=10))
        except OSError as err:
            raise InputError(f"the demo's image server cannot listen on 127.0.0.1:{port} again ({err}); free the "
                             f"port, or start over in a new work folder.") from None
        port_file.write_text(str(server.port))
        table = work / "urls" / "sample.parquet"
        if not table.exists():
            rows = sample_rows(server.url(""), n_synthetic=source.synthetic, photo_views=source.photo_views)
            pq.write_table(pa.Table.from_pylist(rows), table)
        prerender(pq.read_table(table, columns=["URL"]).column("URL").to_pylist())
        log(f"[urls] sample URLs served on {server.url('/')}")
        return table
    path = urls or source.path
    if not path:
        raise InputError("this recipe reads a URL table: give --urls FILE (or set urls.path).")
    return Path(path)


def _finished(run: Path, steps: int) -> bool:
    from latentmill.train.checkpoint import checkpoints

    found = checkpoints(run)
    return bool(found) and json.loads((found[-1] / "state.json").read_text())["step"] >= steps


def _export(recipe: dict, run: Path | None, output: Path, log) -> dict:
    from latentmill.train.export import export_pipeline

    text = (recipe.get("train") or {}).get("text_encoder", "")
    if run is None or not text or str(text).startswith("openclip:"):
        log("[export] skipped: a StableDiffusionPipeline needs a CLIPTextModel text encoder folder "
            "(this run used an open_clip text tower); `latentmill sample` generates from the run directly")
        return {"skipped": True}
    if not (output / "model_index.json").exists():
        export_pipeline(run, output)
    log(f"[export] {output}")
    return {"path": str(output)}


def status(work: str | Path) -> list[dict]:
    """Every stage's progress in WORK: shards done of total, samples kept."""
    work = Path(work)
    rows = []
    image_tars = sorted((work / "images").glob("*.tar")) if (work / "images").exists() else []
    funnel = work / "urls" / "kept.funnel.json"
    if funnel.exists():
        f = json.loads(funnel.read_text())
        rows.append({"stage": "prefilter", "done": "yes", "detail": f"{f['kept_rows']:,} of {f['input_rows']:,} rows kept"})
    else:
        rows.append({"stage": "prefilter", "done": "no", "detail": ""})
    summary = work / "images" / "_latentmill" / "summary.json"
    done = len(list((work / "images").glob("*_stats.json"))) if (work / "images").exists() else 0
    detail = ""
    if summary.exists():
        s = json.loads(summary.read_text())
        detail = f"{s['success']:,} images, {s['failed']:,} failed"
    rows.append({"stage": "download", "done": f"{done} shards", "detail": detail})
    for name, folder in (("score", work / "scores"), ("select", work / "selection")):
        n = len(list(folder.glob("*.stats.json" if name == "score" else "*.parquet"))) if folder.exists() else 0
        detail = ""
        if name == "select" and (folder / "funnel.json").exists():
            f = json.loads((folder / "funnel.json").read_text())
            detail = f"{f['kept']:,} of {f['input']:,} kept"
        rows.append({"stage": name, "done": f"{n}/{len(image_tars)} shards", "detail": detail})
    for latents in sorted(work.glob("latents-*")):
        n = len(list(latents.glob("*.stats.json")))
        detail = ""
        if (latents / "manifest.json").exists():
            detail = f"{json.loads((latents / 'manifest.json').read_text())['samples']:,} latents"
        rows.append({"stage": f"encode {latents.name}", "done": f"{n}/{len(image_tars)} shards", "detail": detail})
    from latentmill.train.checkpoint import checkpoints

    for run in sorted((work / "runs").iterdir()) if (work / "runs").exists() else []:
        found = checkpoints(run)
        if found:
            state = json.loads((found[-1] / "state.json").read_text())
            rows.append({"stage": f"train {run.name}", "done": f"step {state['step']}/{state['config']['steps']}",
                         "detail": found[-1].name})
    return rows
