"""`latentmill report`."""

from __future__ import annotations

import click

from latentmill.cli.options import Location


@click.command()
@click.argument("work", type=Location(exists=True))
@click.option("-o", "--output", type=Location(), help="HTML file (default: WORK/report/index.html).")
def report(work, output):
    """One self-contained HTML page of WORK: funnel, score histograms, buckets, thumbnails, loss, samples.

    \b
    Example:
      latentmill report demo-work && xdg-open demo-work/report/index.html
    """
    from latentmill.report import build_report

    click.echo(f"wrote {build_report(work, output)}")
