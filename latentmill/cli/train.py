"""`latentmill train`, `export`, `merge` and `sample`."""

from __future__ import annotations

import click

from latentmill.cli.options import Location, click_options, config_from, given_on_command_line
from latentmill.curate.storage import location
from latentmill.train.commandconfigs import ExportConfig, MergeConfig, SampleConfig
from latentmill.train.config import TrainConfig


@click.command()
@click.argument("shards", nargs=-1)
@click.option("-o", "--output", required=True, type=Location(), help="Run folder (checkpoints, log.jsonl).")
@click.option(
    "--config",
    "config_file",
    type=Location(exists=True, dir_okay=False),
    help="A YAML file of train settings (the keys of a recipe's train: section); options given override it.",
)
@click_options(TrainConfig)
@click.pass_context
def train(ctx, shards, output, config_file, **kwargs):
    """Train a U-Net straight from latent shards (SHARDS: folders, brace patterns or files).

    Several folders are mixed (--mix weights); --lora-rank trains LoRA adapters on a pretrained --model;
    --instance/--class-data train DreamBooth with prior preservation. `--resume` continues a stopped run
    from its last checkpoint, exactly, with the run's saved settings: of those, only --steps (to go on),
    the log/checkpoint/sample cadence and --workers may be given anew. Many GPUs: launch with torchrun.

    \b
    Examples:
      latentmill train latents-256/ -o runs/stage1 --model sd15 --text-encoder sd15-pipeline/ --steps 20000
      torchrun --nproc-per-node 8 -m latentmill train latents-512/ -o runs/stage2 --init-from runs/stage1 ...
      latentmill train s3://b/latents-512 -o s3://b/runs/a --launcher ray --ray-address auto --num-workers 16 --gpus-per-worker 1 ...
      latentmill train latents/ -o runs/style --model sd15-pipeline/ --text-encoder sd15-pipeline/ --lora-rank 16
      latentmill train photos/ paintings/ --mix 0.8,0.2 -o runs/mixed --model sd15-pipeline/ ...
      latentmill train --instance dog-latents/ --class-data class-latents/ -o runs/dog --lora-rank 8 ...
      latentmill train latents/ -o runs/style --config style.yaml --learning-rate 5e-5
    """
    from tqdm import tqdm

    from latentmill.train.checkpoint import last_state
    from latentmill.train.loop import train as run_train
    from latentmill.train.resumeconfig import resumed_values

    saved = last_state(output) if kwargs.get("resume") and location(output).exists() else None
    saved_config = (saved or {}).get("config") or {}
    # resuming: the run's own settings, but for the options typed now (refused by train() if not allowed)
    typed = given_on_command_line(TrainConfig, ctx)
    if "epochs" in typed and "steps" in typed:
        raise click.UsageError("give --steps or --epochs, not both.")
    if config_file:  # the file's settings, under the options typed now
        from latentmill.recipe import load_section_file

        given = {
            k: list(kwargs[k]) if isinstance(kwargs[k], tuple) else kwargs[k] for k in typed if k in kwargs
        }
        # checked with the command's own latents (DreamBooth's --instance in the file needs none)
        body = load_section_file(config_file, "train", given | {"shards": list(shards), "output": output})
        kwargs |= {k: v for k, v in body.items() if k not in typed}
        typed = typed + list(body)
    kwargs |= resumed_values(saved_config, typed)
    shards = list(shards) or list(saved_config.get("shards") or [])  # resume: the run's own shards
    config = config_from(TrainConfig, kwargs, shards=shards, output=output)
    total = None if config.epochs else config.steps  # epochs: the steps are known once the data is read
    with tqdm(total=total, desc="train", unit="step", dynamic_ncols=True, leave=False) as bar:

        def steps_known(steps: int) -> None:  # --epochs: the loop says how many steps they come to
            bar.total = steps
            bar.refresh()

        def progress(metrics):
            bar.n = int(metrics.get("step", bar.n))
            bar.set_postfix(
                loss=f"{metrics.get('loss', float('nan')):.4f}",
                samples_s=f"{metrics.get('samples_per_s', 0):.1f}",
            )
            bar.refresh()

        if config.launcher == "ray":
            from latentmill.train.raylaunch import launch

            metrics = launch(config, log=click.echo, progress=progress)
        else:
            from latentmill.evaluation import training_eval

            metrics = run_train(
                config,
                progress=progress,
                log=click.echo,
                evaluate=training_eval(config),
                steps_known=steps_known,
            )
    if metrics.get("rank", 0) == 0 and not metrics.get("finished_before"):
        click.echo(
            f"step {metrics.get('step')}: loss {metrics.get('loss', float('nan')):.4f}; checkpoints in {output}/checkpoints"
        )


@click.command()
@click.argument("run", type=Location(exists=True))
@click.option("-o", "--output", required=True, type=Location(), help="diffusers pipeline folder to write.")
@click_options(ExportConfig)
def export(run, output, **kwargs):
    """Write RUN's last checkpoint as a folder StableDiffusionPipeline.from_pretrained loads; a LoRA run's
    adapter as the file load_lora_weights reads (or, with --format kohya, the lora_unet_... file).

    \b
    Examples:
      latentmill export runs/stage2 -o my-model/
      latentmill export runs/style -o style-lora/
      latentmill export runs/style --format kohya -o style.safetensors
    """
    from latentmill.train.export import export_run

    config = config_from(ExportConfig, kwargs)
    path = export_run(
        run, output, config.format, use_ema=config.ema, vae=config.vae, overwrite=config.overwrite
    )
    click.echo(f"wrote {path}")


@click.command()
@click.argument("a", type=Location(exists=True), required=False)
@click.argument("b", type=Location(exists=True), required=False)
@click_options(MergeConfig)
@click.option("-o", "--output", required=True, type=Location(), help="Run folder for the merged weights.")
def merge(a, b, output, **kwargs):
    """Merge two runs (or .safetensors files): (1 - alpha) * A + alpha * B, or A + alpha * (B - BASE); or
    bake a LoRA adapter into a whole U-Net.

    The output is a complete run: `export`, `sample` and `train --init-from` take it.

    \b
    Examples:
      latentmill merge runs/photo runs/anime --alpha 0.3 -o runs/merged
      latentmill merge runs/base-ft runs/style --base runs/base --alpha 1.0 -o runs/style-on-ft
      latentmill merge --lora runs/style --alpha 0.8 -o runs/style-baked
    """
    from latentmill.train.merge import merge as run_merge
    from latentmill.train.merge import merge_lora_run

    config = config_from(MergeConfig, kwargs)
    if config.force and not config.lora:
        raise click.UsageError("--force applies to --lora only (a base the adapter was not trained on).")
    if config.lora:
        if b or config.base or config.config_from:
            raise click.UsageError(
                "--lora merges one adapter into one base (A): drop B, --base and --config-from."
            )
        alpha = 1.0 if config.alpha is None else config.alpha
        path = merge_lora_run(config.lora, output, alpha, base=a, use_ema=config.ema, force=config.force)
        click.echo(f"wrote {path} (LoRA {config.lora} at scale {alpha})")
        return
    if not (a and b) or config.alpha is None:
        raise click.UsageError("give A, B and --alpha (or --lora RUN to bake an adapter in).")
    path = run_merge(
        a, b, output, config.alpha, config.base, use_ema=config.ema, config_from=config.config_from
    )
    click.echo(f"wrote {path} ({'add difference' if config.base else 'weighted sum'}, alpha {config.alpha})")


@click.command()
@click.argument("source", type=Location(exists=True))
@click_options(SampleConfig)
@click.option(
    "-o",
    "--output",
    default="samples.png",
    show_default=True,
    type=Location(dir_okay=False),
    help="Grid PNG.",
)
@click.option(
    "--to-folder",
    type=Location(file_okay=False),
    help="Write each image as NNNNNN.png with its prompt in NNNNNN.txt (for `images pack`), not a grid.",
)
def sample(source, output, to_folder, **kwargs):
    """Generate images from SOURCE: a run's last checkpoint (EMA weights) or a diffusers pipeline folder.

    One grid PNG, or with --to-folder single images to pack and encode (e.g. DreamBooth's class images,
    from the base model).

    \b
    Examples:
      latentmill sample runs/stage2 --prompt "a lighthouse at dusk" --prompt "a bowl of fruit" -o grid.png
      latentmill sample runs/stage2 --prompt "a cat" --prompt "a dog" --seeds 1,2 --count 4 --sampler euler-a
      latentmill sample sd15-pipeline/ --prompt "a photo of a dog" --count 200 --to-folder class-images/
      latentmill sample sd15-pipeline/ --prompt "a photo of a puppy" --count 100 --to-folder class-images/ --add
    """
    from latentmill.train.samplefolder import sample_to_folder
    from latentmill.train.sampling import sample_run

    c = config_from(SampleConfig, kwargs)
    if to_folder:
        from latentmill.progress import progress_bar

        if c.seeds:
            raise click.UsageError(
                "--seeds makes grids; --to-folder draws image k of the set from --seed + k."
            )
        with progress_bar(len(c.prompts) * c.count, "sample", "img") as bar:
            total, made = sample_to_folder(
                source, c.prompts, to_folder, c.count, c.sampler_steps, c.guidance, c.seed, c.size,
                progress=bar.update, text_encoder=c.text_encoder, negative=c.negative_prompt, add=c.add,
                method=c.sampler,
            )  # fmt: skip
        click.echo(f"{total} image(s) of these prompts in {to_folder} ({made} made now)")
        return
    if c.add:
        raise click.UsageError("--add applies to --to-folder.")
    path = sample_run(
        source, c.prompts, output, steps=c.sampler_steps, guidance=c.guidance, seed=c.seed, size=c.size,
        text_encoder=c.text_encoder, negative=c.negative_prompt, count=c.count, seeds=c.seeds, method=c.sampler,
    )  # fmt: skip
    click.echo(f"wrote {path}")
