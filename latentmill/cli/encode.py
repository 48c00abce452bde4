"""`latentmill encode`."""

from __future__ import annotations

import click

from latentmill.cli.options import Location, click_options, config_from, overwrite_option
from latentmill.curate.encode import EncodeConfig
from latentmill.curate.executors import ExecutorConfig
from latentmill.progress import progress_bar


@click.command()
@click.argument("images", type=Location(exists=True))
@click.option("-o", "--output", required=True, type=Location(), help="Output folder of latent shards.")
@click.option(
    "--selection", type=Location(exists=True), help="Selection folder (key, keep); default: keep all."
)
@click_options(EncodeConfig)
@click_options(ExecutorConfig)
@overwrite_option
def encode(images, output, selection, overwrite, **kwargs):
    """Bucket, resize, crop and VAE-encode IMAGES into latent shards with a manifest.

    Per shard, atomic and resumable: re-run the same command after a stop and only unfinished shards
    are encoded. A folder holds latents of one VAE and one bucket set: re-running into it with other
    settings or inputs is refused unless --overwrite.

    \b
    Examples:
      latentmill encode images/ --selection selection/ -o latents-512/ --vae stabilityai/sd-vae-ft-mse --device cuda
      latentmill encode images/ -o latents-256/ --resolution 256 --flip --std
      latentmill encode images/ -o latents/ --text-encoder openclip:ViT-H-14:laion2b_s32b_b79k
      latentmill encode /shared/images/ -o /shared/latents/ --device cuda --executor ray --ray-address auto
    """
    from latentmill.curate.encode import encode as run_encode
    from latentmill.curate.encode import format_encode_summary

    executor = config_from(ExecutorConfig, kwargs)
    config = config_from(EncodeConfig, kwargs)
    with progress_bar(None, "encode", unit="img") as bar:
        manifest = run_encode(
            images, output, config, selection, progress=bar.update, executor=executor, overwrite=overwrite
        )
    click.echo(format_encode_summary(manifest, output))
