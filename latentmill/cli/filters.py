"""`latentmill score`, `fit-head` and `convert-head`."""

from __future__ import annotations

import click

from latentmill.cli.options import Location, click_options, config_from, overwrite_option
from latentmill.curate.executors import ExecutorConfig
from latentmill.filters.fithead import FitHeadConfig
from latentmill.filters.score import ScoreConfig
from latentmill.progress import progress_bar


@click.command()
@click.argument("images", type=Location(exists=True))
@click.option("-o", "--output", required=True, type=Location(), help="Output folder of score parquets.")
@click_options(ScoreConfig)
@click_options(ExecutorConfig)
@overwrite_option
def score(images, output, overwrite, **kwargs):
    """Score every image with CLIP and predictor heads: one parquet per image shard.

    \b
    Example (LAION's predictors on OpenAI ViT-L/14):
      latentmill score images/ -o scores/ --clip-model ViT-L-14-quickgelu --pretrained openai \\
          --aesthetic-head sac+logos+ava1-l14-linearMSE.pth --unsafe-head clip_autokeras_binary_nsfw.zip \\
          --watermark-head watermark_model_v1.pt --device cuda --precision bf16 --save-embeddings
    """
    from latentmill.filters.score import format_score_totals
    from latentmill.filters.score import score as run_score

    executor = config_from(ExecutorConfig, kwargs)
    config = config_from(ScoreConfig, kwargs)
    with progress_bar(None, "score", unit="img") as bar:
        totals = run_score(
            images, output, config, progress=bar.update, executor=executor, overwrite=overwrite
        )
    click.echo(format_score_totals(totals, output))


@click.command("fit-head")
@click.option(
    "--embeddings", required=True, type=Location(exists=True), help="Folder of embeddings/{shard}.npy."
)
@click.option(
    "--scores",
    type=Location(exists=True),
    help="Score folder matching the embeddings (default: ../scores).",
)
@click.option(
    "--labels",
    required=True,
    type=Location(exists=True),
    help="csv or parquet with `key` and the target, or a folder of image shards whose JSON carries it.",
)
@click.option(
    "--add-column",
    is_flag=True,
    help="Also add the head's column to the score parquets (from the saved "
    "embeddings, no pass over the images).",
)
@click.option("-o", "--output", required=True, type=Location(), help="Head file (.safetensors).")
@click_options(FitHeadConfig)
@overwrite_option
def fit_head(embeddings, scores, labels, add_column, output, overwrite, **kwargs):
    """Fit a head on labelled CLIP embeddings; print held-out metrics; save it for `score --head`.

    The recipe stage `fit_head:` runs this once per item, with the image shards as labels and
    --add-column. An existing OUTPUT is not fitted again.

    \b
    Examples (a CLIP watermark probe from 2,000 hand labels; an aesthetic head from LAION's own column):
      latentmill fit-head --embeddings embeddings/ --labels labels.csv --target watermark --kind mlp -o wm-probe.safetensors
      latentmill score images/ -o scores/ --head wm-probe.safetensors
      latentmill fit-head --embeddings embeddings/ --labels images/ --target AESTHETIC_SCORE --column aesthetic_fit \\
          --scores scores/ --add-column -o heads/aesthetic_fit.safetensors
    """
    from latentmill.filters.fithead import fit_and_add, format_metrics

    config = config_from(FitHeadConfig, kwargs)
    metrics = fit_and_add(
        config, labels, embeddings, scores, output, add_column=add_column, overwrite=overwrite
    )
    click.echo(f"{config.kind} head: {format_metrics(metrics)}")
    click.echo(
        f"saved {output} (column {metrics['column']})" + (", added to the scores" if add_column else "")
    )


@click.command("convert-head")
@click.argument("kind", type=click.Choice(["laion-nsfw"]))
@click.argument("source", type=Location(exists=True))
@click.option("-o", "--output", required=True, type=Location(), help="Head file to write (.safetensors).")
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

    from latentmill.errors import InputError
    from latentmill.filters.unsafehead import read_laion_nsfw, save_keras_nsfw

    if Path(output).suffix != ".safetensors":
        raise InputError(
            f"-o {output}: the converted head is a .safetensors file; name it e.g. punsafe.safetensors."
        )
    model = read_laion_nsfw(Path(source))
    save_keras_nsfw(model, output)
    lookups = ", ".join(f"{c} ({len(t):,} values)" for c, t in sorted(model.lookups.items()))
    click.echo(
        f"{source}: {model.input_dim}-d input, categorical columns {lookups or 'none'}, dense "
        f"{' -> '.join(str(w.shape[0]) for w, _ in model.dense)}, {model.activations[-1]} output -> {output}"
    )
