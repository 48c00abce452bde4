"""`latentmill demo`."""

from __future__ import annotations

import click


@click.command()
@click.option("-w", "--work", default="demo-work", show_default=True, type=click.Path(), help="Work folder.")
@click.option("--processes", default=2, show_default=True, help="Download processes.")
def demo(work, processes):
    """Run the pipeline offline on bundled sample images (scikit-image photos and generated pictures).

    A loopback server serves the samples, including broken links; the demo prefilters the URL table,
    downloads it with img2dataset and checks the image shards. No network is needed.

    \b
    Example:
      latentmill demo --work demo-work
    """
    from latentmill.demo import run_demo

    result = run_demo(work, log=click.echo, processes=processes)
    click.echo(f"done: {result['image_shards']['samples']} images in {work}/images; summary in {work}/report/demo.json")
