"""Export a run as a diffusers `StableDiffusionPipeline` folder (EMA weights by default)."""

from __future__ import annotations

import json
from pathlib import Path

from latentmill.curate.errors import InputError
from latentmill.train.checkpoint import latest_checkpoint, weights_needed


def export_pipeline(run: str | Path, output: str | Path, use_ema: bool = True, vae: str | None = None) -> Path:
    """Write `output` so that `StableDiffusionPipeline.from_pretrained(output)` loads and runs.

    The text encoder must be a CLIPTextModel pipeline folder (the run's `--text-encoder`); the VAE is the
    one the latents were made with (the manifest's), or `vae`.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from latentmill.curate.latentshards import read_manifest
    from latentmill.curate.vae import load_vae
    from latentmill.train.loader import expand_shards

    run = Path(run)
    found = latest_checkpoint(run, weights_needed(use_ema))
    if not found:
        raise InputError(f"{run}: no checkpoints to export. Train first (`latentmill train ... -o {run}`).")
    state = json.loads((found / "state.json").read_text())
    config = state["config"]
    text_spec = config.get("text_encoder")
    if not text_spec or text_spec.startswith("openclip:"):
        raise InputError(f"{run} was trained with text encoder {text_spec!r}; a StableDiffusionPipeline needs a "
                         f"transformers CLIPTextModel: train with --text-encoder PIPELINE_FOLDER to export.")
    if config.get("size_conditioning"):
        raise InputError(f"{run} was trained with size/crop conditioning, which StableDiffusionPipeline cannot feed; "
                         f"use `latentmill sample {run}` to generate.")
    manifest = read_manifest(Path(expand_shards(config["shards"])[0]).parent)
    unet_config = json.loads((found / "unet_config.json").read_text())
    unet = UNet2DConditionModel.from_config(unet_config)
    unet.load_state_dict(load_file(found / ("ema.safetensors" if use_ema else "unet.safetensors")))
    vae_model = load_vae(vae or manifest["encode_config"]["vae"]).model
    from latentmill.curate.textencoder import text_encoder_folder

    text_path = text_encoder_folder(text_spec)
    text_encoder = CLIPTextModel.from_pretrained(text_path / "text_encoder" if (text_path / "text_encoder").exists() else text_path)
    tokenizer = CLIPTokenizer.from_pretrained(text_path / "tokenizer" if (text_path / "tokenizer").exists() else text_path)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=config["prediction"], clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    pipeline = StableDiffusionPipeline(vae=vae_model, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    output = Path(output)
    pipeline.save_pretrained(output)
    return output
