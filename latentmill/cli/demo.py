"""`latentmill demo`."""

from __future__ import annotations

import click


@click.command()
@click.option("-w", "--work", default="demo-work", show_default=True, type=click.Path(), help="Work folder.")
@click.option("--steps", type=int, help="Training steps (default: the demo recipe's 200).")
def demo(work, steps):
    """Run the whole pipeline offline on bundled sample images with tiny models.

    A loopback server serves scikit-image photographs and generated pictures (some watermarked, some too
    small, some broken links); the `demo` recipe prefilters, downloads with img2dataset, scores with a
    tiny CLIP model, selects, encodes with a tiny VAE, trains a tiny U-Net and writes sample grids.
    No network is needed. Re-running continues a stopped demo.

    \b
    Example:
      latentmill demo --work demo-work
    """
    from latentmill.demo import run_demo

    run_demo(work, log=click.echo, overrides=[f"train.steps={steps}"] if steps else [])
    click.echo(f"done: open {work}/report/index.html (summary in {work}/report/demo.json)")
