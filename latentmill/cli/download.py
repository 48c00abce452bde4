"""`latentmill download`."""

from __future__ import annotations

import click

from latentmill.cli.options import (
    Location,
    click_options,
    column_options,
    columns_from,
    config_from,
    overwrite_option,
)
from latentmill.curate.download import DownloadConfig


@click.command()
@click.argument("table", type=Location(), required=False)
@click.option("-o", "--output", type=Location(), help="Output folder of image shards.")
@click.option(
    "--retry-failed",
    "retry_folder",
    type=Location(),
    help="Instead of TABLE: download again the rows that failed in this image folder, into new shards.",
)
@click.option(
    "--only-reason",
    multiple=True,
    help="With --retry-failed: retry only these reasons (e.g. timeout, http_503).",
)
@click_options(DownloadConfig)
@column_options
@overwrite_option
def download(table, output, retry_folder, only_reason, overwrite, **kwargs):
    """Download the URL TABLE into WebDataset image shards with img2dataset.

    Shards are exactly img2dataset's (`{key}.jpg/.txt/.json` in `{shard}.tar`, with `{shard}.parquet`
    and `{shard}_stats.json`); every other column of TABLE is carried into the sample JSON. Re-running
    the same command resumes: finished shards are skipped.

    \b
    Examples:
      latentmill download kept.parquet -o images/ --processes 16 --http-threads 128
      latentmill download kept.parquet -o /shared/images/ --distributor ray --ray-address auto
      latentmill download --retry-failed images/ --only-reason timeout
    """
    from latentmill.curate.download import download as run_download
    from latentmill.curate.download import retry_failed
    from latentmill.curate.downloadresults import format_summary

    if bool(table) == bool(retry_folder):
        raise click.UsageError("give either TABLE (with -o) or --retry-failed FOLDER.")
    if table and not output:
        raise click.UsageError("missing -o/--output: the folder to write image shards to.")
    config = config_from(DownloadConfig, kwargs, columns=columns_from(kwargs))
    if retry_folder:
        summary = retry_failed(retry_folder, config, set(only_reason) or None)
    else:
        summary = run_download(table, output, config, overwrite=overwrite)
    click.echo(format_summary(summary))
