"""`latentmill score`, `select`, `fit-head` and `convert-head`."""

from __future__ import annotations

import click

from latentmill.cli.options import (
    COUNT,
    POSITIVE,
    POSITIVE_FLOAT,
    Finite,
    executor_from,
    executor_options,
    progress_bar,
)


@click.command()
@click.argument("images", type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder of score parquets.")
@click.option("--clip-model", default="ViT-L-14-quickgelu", show_default=True, help="open_clip model name.")
@click.option("--pretrained", default="openai", show_default=True,
              help="open_clip pretrained tag, a local checkpoint file, or 'none' (random weights).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--batch-size", default=64, show_default=True, type=POSITIVE)
@click.option("--workers", default=2, show_default=True, type=COUNT, help="DataLoader workers decoding images.")
@click.option("--aesthetic-head", type=click.Path(), help="LAION aesthetic predictor (v2 MLP or v1 linear) state dict.")
@click.option("--unsafe-head", type=click.Path(),
              help="LAION's CLIP-based NSFW detector: its published zip (clip_autokeras_binary_nsfw.zip, "
                   "clip_autokeras_nsfw_b32.zip), a `convert-head` output, h14_nsfw.pth, or the PyTorch port.")
@click.option("--watermark-head", type=click.Path(), help="LAION-5B watermark detector (efficientnet_b3a) weights.")
@click.option("--head", "fitted_heads", multiple=True, type=click.Path(), help="A head made by `latentmill fit-head`.")
@click.option("--save-embeddings", is_flag=True, help="Also write embeddings/{shard}.npy beside the output.")
@click.option("--exact-decode", is_flag=True,
              help="Decode JPEGs at full size for CLIP too (default: a reduced-scale draft decode for CLIP alone; "
                   "the watermark head always gets the full decode its authors used).")
@executor_options
def score(images, output, clip_model, pretrained, device, precision, batch_size, workers, aesthetic_head, unsafe_head,
          watermark_head, fitted_heads, save_embeddings, exact_decode, **kwargs):
    """Score every image with CLIP and predictor heads: one parquet per image shard.

    \b
    Example (LAION's predictors on OpenAI ViT-L/14):
      latentmill score images/ -o scores/ --clip-model ViT-L-14-quickgelu --pretrained openai \\
          --aesthetic-head sac+logos+ava1-l14-linearMSE.pth --unsafe-head clip_autokeras_binary_nsfw.zip \\
          --watermark-head watermark_model_v1.pt --device cuda --precision bf16 --save-embeddings
    """
    from latentmill.filters.score import ScoreConfig
    from latentmill.filters.score import score as run_score

    config = ScoreConfig(clip_model=clip_model, pretrained=pretrained, device=device, precision=precision,
                         batch_size=batch_size, workers=workers, aesthetic_head=aesthetic_head, unsafe_head=unsafe_head,
                         watermark_head=watermark_head, fitted_heads=list(fitted_heads), save_embeddings=save_embeddings,
                         threads=kwargs.pop("threads"), exact_decode=exact_decode)
    with progress_bar(None, "score", unit="img") as bar:
        totals = run_score(images, output, config, progress=bar.update, executor=executor_from(kwargs))
    errors = {k[6:]: v for k, v in totals.items() if k.startswith("error:")}
    click.echo(f"scored {totals['scored']:,} of {totals['images']:,} images in {totals['shards']} shard(s) -> {output}"
               + (f"; not decodable: {errors}" if errors else ""))
    click.echo("decode: " + ", ".join(f"{branch} {mode}" for branch, mode in totals["decode"].items()))


@click.command()
@click.argument("scores", type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder of selection parquets.")
@click.option("--preset", help="Published cuts: laion-aesthetics-v2-5plus, -6plus, -6.5plus, sd-v1.")
@click.option("--min-aesthetic", type=Finite())
@click.option("--max-pwatermark", type=Finite())
@click.option("--max-punsafe", type=Finite())
@click.option("--min-similarity", type=Finite(), help="Minimum CLIP image-caption cosine (LAION used 0.28 on ViT-B/32).")
@click.option("--min-side", type=POSITIVE, help="Minimum decoded smaller side, px.")
@click.option("--min-area", type=POSITIVE, help="Minimum decoded area, px.")
@click.option("--max-aspect", type=Finite(min=1.0), help="Maximum long/short side ratio.")
@click.option("--where", multiple=True, help='A rule such as "aesthetic >= 6 and pwatermark < 0.5" (repeatable).')
@click.option("--no-plots", is_flag=True, help="Skip the histogram PNGs.")
def select(scores, output, preset, min_aesthetic, max_pwatermark, max_punsafe, min_similarity, min_side, min_area,
           max_aspect, where, no_plots):
    """Apply thresholds to the scores; write selection parquets (key, keep, reason) and print the funnel.

    Rules run in order (preset, options, then each --where); a row's reason is the first rule it fails.

    \b
    Examples:
      latentmill select scores/ -o selection/ --preset sd-v1
      latentmill select scores/ -o selection/ --where "aesthetic >= 6 and pwatermark < 0.5" --min-side 512
    """
    from latentmill.filters.select import format_select_funnel
    from latentmill.filters.select import select as run_select

    thresholds = {"min_aesthetic": min_aesthetic, "max_pwatermark": max_pwatermark, "max_punsafe": max_punsafe,
                  "min_similarity": min_similarity, "min_side": min_side, "min_area": min_area, "max_aspect": max_aspect}
    funnel = run_select(scores, output, thresholds, list(where), preset, plots=not no_plots)
    click.echo(format_select_funnel(funnel))
    if funnel.get("plots"):
        click.echo(f"histograms: {output}/plots/")


@click.command("fit-head")
@click.option("--embeddings", required=True, type=click.Path(exists=True), help="Folder of embeddings/{shard}.npy.")
@click.option("--scores", type=click.Path(exists=True), help="Score folder matching the embeddings (default: ../scores).")
@click.option("--labels", required=True, type=click.Path(exists=True), help="csv or parquet with `key` and the target.")
@click.option("--target", required=True, help="Label column to fit.")
@click.option("--kind", type=click.Choice(["linear", "mlp"]), default="linear", show_default=True)
@click.option("--column", help="Score column the head will write (default: the target's name).")
@click.option("--validation-fraction", default=0.2, show_default=True, type=Finite(0.0, 1.0, min_open=True, max_open=True))
@click.option("--epochs", default=300, show_default=True, type=POSITIVE, help="AdamW epochs (classifiers and MLPs).")
@click.option("--alpha", type=POSITIVE_FLOAT, help="Ridge penalty of a linear regressor (default: chosen by 5-fold CV).")
@click.option("--seed", default=0, show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(), help="Head file (.safetensors).")
def fit_head(embeddings, scores, labels, target, kind, column, validation_fraction, epochs, alpha, seed, output):
    """Fit a head on labelled CLIP embeddings; print held-out metrics; save it for `score --head`.

    \b
    Example (a CLIP watermark probe from 2,000 hand labels):
      latentmill fit-head --embeddings embeddings/ --labels labels.csv --target watermark --kind mlp -o wm-probe.safetensors
      latentmill score images/ -o scores/ --head wm-probe.safetensors
    """
    from latentmill.filters.fit import FitConfig, format_metrics, labelled_embeddings, read_labels, save_head
    from latentmill.filters.fit import fit_head as run_fit
    from latentmill.filters.heads import check_column

    check_column(column or target, "--column" if column else f"--target {target} (the default column name)")
    config = FitConfig(target=target, kind=kind, column=column, validation_fraction=validation_fraction, epochs=epochs,
                       seed=seed, alpha=alpha)
    x, y = labelled_embeddings(embeddings, read_labels(labels, target), scores, source=labels)
    module, metrics = run_fit(x, y, config)
    save_head(module, output, config, x.shape[1], metrics)
    click.echo(f"{kind} head on {x.shape[1]}-d embeddings: {format_metrics(metrics)}")
    click.echo(f"saved {output} (column {config.column or target})")


@click.command("convert-head")
@click.argument("kind", type=click.Choice(["laion-nsfw"]))
@click.argument("source", type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="Head file to write (.safetensors).")
def convert_head(kind, source, output):
    """Convert LAION's published NSFW detector (a Keras SavedModel zip) to one safetensors file.

    No TensorFlow needed: the checkpoint, the vocabularies of its categorical columns and the layer
    sequence are read from the SavedModel's files. `score --unsafe-head` takes the output (or the zip).

    \b
    Example:
      latentmill convert-head laion-nsfw clip_autokeras_binary_nsfw.zip -o punsafe-l14.safetensors
      latentmill score images/ -o scores/ --unsafe-head punsafe-l14.safetensors
    """
    from pathlib import Path

    from latentmill.curate.errors import InputError
    from latentmill.filters.unsafehead import read_laion_nsfw, save_keras_nsfw

    if Path(output).suffix != ".safetensors":
        raise InputError(f"-o {output}: the converted head is a .safetensors file; name it e.g. punsafe.safetensors.")
    model = read_laion_nsfw(Path(source))
    save_keras_nsfw(model, output)
    lookups = ", ".join(f"{c} ({len(t):,} values)" for c, t in sorted(model.lookups.items()))
    click.echo(f"{source}: {model.input_dim}-d input, categorical columns {lookups or 'none'}, dense "
               f"{' -> '.join(str(w.shape[0]) for w, _ in model.dense)}, {model.activations[-1]} output -> {output}")
