"""`latentmill report`."""

from __future__ import annotations

import click

from latentmill.cli.options import Location


@click.command()
@click.argument("work", type=Location(exists=True))
@click.option("-o", "--output", type=Location(), help="HTML file (default: WORK/report/index.html).")
@click.option(
    "--open",
    "open_it",
    is_flag=True,
    help="Open it in a browser (a report in an object store: a local copy).",
)
def report(work, output, open_it):
    """One self-contained HTML page of WORK: funnel, score histograms, buckets, thumbnails, loss, samples.

    \b
    Example:
      latentmill report demo-work --open
      latentmill report s3://bucket/work            # written to s3://bucket/work/report/index.html
    """
    from latentmill.curate.storage import is_remote
    from latentmill.report import build_report

    written = build_report(work, output)
    click.echo(f"wrote {written}")
    if open_it:
        import webbrowser
        from pathlib import Path

        from latentmill.curate.scratch import root

        if is_remote(written):
            local = root() / f"report-{written.parent.parent.name}.html"
            local.write_bytes(written.read_bytes())
            click.echo(f"local copy: {local}")
        else:
            local = Path(written)
        webbrowser.open(local.resolve().as_uri())
