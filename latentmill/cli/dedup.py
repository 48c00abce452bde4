"""`latentmill dedup`."""

from __future__ import annotations

import click

from latentmill.cli.options import Location, click_options, config_from
from latentmill.curate.executors import ExecutorConfig
from latentmill.filters.dedup import DedupConfig


@click.command()
@click.argument("scores", type=Location(exists=True))
@click.option(
    "-o", "--output", required=True, type=Location(), help="Output folder: {shard}.parquet and funnel.json."
)
@click.option(
    "--images", type=Location(exists=True), help="The image shards: also group byte-identical images."
)
@click_options(DedupConfig)
@click_options(ExecutorConfig)
def dedup(scores, output, images, **kwargs):
    """Find near-duplicate images from the CLIP embeddings `score --save-embeddings` saved beside SCORES.

    k-means on a sample, every embedding assigned to its nearest clusters, pairs compared only within a
    cluster; in each group of duplicates the image with the highest --keep score (default aesthetic) is
    kept, or the smallest key. Writes OUTPUT/{shard}.parquet (key, duplicate_of, similarity) and the
    funnel; `select --dedup OUTPUT` drops the duplicates. Resumable; --executor ray spreads the passes.

    \b
    Examples:
      latentmill dedup scores/ -o dedup/ --threshold 0.95 --images images/
      latentmill select scores/ -o selection/ --preset laion-aesthetics-v2-6plus --dedup dedup/
    """
    from latentmill.filters.dedup import dedup as run_dedup
    from latentmill.filters.dedup import format_dedup_funnel
    from latentmill.progress import progress_bar

    executor = config_from(ExecutorConfig, kwargs)
    config = config_from(DedupConfig, kwargs)
    with progress_bar(None, "dedup", unit="part") as bar:
        funnel = run_dedup(scores, output, config, images=images, executor=executor, progress=bar.update)
    click.echo(format_dedup_funnel(funnel))
