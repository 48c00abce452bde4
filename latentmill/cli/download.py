"""`latentmill download`."""

from __future__ import annotations

import click

from latentmill.cli.options import COUNT, POSITIVE, Finite, column_options, columns_from


@click.command()
@click.argument("table", type=click.Path(), required=False)
@click.option("-o", "--output", type=click.Path(), help="Output folder of image shards.")
@click.option("--retry-failed", "retry_folder", type=click.Path(),
              help="Instead of TABLE: download again the rows that failed in this image folder, into new shards.")
@click.option("--only-reason", multiple=True, help="With --retry-failed: retry only these reasons (e.g. timeout, http_503).")
@click.option("--image-size", default=1024, show_default=True, type=POSITIVE,
              help="Cap on the smaller side in px (ratio kept, never upscaled); set above your largest bucket side.")
@click.option("--min-image-size", default=256, show_default=True, type=COUNT, help="Drop images whose smaller side is below this (px).")
@click.option("--max-aspect-ratio", default=4.0, show_default=True, type=Finite(min=1.0), help="Drop images more elongated than this.")
@click.option("--processes", type=POSITIVE, help="Download processes (default: CPU count, at most 16).")
@click.option("--threads", default=64, show_default=True, type=POSITIVE, help="Download threads per process.")
@click.option("--distributor", type=click.Choice(["multiprocessing", "pyspark", "ray"]), default="multiprocessing",
              show_default=True, help="img2dataset's distributor.")
@click.option("--ray-address", help="With --distributor ray: the cluster to join ('auto', or ray://HOST:10001); default: a local Ray.")
@click.option("--retries", default=2, show_default=True, type=COUNT, help="Retries per URL.")
@click.option("--timeout", default=10, show_default=True, type=POSITIVE, help="Per-request timeout in seconds.")
@click.option("--user-agent-token", default="latentmill", show_default=True,
              help="Token added to the User-Agent, so site owners can identify and opt out.")
@click.option("--shard-size", default=10_000, show_default=True, type=POSITIVE, help="Samples per shard.")
@click.option("--ignore-opt-out", is_flag=True, help="Do not honour X-Robots-Tag noai/noimageai/noindex headers.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="HOST:PORT",
              help="Allow this one loopback/private host and port (repeatable), e.g. your own test server "
                   "127.0.0.1:8765; every other private address stays refused.")
@column_options
def download(table, output, retry_folder, only_reason, image_size, min_image_size, max_aspect_ratio, processes,
             threads, distributor, ray_address, retries, timeout, user_agent_token, shard_size, ignore_opt_out,
             allow_hosts, **kwargs):
    """Download the URL TABLE into WebDataset image shards with img2dataset.

    Shards are exactly img2dataset's (`{key}.jpg/.txt/.json` in `{shard}.tar`, with `{shard}.parquet`
    and `{shard}_stats.json`); every other column of TABLE is carried into the sample JSON. Re-running
    the same command resumes: finished shards are skipped.

    \b
    Examples:
      latentmill download kept.parquet -o images/ --processes 16 --threads 128
      latentmill download kept.parquet -o /shared/images/ --distributor ray --ray-address auto
      latentmill download --retry-failed images/ --only-reason timeout
    """
    from latentmill.curate.download import DownloadConfig, format_summary, retry_failed
    from latentmill.curate.download import download as run_download

    if bool(table) == bool(retry_folder):
        raise click.UsageError("give either TABLE (with -o) or --retry-failed FOLDER.")
    if table and not output:
        raise click.UsageError("missing -o/--output: the folder to write image shards to.")
    config = DownloadConfig(
        image_size_px=image_size, min_image_size_px=min_image_size, max_aspect_ratio=max_aspect_ratio,
        threads=threads, distributor=distributor, ray_address=ray_address, retries=retries, timeout_s=timeout,
        user_agent_token=user_agent_token or None, shard_size=shard_size, honour_opt_out=not ignore_opt_out,
        allow_hosts=tuple(allow_hosts), columns=columns_from(kwargs),
    )
    if processes:
        config.processes = processes
    if retry_folder:
        summary = retry_failed(retry_folder, config, set(only_reason) or None)
    else:
        summary = run_download(table, output, config)
    click.echo(format_summary(summary))
