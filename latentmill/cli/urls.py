"""`latentmill urls inspect|prefilter`."""

from __future__ import annotations

import json

import click

from latentmill.cli.options import Location, click_options, column_options, columns_from, config_from
from latentmill.curate.prefilter import PrefilterConfig
from latentmill.progress import progress_bar


@click.group()
def urls():
    """Inspect and prefilter URL tables (parquet, csv, tsv, jsonl, or a folder of them)."""


@urls.command()
@click.argument("table", type=Location())
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
@click.argument("table", type=Location())
@click.option("-o", "--output", required=True, type=Location(), help="Output parquet of the kept rows.")
@click_options(PrefilterConfig)
@column_options
def prefilter(table, output, **kwargs):
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
    from latentmill.curate.prefilter import format_prefilter_funnel
    from latentmill.curate.prefilter import prefilter as run_prefilter
    from latentmill.curate.tables import UrlTable

    config = config_from(PrefilterConfig, kwargs, columns=columns_from(kwargs))
    with progress_bar(UrlTable.open(table, config.columns).num_rows(), "prefilter") as bar:
        funnel = run_prefilter(table, output, config, progress=bar.update)
    click.echo(format_prefilter_funnel(funnel))
    click.echo(f"wrote {output} ({funnel['kept_rows']:,} rows)")
