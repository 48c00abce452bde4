"""`latentmill latents verify`."""

from __future__ import annotations

import click

from latentmill.cli.options import Location
from latentmill.progress import progress_bar


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
