"""`latentmill select`."""

from __future__ import annotations

import click

from latentmill.cli.options import Location, click_options, config_from
from latentmill.filters.select import SelectConfig


@click.command()
@click.argument("scores", type=Location(exists=True))
@click.option("-o", "--output", required=True, type=Location(), help="Output folder of selection parquets.")
@click_options(SelectConfig)
def select(scores, output, **kwargs):
    """Apply thresholds to the scores; write selection parquets (key, keep, reason) and print the funnel.

    Rules run in order (preset, options, then each --where); a row's reason is the first rule it fails.

    \b
    Examples:
      latentmill select scores/ -o selection/ --preset sd-v1
      latentmill select scores/ -o selection/ --where "aesthetic >= 6 and pwatermark < 0.5" --min-side 512
    """
    from latentmill.filters.select import format_select_funnel
    from latentmill.filters.select import select as run_select

    funnel = run_select(scores, output, config_from(SelectConfig, kwargs))
    click.echo(format_select_funnel(funnel))
    if funnel.get("plots"):
        click.echo(f"histograms: {output}/plots/")
