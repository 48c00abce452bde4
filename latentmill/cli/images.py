"""`latentmill images inspect` and `images pack`."""

from __future__ import annotations

import json

import click

from latentmill.cli.options import Location, click_options, config_from, overwrite_option
from latentmill.curate.pack import PackConfig


@click.group()
def images():
    """Look inside image shards (img2dataset's WebDataset output)."""


@images.command()
@click.argument("folder", type=Location(exists=True))
@click.option("--decode", is_flag=True, help="Decode every image and count the ones that fail, by reason.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def inspect(folder, decode, as_json):
    """Samples per shard, damaged shards and (with --decode) images that do not decode.

    \b
    Example:
      latentmill images inspect images/ --decode
    """
    from latentmill.curate.imageshards import inspect_image_shards, list_image_shards
    from latentmill.errors import InputError

    if not list_image_shards(folder):
        raise InputError(f"{folder}: no .tar image shards here. Make them with `latentmill download`.")
    report = inspect_image_shards(folder, decode=decode)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for shard in report["shards"]:
        damage = f"  DAMAGED: {shard['damage']}" if shard["damaged"] else ""
        click.echo(
            f"{shard['shard']:<12}{shard['samples']:>8} samples  {shard['incomplete']:>4} incomplete{damage}"
        )
    click.echo(
        f"total: {report['samples']:,} samples in {len(report['shards'])} shard(s), "
        f"{report['damaged_shards']} damaged, {report['incomplete']} incomplete"
    )
    for reason, keys in report.get("decode_errors", {}).items():
        click.echo(f"  not decodable ({reason}): {len(keys)}  e.g. {', '.join(keys[:3])}")


@images.command()
@click.argument("folder", type=Location(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=Location(), help="Folder for the image shards.")
@click_options(PackConfig)
@overwrite_option
def pack(folder, output, overwrite, **kwargs):
    """Pack a folder of images (jpg, png, webp; captions in NAME.txt beside them, or --caption) into image
    shards in img2dataset's layout, for `score`, `select` and `encode`. Resumable.

    \b
    Examples:
      latentmill images pack dog-photos/ -o dog-shards/ --caption "a photo of sks dog"
      latentmill images pack class-images/ -o class-shards/
    """
    from latentmill.curate.pack import format_pack_summary, pack_images

    totals = pack_images(folder, output, config_from(PackConfig, kwargs), overwrite=overwrite)
    click.echo(f"{format_pack_summary(totals)} into {output}")
