"""`latentmill encode`."""

from __future__ import annotations

import click

from latentmill.cli.options import POSITIVE, executor_from, executor_options, progress_bar


@click.command()
@click.argument("images", type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder of latent shards.")
@click.option("--selection", type=click.Path(exists=True), help="Selection folder (key, keep); default: keep all.")
@click.option("--vae", default="tiny", show_default=True,
              help="Diffusers model id or local folder, or an architecture with random weights: tiny, sd15.")
@click.option("--resolution", default=512, show_default=True, type=POSITIVE, help="Bucket area is at most RESOLUTION² px.")
@click.option("--min-side", type=POSITIVE, help="Smallest bucket side (default: resolution / 2).")
@click.option("--max-side", type=POSITIVE, help="Largest bucket side (default: resolution * 2).")
@click.option("--step", default=64, show_default=True, type=POSITIVE, help="Bucket side step in px.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--precision", default="auto", show_default=True, help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16.")
@click.option("--batch-size", default=16, show_default=True, type=POSITIVE, help="Images per VAE call (one bucket per batch).")
@click.option("--flip", is_flag=True, help="Also store the latent of the horizontally flipped image.")
@click.option("--std", is_flag=True, help="Also store the posterior std (fresh latent samples at train time).")
@click.option("--crop", type=click.Choice(["center", "random"]), default="center", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seed for random crops.")
@click.option("--bucket-assign", type=click.Choice(["kohya", "log"]), default="kohya", show_default=True,
              help="kohya: kohya-ss's rule (nearest linear aspect ratio, nearest-pixel resize); log: nearest log "
                   "aspect ratio (symmetric between tall and wide), resize rounded up.")
@click.option("--max-upscale", default=1.0, show_default=True,
              help="Images that must be enlarged more than this to cover their bucket are dropped as too_small.")
@click.option("--text-encoder", help="Also store caption embeddings: openclip:NAME[:PRETRAINED] or a pipeline folder.")
@click.option("--workers", type=click.IntRange(min=0),
              help="Processes decoding and resizing while the VAE works (default: the cores available, at most 8; "
                   "0: decode in the encoding process). Outputs are the same bytes whatever the number.")
@executor_options
def encode(images, output, selection, vae, resolution, min_side, max_side, step, device, precision, batch_size, flip,
           std, crop, seed, bucket_assign, max_upscale, text_encoder, workers, **kwargs):
    """Bucket, resize, crop and VAE-encode IMAGES into latent shards with a manifest.

    Per shard, atomic and resumable: re-run the same command after a stop and only unfinished shards
    are encoded. A folder holds latents of one VAE and one bucket set.

    \b
    Examples:
      latentmill encode images/ --selection selection/ -o latents-512/ --vae stabilityai/sd-vae-ft-mse --device cuda
      latentmill encode images/ -o latents-256/ --resolution 256 --flip --std
      latentmill encode images/ -o latents/ --text-encoder openclip:ViT-H-14:laion2b_s32b_b79k
      latentmill encode /shared/images/ -o /shared/latents/ --device cuda --executor ray --address auto
    """
    from latentmill.curate.encode import EncodeConfig
    from latentmill.curate.encode import encode as run_encode

    config = EncodeConfig(resolution=resolution, min_side=min_side, max_side=max_side, step=step, vae=vae,
                          device=device, precision=precision, batch_size=batch_size, flip=flip, std=std, crop=crop,
                          seed=seed, bucket_assign=bucket_assign, max_upscale=max_upscale, text_encoder=text_encoder, threads=kwargs.pop("threads"),
                          workers=workers)
    with progress_bar(None, "encode", unit="img") as bar:
        manifest = run_encode(images, output, config, selection, progress=bar.update, executor=executor_from(kwargs))
    click.echo(f"{manifest['samples']:,} latents in {len(manifest['shards'])} shard(s) at {output}")
    for bucket, count in sorted(manifest["per_bucket"].items(), key=lambda kv: -kv[1]):
        click.echo(f"  {bucket:>10} {count:>8,}")
    if manifest["dropped"]:
        click.echo("dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(manifest["dropped"].items())))
