"""Stable Diffusion XL: its `UNet2DConditionModel` (DDPM, epsilon or v, as the SD U-Nets) conditioned on both
CLIP text encoders through StableDiffusionXLPipeline's own `encode_prompt` (the penultimate hidden states of
CLIP-L and CLIP-G side by side, CLIP-G's pooled projection) and on the micro-conditioning encode records per
image (original size, crop, target size: the pipeline's add_time_ids). Fine-tunes a diffusers SDXL folder;
exported as `StableDiffusionXLPipeline`. `--model tiny-sdxl` is a two-level U-Net with SDXL's layout.

The SDXL VAE overflows in fp16; latentmill never runs a VAE in fp16 (bf16 on CUDA, fp32 on CPU: encode, the
sample grids, `sample`), and the exported pipeline keeps the VAE's `force_upcast`, so diffusers decodes in
fp32 where a user loads it in fp16 (or give the fp16-fix VAE with `export --vae madebyollin/sdxl-vae-fp16-fix`).
"""

from __future__ import annotations

import numpy as np
import torch

from latentmill.errors import InputError
from latentmill.train.conditioning import time_ids
from latentmill.train.families.pipelinetext import PipelineText
from latentmill.train.families.sdunet import SdUnet
from latentmill.train.latentspace import starting_noise, to_images
from latentmill.train.namedstates import Conditioning

TIME_EMBED = 8  # the tiny config's addition_time_embed_dim (SDXL: 256)


class Sdxl(PipelineText, SdUnet):
    name = "sdxl"
    patch_size = 1
    lora_prefix = "unet"
    pipeline_class = "StableDiffusionXLPipeline"
    denoiser_component = "unet"
    text_parts = {
        "text_encoder": "CLIPTextModel",
        "tokenizer": "CLIPTokenizer",
        "text_encoder_2": "CLIPTextModelWithProjection",
        "tokenizer_2": "CLIPTokenizer",
    }
    tiny_text = "sdxl-text-tiny"
    tiny_configs = {"tiny-sdxl": {}}

    def build(self, config, manifest: dict, text_shape: dict):
        from diffusers import UNet2DConditionModel

        if config.inpainting or config.size_conditioning:
            raise InputError(
                f"--family sdxl: {'--inpainting' if config.inpainting else '--size-conditioning'} is the "
                f"sd-unet family's; SDXL is always size-conditioned, and its inpainting is not supported yet."
            )
        channels = manifest["latent_channels"]
        if config.model in self.tiny_configs:
            torch.manual_seed(config.seed)
            return UNet2DConditionModel(
                sample_size=manifest["resolution"] // manifest["downsample_factor"],
                in_channels=channels,
                out_channels=channels,
                block_out_channels=(32, 64),
                layers_per_block=1,
                attention_head_dim=(2, 4),
                norm_num_groups=8,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 1),
                use_linear_projection=True,
                cross_attention_dim=text_shape["prompt_embeds"],
                addition_embed_type="text_time",
                addition_time_embed_dim=TIME_EMBED,
                projection_class_embeddings_input_dim=text_shape["pooled"] + 6 * TIME_EMBED,
            )
        unet = self.pretrained(config.model)
        wanted = unet.config.cross_attention_dim
        if unet.config.addition_embed_type != "text_time" or wanted != text_shape["prompt_embeds"]:
            raise InputError(
                f"--model {config.model}: not an SDXL U-Net for these text encoders (it cross-attends to "
                f"{wanted}-d states, addition_embed_type {unet.config.addition_embed_type!r}; the text encoders "
                f"give {text_shape['prompt_embeds']}-d). Give an SDXL pipeline folder and its own text encoders."
            )
        if unet.config.in_channels != channels:
            raise InputError(
                f"--model {config.model} takes {unet.config.in_channels}-channel latents; the shards hold {channels}."
            )
        return unet

    def pretrained(self, spec: str, what: str = ""):
        from latentmill.train.models import load_pretrained_unet

        return load_pretrained_unet(spec, what or f"--model {spec}: not")

    def encode_prompts(self, pipe, prompts: list[str], device: str, max_tokens: int) -> Conditioning:
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return Conditioning(prompt_embeds=embeds, pooled=pooled)

    def objective(self, config, device: str):
        from latentmill.train.objective import Objective
        from latentmill.train.schedule import training_scheduler

        return Objective(
            training_scheduler(config.prediction),
            config.prediction,
            config.min_snr_gamma,
            config.noise_offset,
            False,
            device,
            predict=self.predict,
        )

    @staticmethod
    def predict(model, inputs, timesteps, text: Conditioning, metas: list) -> torch.Tensor:
        states = text["prompt_embeds"]
        added = {"text_embeds": text["pooled"], "time_ids": time_ids(metas, states.dtype, states.device)}
        return model(inputs, timesteps, encoder_hidden_states=states, added_cond_kwargs=added).sample

    @torch.no_grad()
    def generate(
        self,
        unet,
        text_states: Conditioning,
        empty_state: Conditioning,
        vae,
        scaling_factor: float,
        shift_factor: float,
        size: tuple[int, int],
        steps: int = 20,
        guidance: float = 5.0,
        seed: int = 0,
        prediction: str = "epsilon",
        inpaint=None,
        seeds: list[int] | None = None,
        config: dict | None = None,
        sampler: str | None = None,
    ) -> np.ndarray:
        """DDIM (or `sampler`: train/schedule.py SAMPLERS) with classifier-free guidance, asking for an uncropped image of `size` (the pipeline's
        default add_time_ids)."""
        from latentmill.train.schedule import sampling_scheduler, step_options

        scheduler = sampling_scheduler(prediction, sampler)
        scheduler.set_timesteps(steps)
        options = step_options(scheduler, seed)
        device = next(unet.parameters()).device
        n = text_states.batch
        factor = 8 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        shape = (unet.config.out_channels, size[1] // factor, size[0] // factor)
        latents = starting_noise(shape, n, seed, seeds).to(device) * scheduler.init_noise_sigma
        both = Conditioning.cat([empty_state.expand(n), text_states]).to(device)
        h, w = size[1], size[0]
        metas = [{"original_size": [w, h], "crop": [0, 0], "bucket": [w, h]}] * (2 * n)
        for t in scheduler.timesteps:
            inputs = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            predicted = self.predict(unet, inputs, t, both, metas)
            unconditional, conditional = predicted.chunk(2)
            latents = scheduler.step(
                unconditional + guidance * (conditional - unconditional), t, latents, **options
            ).prev_sample
        return to_images(latents, vae, scaling_factor, shift_factor)

    def kohya_lora(self, lora: dict, alpha: float, loaded) -> dict:
        """The U-Net's adapters in sd-scripts' SDXL keys (ldm module names, train/kohyalayouts.py)."""
        from latentmill.train.kohyalayouts import sdxl_kohya

        return sdxl_kohya(lora, alpha, loaded.unet_config())

    def pipeline(self, loaded, vae: str | None = None):
        """A StableDiffusionXLPipeline with the DDIM scheduler latentmill samples with, the VAE of the latents,
        and the empty prompt encoded (not zeroed) for guidance, as the run's caption dropout trained it."""
        from diffusers import StableDiffusionXLPipeline

        from latentmill.curate.vae import load_vae
        from latentmill.train.pipelinetext import load_parts
        from latentmill.train.schedule import sampling_scheduler

        config, manifest = loaded.config, loaded.manifest()
        vae_model = load_vae(vae or manifest["encode_config"]["vae"]).model
        vae_model.register_to_config(scaling_factor=manifest["scaling_factor"])
        parts = load_parts(self.text_spec_of(config), self.text_parts)
        return StableDiffusionXLPipeline(
            vae=vae_model,
            unet=loaded.unet(),
            scheduler=sampling_scheduler(config["prediction"]),
            force_zeros_for_empty_prompt=False,
            add_watermarker=False,
            **parts,
        )
