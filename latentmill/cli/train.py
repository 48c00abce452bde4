"""`latentmill train` and `export`."""

from __future__ import annotations

import click

from latentmill.cli.options import COUNT, NONNEGATIVE, POSITIVE, POSITIVE_FLOAT, PROBABILITY, Finite


@click.command()
@click.argument("shards")
@click.option("-o", "--output", required=True, type=click.Path(), help="Run folder (checkpoints, log.jsonl).")
@click.option("--model", default="tiny", show_default=True, help="tiny, sd15, sd2-base, or a pretrained diffusers folder.")
@click.option("--text-encoder", help="openclip:NAME[:PRETRAINED] or a pipeline folder; default: text_emb in the shards.")
@click.option("--steps", default=1000, show_default=True, type=POSITIVE, help="Optimizer steps.")
@click.option("--batch-size", default=16, show_default=True, type=POSITIVE, help="Per rank and micro-step.")
@click.option("--grad-accum", default=1, show_default=True, type=POSITIVE)
@click.option("--lr", "learning_rate", default=1e-4, show_default=True, type=POSITIVE_FLOAT)
@click.option("--warmup-steps", default=100, show_default=True, type=COUNT)
@click.option("--schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True)
@click.option("--prediction", type=click.Choice(["epsilon", "v_prediction"]), default="epsilon", show_default=True)
@click.option("--min-snr-gamma", type=NONNEGATIVE, default=5.0, show_default=True, help="0 turns min-SNR weighting off.")
@click.option("--noise-offset", type=NONNEGATIVE, default=0.0, show_default=True)
@click.option("--caption-dropout", type=PROBABILITY, default=0.1, show_default=True)
@click.option("--size-conditioning", is_flag=True, help="SDXL-style conditioning on each image's original size and crop.")
@click.option("--ema-decay", type=PROBABILITY, default=0.9999, show_default=True)
@click.option("--mode", type=click.Choice(["resampled", "epoch"]), default="resampled", show_default=True)
@click.option("--workers", type=click.IntRange(min=0),
              help="Loader processes per rank reading shards (default: up to 4 on CUDA, with pinned memory; 0 on CPU).")
@click.option("--log-every", default=10, show_default=True, type=click.IntRange(min=1),
              help="Read the loss back from the device and log it every N steps.")
@click.option("--checkpoint-every", default=500, show_default=True, type=POSITIVE)
@click.option("--keep-checkpoints", default=3, show_default=True, type=POSITIVE)
@click.option("--resume", is_flag=True, help="Continue the run in -o from its last checkpoint, exactly.")
@click.option("--init-from", type=click.Path(exists=True), help="Start from another run's EMA weights (e.g. 256 px, then 512).")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp32"]),
              help="auto: bf16 on CUDA, fp32 on CPU. (No fp16: it would need a gradient scaler.)")
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the U-Net.")
@click.option("--seed", default=0, show_default=True)
@click.option("--sample-every", default=0, show_default=True, type=COUNT, help="Write a sample grid of fixed prompts every N steps.")
@click.option("--vae", help="VAE for sample grids; checked against the one the latents were made with.")
def train(shards, output, model, text_encoder, steps, batch_size, grad_accum, learning_rate, warmup_steps, schedule,
          prediction, min_snr_gamma, noise_offset, caption_dropout, size_conditioning, ema_decay, mode, workers, log_every, checkpoint_every, keep_checkpoints,
          resume, init_from, device, precision, gradient_checkpointing, compile_, seed, sample_every, vae):
    """Train a U-Net straight from latent shards (SHARDS: a folder, a brace pattern or a file).

    `--resume` continues a stopped run from its last checkpoint, exactly. Many GPUs: launch with torchrun.

    \b
    Examples:
      latentmill train latents-256/ -o runs/stage1 --model sd15 --text-encoder sd15-pipeline/ --steps 20000
      torchrun --nproc-per-node 8 -m latentmill train latents-512/ -o runs/stage2 --init-from runs/stage1 ...
    """
    from tqdm import tqdm

    from latentmill.train.config import TrainConfig
    from latentmill.train.loop import train as run_train

    config = TrainConfig(shards=shards, output=output, model=model, text_encoder=text_encoder, steps=steps,
                         batch_size=batch_size, grad_accum=grad_accum, learning_rate=learning_rate,
                         warmup_steps=warmup_steps, schedule=schedule, prediction=prediction,
                         min_snr_gamma=min_snr_gamma or None, noise_offset=noise_offset, caption_dropout=caption_dropout,
                         size_conditioning=size_conditioning,
                         ema_decay=ema_decay, mode=mode, workers=workers, log_every=log_every, checkpoint_every=checkpoint_every,
                         keep_checkpoints=keep_checkpoints, resume=resume, init_from=init_from, device=device, precision=precision,
                         gradient_checkpointing=gradient_checkpointing, compile=compile_, seed=seed,
                         sample_every=sample_every, vae=vae)
    with tqdm(total=steps, desc="train", unit="step", dynamic_ncols=True, leave=False) as bar:
        def progress(metrics):
            bar.n = metrics["step"]
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{metrics['samples_per_s']:.1f}")
            bar.refresh()

        metrics = run_train(config, progress=progress)
    if metrics.get("rank", 0) == 0:
        click.echo(f"step {metrics.get('step')}: loss {metrics.get('loss', float('nan')):.4f}; checkpoints in {output}/checkpoints")


@click.command()
@click.argument("run", type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="diffusers pipeline folder to write.")
@click.option("--no-ema", is_flag=True, help="Export the raw weights instead of the EMA.")
@click.option("--vae", help="VAE for the pipeline (default: the one the latents were made with).")
def export(run, output, no_ema, vae):
    """Write RUN's last checkpoint as a folder StableDiffusionPipeline.from_pretrained loads.

    \b
    Example:
      latentmill export runs/stage2 -o my-model/
    """
    from latentmill.train.export import export_pipeline

    path = export_pipeline(run, output, use_ema=not no_ema, vae=vae)
    click.echo(f"wrote {path}")


@click.command()
@click.argument("a", type=click.Path(exists=True))
@click.argument("b", type=click.Path(exists=True))
@click.option("--alpha", type=Finite(), required=True, help="Weight of B (weighted sum) or of B - BASE (add difference).")
@click.option("--base", type=click.Path(exists=True), help="Add difference: A + alpha * (B - BASE).")
@click.option("--no-ema", is_flag=True, help="Merge the raw weights instead of the EMA.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Run folder for the merged weights.")
def merge(a, b, alpha, base, no_ema, output):
    """Merge two runs (or .safetensors files): (1 - alpha) * A + alpha * B, or A + alpha * (B - BASE).

    \b
    Examples:
      latentmill merge runs/photo runs/anime --alpha 0.3 -o runs/merged
      latentmill merge runs/base-ft runs/style --base runs/base --alpha 1.0 -o runs/style-on-ft
    """
    from latentmill.train.merge import merge as run_merge

    path = run_merge(a, b, output, alpha, base, use_ema=not no_ema)
    click.echo(f"wrote {path} ({'add difference' if base else 'weighted sum'}, alpha {alpha})")


@click.command()
@click.argument("run", type=click.Path(exists=True))
@click.option("--prompt", "prompts", multiple=True, required=True, help="A prompt (repeatable): one image each.")
@click.option("-o", "--output", default="samples.png", show_default=True, type=click.Path(), help="Grid PNG.")
@click.option("--steps", default=20, show_default=True, type=POSITIVE, help="DDIM steps.")
@click.option("--guidance", default=5.0, show_default=True, type=Finite(), help="Classifier-free guidance scale.")
@click.option("--seed", default=0, show_default=True)
@click.option("--width", type=POSITIVE, help="Image width in px (default: the training resolution).")
@click.option("--height", type=POSITIVE, help="Image height in px (default: the training resolution).")
def sample(run, prompts, output, steps, guidance, seed, width, height):
    """Generate images from RUN's last checkpoint (EMA weights) into one grid PNG.

    \b
    Example:
      latentmill sample runs/stage2 --prompt "a lighthouse at dusk" --prompt "a bowl of fruit" -o grid.png
    """
    from latentmill.train.sampling import sample_run

    size = (width, height) if width and height else None
    path = sample_run(run, list(prompts), output, steps=steps, guidance=guidance, seed=seed, size=size)
    click.echo(f"wrote {path}")
