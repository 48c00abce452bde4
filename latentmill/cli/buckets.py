"""`latentmill buckets`."""

from __future__ import annotations

import json

import click

from latentmill.cli.options import Location, click_options, config_from
from latentmill.curate.encode import EncodeConfig


@click.command()
@click_options(
    EncodeConfig, only=("resolution", "bucket_min_side", "bucket_max_side", "step", "bucket_assign")
)
@click.option(
    "--images", type=Location(exists=True), help="Image shards: show how they fall into the buckets."
)
@click.option(
    "--selection", type=Location(exists=True), help="With --images: count only the selected images."
)
@click.option(
    "--plot", type=Location(), help="With --images: write a bar chart PNG here (default: buckets.png)."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON: the bucket list, or the distribution.")
def buckets(images, selection, plot, as_json, **kwargs):
    """Print the aspect-ratio buckets for a resolution, or how a dataset falls into them.

    The kohya-ss / NovelAI scheme: widths from min to max side in steps, each with the largest height
    (a multiple of the step) that keeps the area within RESOLUTION²; transposes and the square.

    \b
    Examples:
      latentmill buckets --resolution 512
      latentmill buckets --resolution 1024 --json
      latentmill buckets --resolution 512 --images images/ --selection selection/ --plot buckets.png
    """
    config = config_from(EncodeConfig, kwargs)
    resolution, bucket_list = config.resolution, config.buckets()
    if not images:
        if as_json:
            click.echo(json.dumps([list(b) for b in bucket_list]))
            return
        click.echo(
            f"{len(bucket_list)} buckets for resolution {resolution} (area <= {resolution * resolution:,} px)"
        )
        click.echo(f"{'width':>6} {'height':>6} {'aspect':>7} {'pixels':>9}")
        for w, h in bucket_list:
            click.echo(f"{w:>6} {h:>6} {w / h:>7.3f} {w * h:>9,}")
        return
    from latentmill.curate.bucketstats import bucket_distribution, plot_distribution

    dist = bucket_distribution(images, bucket_list, selection, config.bucket_assign)
    if as_json:
        click.echo(json.dumps(dist, indent=2))
        return
    click.echo(f"{'bucket':>10} {'images':>8} {'share':>7} {'aspect err':>11} {'too small':>10}")
    for row in dist["buckets"]:
        if row["count"]:
            w, h = row["bucket"]
            click.echo(
                f"{f'{w}x{h}':>10} {row['count']:>8} {row['count'] / dist['images']:>7.1%} "
                f"{row['mean_aspect_error']:>11.3f} {row['smaller_than_bucket']:>10}"
            )
    click.echo(
        f"{dist['images']} images in {sum(r['count'] > 0 for r in dist['buckets'])} of {len(bucket_list)} buckets; "
        f"mean |log aspect error| {dist['mean_aspect_error']:.3f}; {dist['smaller_than_bucket']} smaller than "
        f"their bucket; {dist['unreadable']} unreadable"
    )
    path = plot_distribution(dist, plot or "buckets.png")
    click.echo(f"chart: {path}")
