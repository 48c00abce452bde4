"""`latentmill urls inspect|prefilter`."""

from __future__ import annotations

import json

import click

from latentmill.cli.options import column_options, columns_from, progress_bar


@click.group()
def urls():
    """Inspect and prefilter URL tables (parquet, csv, tsv, jsonl, or a folder of them)."""


@urls.command()
@click.argument("table", type=click.Path())
@column_options
@click.option("--sample-rows", default=200_000, show_default=True, help="Reservoir size for percentiles.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect(table, sample_rows, as_json, **kwargs):
    """Rows, columns, nulls, duplicate URLs and metadata distributions of TABLE.

    Parquet is streamed by row group, so tables larger than memory work.

    \b
    Example:
      latentmill urls inspect laion-aesthetics.parquet
    """
    from latentmill.curate.inspect import format_report, inspect_table
    from latentmill.curate.tables import UrlTable

    columns = columns_from(kwargs)
    with progress_bar(UrlTable.open(table, columns).num_rows(), "inspect") as bar:
        report = inspect_table(table, columns, sample_rows=sample_rows, progress=bar.update)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@urls.command()
@click.argument("table", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Output parquet of the kept rows.")
@click.option("--min-side", type=int, help="Drop rows whose smaller side (WIDTH/HEIGHT) is below this, in px.")
@click.option("--max-aspect", type=float, help="Drop rows whose long/short side ratio exceeds this.")
@click.option("--min-similarity", type=float, help="Drop rows whose CLIP similarity is below this.")
@click.option("--max-pwatermark", type=float, help="Drop rows whose watermark probability exceeds this.")
@click.option("--max-punsafe", type=float, help="Drop rows whose unsafe probability exceeds this.")
@click.option("--min-aesthetic", type=float, help="Drop rows whose aesthetic score is below this.")
@click.option("--min-caption-chars", type=int, default=3, show_default=True,
              help="Drop captions shorter than this after trimming (0: keep empty captions).")
@click.option("--keep-duplicates", is_flag=True, help="Do not drop repeated URLs.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="HOST:PORT",
              help="Keep URLs of this one loopback/private host and port (repeatable), e.g. your own test server "
                   "127.0.0.1:8765; every other private address is still dropped.")
@column_options
def prefilter(table, output, min_side, max_aspect, min_similarity, max_pwatermark, max_punsafe, min_aesthetic,
              min_caption_chars, keep_duplicates, allow_hosts, **kwargs):
    """Filter TABLE on its metadata before downloading, and print the funnel.

    Each rule runs only when asked for and its column exists (asking for one whose column is missing is
    an error). Invalid and non-http(s) URLs, private addresses, short captions and repeated URLs are
    always dropped. Every column is carried to the output. The funnel is also written as
    OUTPUT.funnel.json and the dropped rows, with their reason, as OUTPUT.dropped.parquet.

    \b
    Example (Stable Diffusion v1's cuts on LAION metadata):
      latentmill urls prefilter laion.parquet -o kept.parquet \\
          --min-side 512 --max-pwatermark 0.5 --min-aesthetic 5
    """
    from latentmill.curate.prefilter import PrefilterConfig, format_prefilter_funnel
    from latentmill.curate.prefilter import prefilter as run_prefilter
    from latentmill.curate.tables import UrlTable

    config = PrefilterConfig(
        min_side_px=min_side, max_aspect=max_aspect, min_similarity=min_similarity,
        max_pwatermark=max_pwatermark, max_punsafe=max_punsafe, min_aesthetic=min_aesthetic,
        min_caption_chars=min_caption_chars, dedupe_urls=not keep_duplicates,
        allow_hosts=tuple(allow_hosts), columns=columns_from(kwargs),
    )
    with progress_bar(UrlTable.open(table, config.columns).num_rows(), "prefilter") as bar:
        funnel = run_prefilter(table, output, config, progress=bar.update)
    click.echo(format_prefilter_funnel(funnel))
    click.echo(f"wrote {output} ({funnel['kept_rows']:,} rows)")
