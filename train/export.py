"""Export a run as a diffusers `StableDiffusionPipeline` folder (EMA weights by default)."""

from __future__ import annotations

from pathlib import Path

from latentmill.curate.errors import InputError


def export_pipeline(
    run: str | Path, output: str | Path, use_ema: bool = True, vae: str | None = None
) -> Path:
    """Write `output` so that `StableDiffusionPipeline.from_pretrained(output)` loads and runs.

    The text encoder must be a CLIPTextModel pipeline folder (the run's `--text-encoder`); the VAE is the
    one the latents were made with (the manifest's), or `vae`.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from latentmill.curate.vae import load_vae
    from latentmill.train.runs import load_run
    from latentmill.train.schedule import sampling_scheduler

    run = Path(run)
    loaded = load_run(run, use_ema)
    config = loaded.config
    text_spec = config.get("text_encoder")
    if not text_spec or text_spec.startswith("openclip:"):
        raise InputError(
            f"{run} was trained with text encoder {text_spec!r}; a StableDiffusionPipeline needs a "
            f"transformers CLIPTextModel: train with --text-encoder PIPELINE_FOLDER to export."
        )
    if config.get("size_conditioning"):
        raise InputError(
            f"{run} was trained with size/crop conditioning, which StableDiffusionPipeline cannot feed; "
            f"use `latentmill sample {run}` to generate."
        )
    manifest = loaded.manifest()
    unet = loaded.unet()
    vae_model = load_vae(vae or manifest["encode_config"]["vae"]).model
    from latentmill.curate.textencoder import text_encoder_folder

    text_path = text_encoder_folder(text_spec)
    text_encoder = CLIPTextModel.from_pretrained(
        text_path / "text_encoder" if (text_path / "text_encoder").exists() else text_path
    )
    tokenizer = CLIPTokenizer.from_pretrained(
        text_path / "tokenizer" if (text_path / "tokenizer").exists() else text_path
    )
    scheduler = sampling_scheduler(config["prediction"])
    pipeline = StableDiffusionPipeline(
        vae=vae_model,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    output = Path(output)
    pipeline.save_pretrained(output)
    return output
