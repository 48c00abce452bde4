"""`latentmill demo`."""

from __future__ import annotations

import click


@click.command()
@click.option("-w", "--work", default="demo-work", show_default=True, type=click.Path(), help="Work folder.")
@click.option("--steps", type=click.IntRange(min=1), help="Training steps (default: the demo recipe's 200).")
@click.option(
    "--vae-steps",
    default=300,
    show_default=True,
    type=click.IntRange(min=1),
    help="Steps fitting the tiny VAE on the selected pictures before encoding.",
)
def demo(work, steps, vae_steps):
    """Run the whole pipeline offline on bundled sample images with tiny models.

    A loopback server serves scikit-image photographs and generated pictures (some watermarked, some too
    small, some broken links); the `demo` recipe prefilters, downloads with img2dataset, scores with a
    tiny CLIP model, selects, fits the tiny VAE for a minute on the selected pictures (so decodes are
    pictures, not noise), encodes with it, trains a tiny U-Net and writes sample grids and a report.
    No network is needed. Re-running continues a stopped demo.

    \b
    Example:
      latentmill demo --work demo-work
    """
    from latentmill.demo import run_demo

    run_demo(work, log=click.echo, overrides=[f"train.steps={steps}"] if steps else [], vae_steps=vae_steps)
    click.echo(f"done: open {work}/report/index.html (summary in {work}/report/demo.json)")
