"""Flux.1 (dev and schnell): diffusers' `FluxTransformer2DModel` on 16-channel latents packed into 2x2
patches (64 values a token), with image position ids (row, column) and zero text position ids, conditioned
on T5's hidden states and CLIP-L's pooled output; dev is guidance-distilled: it is told a guidance value
(`--guidance-scale`, diffusers' default 3.5) instead of being sampled with classifier-free guidance. Flow
matching on the unshifted sigmas, as diffusers' train_dreambooth_flux.py trains with FLUX.1-dev's scheduler
(`--dynamic-shift` for the resolution-dependent shift); sampled with the pipeline's dynamic shift; exported as
`FluxPipeline`. `--model tiny-flux` (dev-like) and `tiny-flux-schnell`: one double and one single block."""

from __future__ import annotations

import torch

from latentmill.train.families.flowfamily import FlowFamily
from latentmill.train.namedstates import Conditioning

DEV_SCHEDULER = {  # FLUX.1-dev's scheduler/scheduler_config.json
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
SCHNELL_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0}


class Flux(FlowFamily):
    name = "flux"
    patch_size = 2  # 2x2 latent patches a token
    transformer_class = "FluxTransformer2DModel"
    pipeline_class = "FluxPipeline"
    text_parts = {
        "text_encoder": "CLIPTextModel",
        "tokenizer": "CLIPTokenizer",
        "text_encoder_2": "T5EncoderModel",
        "tokenizer_2": "T5TokenizerFast",
    }
    tiny_text = "flux-text-tiny"
    tiny_configs = {"tiny-flux": {"guidance_embeds": True}, "tiny-flux-schnell": {"guidance_embeds": False}}
    default_shift = 1.0
    default_scheduler = DEV_SCHEDULER

    def fresh(self, spec: str, channels: int, text_shape: dict) -> dict:
        return dict(
            patch_size=1,
            in_channels=4 * channels,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=text_shape["prompt_embeds"],
            pooled_projection_dim=text_shape["pooled"],
            axes_dims_rope=(2, 2, 4),
            **self.tiny_configs[spec],
        )

    def kohya_lora(self, lora: dict, alpha: float, loaded) -> dict:
        """The transformer's adapters in sd-scripts' (and ComfyUI's) Flux keys, q/k/v fused (train/kohyalayouts.py)."""
        from latentmill.train.kohyalayouts import flux_kohya

        return flux_kohya(lora, alpha)

    def latent_channels(self, model) -> int:
        return model.config.in_channels // 4

    def out_channels(self, model) -> int:
        return model.config.in_channels // 4

    def sampling_scheduler(self, config: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if config.get("model") == "tiny-flux-schnell":
            return FlowMatchEulerDiscreteScheduler(**SCHNELL_SCHEDULER)
        return super().sampling_scheduler(config)

    def max_sequence_length(self, pipe, config) -> int:
        wanted = getattr(config, "max_sequence_length", None) or 512  # FluxPipeline's default (and limit)
        return min(wanted, pipe.tokenizer_2.model_max_length)

    def encode_prompts(self, pipe, prompts: list[str], device: str, max_tokens: int) -> Conditioning:
        embeds, pooled, _ = pipe.encode_prompt(
            prompts, prompts, device=device, max_sequence_length=max_tokens
        )
        return Conditioning(prompt_embeds=embeds, pooled=pooled)

    def predict(self, model, noisy, timesteps, text: Conditioning, guidance: float) -> torch.Tensor:
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        dtype = noisy.dtype
        base = getattr(model, "module", model)  # DDP's wrapped model (and torch.compile's original)
        base = getattr(base, "_orig_mod", base)
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, dtype)
        states = text["prompt_embeds"].to(dtype)
        text_ids = torch.zeros(states.shape[1], 3, device=noisy.device, dtype=dtype)
        told = torch.full((b,), float(guidance), device=noisy.device) if base.config.guidance_embeds else None
        out = model(
            hidden_states=packed,
            timestep=timesteps / 1000,
            guidance=told,
            pooled_projections=text["pooled"].to(dtype),
            encoder_hidden_states=states,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)  # (h, w even: back to (B, C, h, w))

    def set_timesteps(self, scheduler, steps: int, latents: torch.Tensor):
        """The pipeline's: sigmas 1 .. 1/steps, moved by the image's token count where the scheduler shifts
        dynamically (FLUX.1-dev)."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        sigmas = np.linspace(1.0, 1 / steps, steps)
        tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        c = scheduler.config
        mu = calculate_shift(
            tokens,
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=latents.device)

    def guided(self, model, latents, t, text: Conditioning, empty: Conditioning, guidance: float):
        """As FluxPipeline: dev is told the guidance value, schnell takes none; neither runs an unconditional
        pass."""
        return self.predict(model, latents, t.expand(latents.shape[0]), text, guidance)
