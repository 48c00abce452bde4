"""`latentmill report WORK`: one self-contained HTML page (images inline as data URIs) of a work folder:
the funnel from URLs to latents, score histograms with their thresholds, the fitted heads against their
labels, the bucket chart, thumbnails of kept and dropped images by reason, stored masks
(latentmill/reportmasks.py), the loss curve and the sample grids."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from latentmill.curate.latentshards import read_manifest
from latentmill.curate.records import NUMBER, read_log, read_record
from latentmill.curate.storage import location, read_parquet, write_bytes
from latentmill.errors import InputError
from latentmill.layout import Layout
from latentmill.reportevals import eval_section
from latentmill.reporthtml import Markup, concat, figure, html, image, page
from latentmill.reportmasks import mask_section
from latentmill.reportruns import runs_section, settings_section
from latentmill.reporttokens import token_section

THUMBS_PER_GROUP = 8


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _figure_uri(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return _png_uri(buffer.getvalue())


def _record(path: Path, **fields) -> dict:
    """A stage's JSON record (a funnel, a summary, a fit) with `fields`: a damaged one is an InputError
    naming it, since a report built around it would show wrong numbers."""
    return read_record(path, fix="run the stage that wrote it again with --overwrite", fields=fields)


def funnel_rows(work: Path) -> list[tuple[str, int]]:
    """(stage, rows remaining) from URLs to latents."""
    rows, lay = [], Layout(work)
    from latentmill.reportruns import folder_input

    if (packed := folder_input(lay)) is not None:  # a folder source: the images that went in
        rows.append(("images in the folder", packed))
    prefilter = lay.kept_funnel
    if prefilter.exists():
        f = _record(prefilter, input_rows=int, kept_rows=int)
        rows += [("URLs", f["input_rows"]), ("after prefilter", f["kept_rows"])]
    summary = lay.download_summary
    if summary.exists():
        rows.append(("downloaded", _record(summary, success=int)["success"]))
    selection = lay.select_funnel
    if selection.exists():
        rows.append(("selected", _record(selection, kept=int)["kept"]))
    for resolution, latents in lay.latent_folders().items():
        if (latents / "manifest.json").exists():
            rows.append((f"latents ({resolution} px)", read_manifest(latents).get("samples", 0)))
    return rows


def _funnel_chart(rows) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)))
    labels = [r[0] for r in rows][::-1]
    values = [r[1] for r in rows][::-1]
    ax.barh(labels, values, color="#4C72B0")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:,}", va="center", fontsize=8)
    ax.set_xlabel("images / rows")
    fig.tight_layout()
    return _figure_uri(fig)


def _loss_chart(log: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [
        e for e in read_log(log) if isinstance(e.get("loss"), NUMBER) and not isinstance(e["loss"], bool)
    ]
    if not entries:
        return None
    # the loss, and beside it what drives it: the learning rate (warm-up, schedule) and the gradient norm
    curves = [k for k in ("lr", "grad_norm") if any(isinstance(e.get(k), NUMBER) for e in entries)]
    fig, axes = plt.subplots(1, 1 + len(curves), figsize=(7 + 3.5 * len(curves), 3), squeeze=False)
    ax = axes[0][0]
    for side, key in zip(axes[0][1:], curves, strict=True):
        points = [e for e in entries if isinstance(e.get(key), NUMBER)]
        side.plot([e["step"] for e in points], [e[key] for e in points], color="#8172B2", linewidth=1)
        side.set_xlabel("step")
        side.set_ylabel({"lr": "learning rate", "grad_norm": "gradient norm (before clipping)"}[key])
    for key, color in (("instance_loss", "#DD8452"), ("prior_loss", "#937860")):  # DreamBooth's terms
        terms = [e for e in entries if isinstance(e.get(key), NUMBER)]
        if terms:
            ax.plot([e["step"] for e in terms], [e[key] for e in terms], color=color, linewidth=1, label=key)
    ax.plot(
        [e["step"] for e in entries], [e["loss"] for e in entries], color="#C44E52", linewidth=1, label="loss"
    )
    for key, color in (("val_loss", "#4C72B0"), ("val_loss_ema", "#55A868")):  # train --eval-every
        held = [e for e in entries if isinstance(e.get(key), (int, float))]
        if held:
            ax.plot(
                [e["step"] for e in held], [e[key] for e in held], "o-", color=color, markersize=3, label=key
            )
            ax.legend(fontsize=8)
    if len(ax.get_lines()) > 1:
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    fig.tight_layout()
    return _figure_uri(fig)


def _head_section(work: Path) -> Markup:
    """Each head fitted in WORK/heads/: its held-out metrics, and its score against the label it learned
    from for every scored image that carries one (a cloud along the diagonal: the head learned the labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from latentmill.filters.fithead import format_metrics, labels_from_image_shards
    from latentmill.filters.heads import fitted_metadata

    body, lay = [], Layout(work)
    for path in sorted(lay.heads.glob("*.safetensors")) if lay.heads.exists() else []:
        meta = fitted_metadata(path)
        column, target, shown = meta["column"], meta.get("target"), format_metrics(meta["metrics"])
        body.append(
            html(
                "<h3>{}{}</h3><p>metrics on the held-out labels: {}</p>",
                column,
                f" from {target}" if target else "",
                shown,
            )
        )
        if not target or not lay.scores.exists():
            continue
        labels = labels_from_image_shards(lay.images, target)
        pairs = [
            (labels[k], v)
            for parquet in sorted(lay.scores.glob("*.parquet"))
            for k, v in zip(*read_parquet(parquet, columns=["key", column]).to_pydict().values(), strict=True)
            if k in labels and v is not None
        ]
        if not pairs:
            continue
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.scatter([p[0] for p in pairs], [p[1] for p in pairs], s=10, alpha=0.6, color="#4C72B0")
        low, high = min(min(p) for p in pairs), max(max(p) for p in pairs)
        ax.plot([low, high], [low, high], color="#999", linewidth=0.8, linestyle="--")
        ax.set_xlabel(f"label ({target})")
        ax.set_ylabel(f"fitted score ({column})")
        ax.set_title(f"{column}: {len(pairs)} images")
        fig.tight_layout()
        body.append(image(f"{column} against {target}", _figure_uri(fig)))
    return concat(body)


def _thumbnail_uri(sample) -> str | None:
    from latentmill.curate.imageshards import ImageDecodeError

    try:
        image = sample.image(draft_size=(128, 128))
    except ImageDecodeError:
        return None
    image.thumbnail((128, 128))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return _png_uri(buffer.getvalue())


def _dedup_section(lay: Layout, groups_shown: int = 5) -> Markup:
    """A few groups of duplicates: the kept image first, then its duplicates with their similarity."""

    from latentmill.curate.imageshards import iter_image_shard, list_image_shards

    funnel = _record(lay.dedup / "funnel.json")  # its values shown as text, escaped
    groups: dict[str, list[tuple[str, float]]] = {}
    for path in sorted(lay.dedup.glob("*.parquet")):
        table = read_parquet(path).to_pydict()
        for key, kept, similarity in zip(
            table["key"], table["duplicate_of"], table["similarity"], strict=True
        ):
            if kept is not None and (kept in groups or len(groups) < groups_shown):
                groups.setdefault(kept, []).append((key, similarity))
    wanted = set(groups) | {k for members in groups.values() for k, _ in members}
    uris = {}
    for shard in list_image_shards(lay.images) if lay.images.exists() else []:
        for sample in iter_image_shard(shard):
            if sample.key in wanted:
                uris[sample.key] = _thumbnail_uri(sample)
    body = [
        html(
            "<p>{} duplicates in {} groups (cosine >= {}, kept: the highest {}, else the smallest key).</p>",
            funnel.get("duplicates"),
            funnel.get("groups"),
            funnel.get("threshold"),
            funnel.get("keep"),
        )
    ]
    for kept, members in groups.items():
        cells = [(kept, "kept")] + [(k, f"{s:.3f}" if isinstance(s, float) else "") for k, s in members]
        figures = concat(figure(k, uris[k], f"{k} {label}") for k, label in cells if uris.get(k))
        body.append(html('<div class="grid">{}</div>', figures))
    return concat(body)


def _thumbnails(work: Path) -> dict[str, list[tuple[str, str, str]]]:
    """reason ('kept' or why dropped) -> [(key, caption, data URI)], a few of each."""

    from latentmill.curate.imageshards import iter_image_shard, list_image_shards

    groups: dict[str, list] = {}
    lay = Layout(work)
    for shard in list_image_shards(lay.images):
        selection = lay.selection / f"{shard.stem}.parquet"
        reasons = {}
        if selection.exists():
            table = read_parquet(selection).to_pylist()
            reasons = {r["key"]: ("kept" if r["keep"] else r["reason"]) for r in table}
        for sample in iter_image_shard(shard):
            group = reasons.get(sample.key, "kept")
            if len(groups.setdefault(group, [])) >= THUMBS_PER_GROUP:
                continue
            uri = _thumbnail_uri(sample)
            if uri:
                groups[group].append((sample.key, sample.caption or "", uri))
    return groups


TINY_MODELS_NOTE = Markup(
    "<p><b>What these grids can and cannot show.</b> The U-Net here is the tiny architecture, trained for a "
    "few hundred steps on the selected pictures (a few dozen) on a CPU; the VAE is the tiny one, fitted for "
    "a minute on the same pictures. After training, the grids show soft blobs and colour fields in the "
    "palette of the training pictures, where an untrained U-Net gives noise: that is the trainer learning "
    "the data's colours and layout. They cannot show objects, sharp edges or prompts being followed; that "
    "needs real models (sd15 or a pretrained pipeline), millions of images and GPU-days.</p>"
)


def _vae_section(folder: Path) -> Markup:
    numbers = ("steps", "pictures", "psnr_random_init_db", "psnr_fitted_db", "scaling_factor")
    fit = _record(folder / "fit.json", **dict.fromkeys(numbers, NUMBER))
    return html(
        "<p>Top row: held-out pictures; bottom row: the VAE's reconstructions (8x downsampled to 4 latent "
        "channels and back). Fitted for {} CPU steps on {} selected pictures: reconstruction PSNR {} dB with "
        "random weights, {} dB fitted; latent scaling factor {}. Colours and shapes survive, fine detail does "
        "not.</p>{}",
        fit["steps"], fit["pictures"], fit["psnr_random_init_db"], fit["psnr_fitted_db"], fit["scaling_factor"],
        image("VAE reconstructions", _png_uri((folder / "reconstructions.png").read_bytes())),
    )  # fmt: skip


def build_report(work: str | Path, output: str | Path | None = None) -> Path:
    """Write WORK/report/index.html (or `output`); return its path."""
    work = location(work)
    lay = Layout(work)
    if not lay.urls.exists() and not lay.images.exists():
        raise InputError(
            f"{work}: not a latentmill work folder (no urls/ or images/). Run `latentmill run RECIPE -w {work}`."
        )
    sections = [(i, title, make(lay)) for i, title, make in SECTIONS]
    sections = [(i, title, body) for i, title, body in sections if body is not None]
    text = page(work.name, str(work), sections)
    output = location(output) if output else lay.report / "index.html"
    write_bytes(output, text.encode())
    return output


def _funnel_section(lay: Layout) -> Markup:
    rows = funnel_rows(lay.work)
    table = concat(html("<tr><td>{}</td><td>{:,}</td></tr>", n, v) for n, v in rows)
    body = [html('<table class="funnel">{}</table>', table)]
    if rows:
        body.append(image("funnel", _funnel_chart(rows)))
    from latentmill.reportruns import rules_table

    if (rules := rules_table(lay)) is not None:
        body.append(rules)
    if lay.download_summary.exists():
        failures = _record(lay.download_summary, failures=dict)["failures"]
        items = concat(html("<li>{}: {}</li>", k, v) for k, v in failures.items())
        body.append(html("<h3>Download failures</h3><ul>{}</ul>", items))
    return concat(body)


def _score_section(lay: Layout) -> Markup:
    plots = sorted((lay.selection / "plots").glob("*.png")) if (lay.selection / "plots").exists() else []
    return concat(figure(p.stem, _png_uri(p.read_bytes()), p.stem) for p in plots) or Markup(
        "<p>No scores yet.</p>"
    )


def _bucket_section(lay: Layout) -> Markup:
    from latentmill.curate.buckets import make_buckets
    from latentmill.curate.bucketstats import bucket_distribution, plot_distribution

    latents = lay.latent_folders()
    if not (latents and lay.images.exists()):
        return Markup("<p>No latents yet.</p>")
    resolution = max(latents)
    selection = lay.selection if lay.selection.exists() else None
    manifest = latents[resolution] / "manifest.json"
    buckets = (
        [tuple(b) for b in read_manifest(latents[resolution])["buckets"]]
        if manifest.exists()
        else make_buckets(resolution)
    )  # the bucket set the latents were made with
    distribution = bucket_distribution(lay.images, buckets, selection)
    chart = plot_distribution(distribution, lay.report / f"buckets-{resolution}.png")
    return image("buckets", _png_uri(chart.read_bytes()))


def _thumbnail_section(lay: Layout) -> Markup:
    body = []
    if lay.images.exists():
        for group, items in sorted(_thumbnails(lay.work).items(), key=lambda kv: (kv[0] != "kept", kv[0])):
            cells = concat(figure(k, uri, c[:60]) for k, c, uri in items)
            title = "Kept" if group == "kept" else f"Dropped: {group}"
            body.append(html('<h3>{}</h3><div class="grid">{}</div>', title, cells))
    return concat(body) or Markup("<p>No images yet.</p>")


def _loss_section(lay: Layout) -> Markup:
    body = []
    for run in lay.run_folders():
        chart = _loss_chart(run / "log.jsonl") if (run / "log.jsonl").exists() else None
        if chart:
            body.append(html("<h3>{}</h3>{}", run.name, image(f"loss {run.name}", chart)))
    return concat(body) or Markup("<p>No training yet.</p>")


def _samples_section(lay: Layout) -> Markup:
    body = []
    for run in lay.run_folders():
        for grid in sorted((run / "samples").glob("*.png")) if (run / "samples").exists() else []:
            from latentmill.train.gridcaptions import grid_captions

            prompts = "; ".join(f"{c['prompt']} (seed {c['seed']})" for c in grid_captions(grid) or [])
            caption = f"{run.name} {grid.stem}" + (f": {prompts}" if prompts else "")
            body.append(html('<figure class="wide"><img alt="{}" src="{}"><figcaption>{}</figcaption></figure>',
                             grid.stem, _png_uri(grid.read_bytes()), caption))  # fmt: skip
    body = concat(body) or Markup("<p>No sample grids yet.</p>")
    if (lay.vae / "fit.json").exists():  # the demo's tiny models: say what their grids can show
        body = TINY_MODELS_NOTE + body
    return body


# (id, title, section maker): a maker returns the section's HTML, or None to leave the section out
SECTIONS = (
    ("funnel", "Funnel: from URLs to latents", _funnel_section),
    ("scores", "Score histograms and thresholds", _score_section),
    (
        "heads",
        "Fitted heads against their labels",
        lambda lay: _head_section(lay.work) or Markup("<p>No fitted heads.</p>"),
    ),
    ("buckets", "Aspect buckets", _bucket_section),
    ("thumbnails", "Kept and dropped images", _thumbnail_section),
    ("masks", "Loss and inpainting masks", mask_section),
    ("tokens", "Learned tokens: their nearest words", token_section),
    (
        "dedup",
        "Duplicate groups",
        lambda lay: _dedup_section(lay) if (lay.dedup / "funnel.json").exists() else None,
    ),
    (
        "vae",
        "The demo's VAE: originals and reconstructions",
        lambda lay: _vae_section(lay.vae) if (lay.vae / "fit.json").exists() else None,
    ),
    ("runs", "Training runs: steps, resumes, replaced runs", runs_section),
    ("loss", "Training loss, learning rate and gradient norm", _loss_section),
    ("evals", "Evaluation: CLIP score, FID, KID", eval_section),
    ("samples", "Sample grids", _samples_section),
    ("settings", "The resolved settings of every stage", settings_section),
)
