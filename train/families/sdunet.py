"""The Stable Diffusion U-Nets: SD 1.x and 2.x, the tiny config, and SDXL-shaped U-Nets with size and crop
conditioning (`--size-conditioning`). A diffusers `UNet2DConditionModel` (train/models.py builds or loads
it), DDPM training with the epsilon or v objective and optional min-SNR weighting (train/objective.py),
DDIM sampling with classifier-free guidance, all over Stable Diffusion's scaled-linear schedule
(train/schedule.py)."""

from __future__ import annotations

import numpy as np
import torch

from latentmill.train.latentspace import starting_noise, to_images
from latentmill.train.schedule import sampling_scheduler, step_options


class SdUnet:
    name = "sd-unet"
    patch_size = 1  # buckets are multiples of the VAE's factor alone
    lora_prefix = "unet"  # diffusers' LoRA file keys: unet.<module>.lora_A.weight

    def reads_stored_text(self, config) -> bool:
        """Whether the run conditions on the caption embeddings stored in the shards (no --text-encoder)."""
        return not config.text_encoder

    def check_latents(self, manifest: dict, buckets) -> None:
        """Any bucket the VAE's factor divides (the U-Net's down-sampling pads odd sizes itself)."""

    def build(self, config, manifest: dict, text_width: int):
        """A named config with fresh weights (config.seed) or the pretrained U-Net config.model names."""
        from latentmill.train.models import build_unet

        return build_unet(
            config.model,
            manifest["latent_channels"],
            text_width,
            manifest["resolution"] // manifest["downsample_factor"],
            config.seed,
            config.size_conditioning,
            config.inpainting,
            frozen=bool(config.lora_rank and not config.init_from),
        )

    def pretrained(self, spec: str, what: str = ""):
        """The U-Net of a pipeline folder, U-Net folder or cached model id; `what` starts the message."""
        from latentmill.train.models import load_pretrained_unet

        return load_pretrained_unet(spec, what or f"--model {spec}: not")

    def from_config(self, saved: dict):
        """The model a checkpoint's saved config describes (its weights loaded after)."""
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(saved)

    def conditioning(self, config, manifest: dict, folder, device: str, precision: str, text=None):
        """(encode_text(batch, generator) -> caption states with dropout, their width, encode_prompts(prompts)
        -> (states, empty state) or None): one text encoder's last hidden states, on the device or stored in
        the shards (train/conditioning.py)."""
        from latentmill.train.conditioning import text_conditioning

        return text_conditioning(config, manifest, folder, device, precision, text)

    def objective(self, config, device: str):
        from latentmill.train.objective import Objective
        from latentmill.train.schedule import training_scheduler

        return Objective(
            training_scheduler(config.prediction),
            config.prediction,
            config.min_snr_gamma,
            config.noise_offset,
            config.size_conditioning,
            device,
        )

    @torch.no_grad()
    def generate(
        self,
        unet,
        text_states,
        empty_state,
        vae,
        scaling_factor: float,
        shift_factor: float,
        size: tuple[int, int],
        steps: int = 20,
        guidance: float = 5.0,
        seed: int = 0,
        prediction: str = "epsilon",
        inpaint: torch.Tensor | None = None,
        seeds: list[int] | None = None,
        config: dict | None = None,
        sampler: str | None = None,
    ) -> np.ndarray:
        """(N, H, W, 3) uint8 images for N prompts' text states, denoised by `sampler` (train/schedule.py
        SAMPLERS; default DDIM); `size` is (width, height) in pixels. An
        inpainting U-Net takes `inpaint` (N, 1 + C, h, w: the mask and the masked image's latents in the
        U-Net's space) beside the latents; without it, everything is masked (plain text-to-image). `seeds`: one
        per image, each image's starting noise drawn from its own (so an image does not depend on its batch).
        `config`: the run's (the transformer families read it; the U-Net's sampler needs `prediction` alone)."""
        scheduler = sampling_scheduler(prediction, sampler)
        scheduler.set_timesteps(steps)
        device = next(unet.parameters()).device
        n = text_states.shape[0]
        channels = unet.config.out_channels
        shape = (channels, size[1] // 8, size[0] // 8)
        latents = starting_noise(shape, n, seed, seeds).to(device) * scheduler.init_noise_sigma
        options = step_options(scheduler, seed)
        context = torch.cat([empty_state.expand(n, -1, -1), text_states]).to(device)
        if unet.config.in_channels > channels:  # an inpainting U-Net
            from latentmill.train.inpainting import unconditioned

            if inpaint is None:
                inpaint = unconditioned(unet, vae, n, size, scaling_factor, shift_factor, device)
            inpaint = torch.cat([inpaint, inpaint]).to(device)
        extra = {}
        if (
            getattr(unet.config, "addition_embed_type", None) == "text_time"
        ):  # size-conditioned: ask for an uncropped image
            h, w = size[1], size[0]
            time_ids = torch.tensor([[h, w, 0, 0, h, w]] * (2 * n), dtype=context.dtype, device=device)
            extra = {"added_cond_kwargs": {"text_embeds": context.mean(dim=1), "time_ids": time_ids}}
        for t in scheduler.timesteps:
            inputs = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            if inpaint is not None:
                inputs = torch.cat([inputs, inpaint.to(inputs.dtype)], dim=1)
            prediction_both = unet(inputs, t, encoder_hidden_states=context, **extra).sample
            unconditional, conditional = prediction_both.chunk(2)
            guided = unconditional + guidance * (conditional - unconditional)
            latents = scheduler.step(guided, t, latents, **options).prev_sample
        return to_images(latents, vae, scaling_factor, shift_factor)

    def prompt_encoder(self, source, config: dict, manifest: dict, given: str | None):
        """texts -> caption states on the host: the run's text encoder, or for a run trained on states stored
        in its shards the one that stored them (or `given`, checked against them)."""
        from latentmill.train.sampling import text_encoder_of

        encoder = text_encoder_of(source, config, manifest, given)
        return lambda texts: torch.from_numpy(encoder.encode(list(texts)))

    def kohya_lora(self, lora: dict, alpha: float, loaded) -> dict:
        """The U-Net's adapters in sd-scripts' SD 1.x/2.x keys (diffusers' module names, train/lora.py)."""
        from latentmill.train.lora import to_kohya

        return to_kohya(lora, alpha)

    def pipeline(self, loaded, vae: str | None = None):
        """The run as a StableDiffusionPipeline (a StableDiffusionInpaintPipeline for an inpainting run). The
        text encoder must be a CLIPTextModel pipeline folder (the run's `--text-encoder`); the VAE is the one
        the latents were made with (the manifest's), or `vae`."""
        from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

        from latentmill.curate.vae import load_vae
        from latentmill.errors import InputError
        from latentmill.train.schedule import sampling_scheduler

        run, config = loaded.path, loaded.config
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
        if loaded.text_file("token.json") or loaded.text_file("text_adapter.json"):
            from latentmill.train.textexport import trained_text_model

            text_encoder, tokenizer = trained_text_model(loaded)  # its LoRA baked in, its token added
        else:
            from latentmill.curate.textencoder import clip_text_parts

            text_encoder, tokenizer = clip_text_parts(text_spec)
        inpainting = unet.config.in_channels > unet.config.out_channels
        kind = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
        return kind(
            vae=vae_model,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=sampling_scheduler(config["prediction"]),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
