"""`latentmill latents verify`."""

from __future__ import annotations

import click

from latentmill.cli.options import Location, click_options, config_from
from latentmill.progress import progress_bar
from latentmill.train.textstates import TextStatesConfig


@click.group()
def latents():
    """Check latent shards (what `latentmill encode` wrote).

    \b
    Example:
      latentmill latents verify latents-512/
    """


@latents.command()
@click.argument("folder", type=Location(exists=True))
def verify(folder):
    """Every shard against the manifest: present, its sha256, its sample count, every sample readable.

    Exit 0 when all hold, 2 with the list of problems otherwise (copy a shard again, or run the same
    `latentmill encode` again: it checks each done shard against its stats and redoes the damaged ones).

    \b
    Example:
      latentmill latents verify latents-512/
    """
    from latentmill.curate.latentverify import verify_latents
    from latentmill.errors import InputError

    with progress_bar(None, "verify", unit="shard") as bar:
        report = verify_latents(folder, progress=bar.update)
    if report["problems"]:
        for problem in report["problems"]:
            click.echo(f"  {problem}", err=True)
        raise InputError(
            f"{folder}: {len(report['problems'])} problem(s) in {report['shards']} shard(s), listed above."
        )
    click.echo(
        f"{folder}: {report['shards']} shard(s), {report['samples']:,} samples: all match the manifest."
    )


@click.command("encode-text")
@click.argument("latents", type=Location(exists=True))
@click.option("-o", "--output", required=True, type=Location(), help="The text-state folder to write.")
@click_options(TextStatesConfig)
def encode_text(latents, output, **options):
    """Store each caption's text states beside a latent folder, for `train --text-states`.

    One shard of states per latent shard, keyed like the latents, made by the family's pipeline's own
    text encoders (SDXL's CLIPs; SD3's CLIPs and T5; Flux's CLIP and T5). Run it again after captions
    change: only the shards whose captions changed are encoded again; the latents are not touched.

    \b
    Example:
      latentmill encode-text latents-512/ -o text-512/ --model black-forest-labs/FLUX.1-dev
      latentmill train latents-512/ --text-states text-512/ --model black-forest-labs/FLUX.1-dev -o runs/flux
    """
    from latentmill.train.textstates import encode_text_states

    config = config_from(TextStatesConfig, options)
    with progress_bar(None, "encode-text", unit="caption") as bar:
        totals = encode_text_states(latents, output, config, progress=bar.update)
    click.echo(
        f"{output}: {totals['encoded']} shard(s) encoded ({totals['captions']:,} captions), "
        f"{totals['skipped']} already up to date."
    )
