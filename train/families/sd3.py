"""Stable Diffusion 3 / 3.5 (MMDiT): diffusers' `SD3Transformer2DModel` on the 16-channel VAE's latents (with
its shift factor), conditioned on CLIP-L and CLIP-G (penultimate hidden states side by side, their pooled
projections concatenated) and T5 (its hidden states after the CLIP ones); without T5 its states are zeros,
as SD3 was trained to accept. Flow matching with SD3's shift 3.0; exported as `StableDiffusion3Pipeline`.
`--model tiny-sd3` is a 2-layer, 16-wide MMDiT with SD3.5's RMS q/k norm."""

from __future__ import annotations

import torch

from latentmill.train.families.flowfamily import FlowFamily
from latentmill.train.namedstates import Conditioning

TRAINING_T5_TOKENS = 77  # diffusers' train_dreambooth_sd3.py --max_sequence_length default


class Sd3(FlowFamily):
    name = "sd3"
    patch_size = 2
    transformer_class = "SD3Transformer2DModel"
    pipeline_class = "StableDiffusion3Pipeline"
    text_parts = {
        "text_encoder": "CLIPTextModelWithProjection",
        "tokenizer": "CLIPTokenizer",
        "text_encoder_2": "CLIPTextModelWithProjection",
        "tokenizer_2": "CLIPTokenizer",
        "text_encoder_3": "T5EncoderModel",
        "tokenizer_3": "T5TokenizerFast",
    }
    optional_text = ("text_encoder_3", "tokenizer_3")
    tiny_text = "sd3-text-tiny"
    tiny_configs = {"tiny-sd3": {}}
    default_shift = 3.0
    default_scheduler = {"num_train_timesteps": 1000, "shift": 3.0}

    def fresh(self, spec: str, channels: int, text_shape: dict) -> dict:
        return dict(
            sample_size=32,
            patch_size=2,
            in_channels=channels,
            out_channels=channels,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=text_shape["prompt_embeds"],
            caption_projection_dim=16,
            pooled_projection_dim=text_shape["pooled"],
            pos_embed_max_size=64,
            qk_norm="rms_norm",
        )

    def text_pipeline(self, spec: str, device: str, dtype=torch.float32):
        pipe = super().text_pipeline(spec, device, dtype)
        if pipe.text_encoder_3 is None:
            # the pipeline's zero T5 states are as wide as the transformer's joint attention: the CLIP states'
            # width padded to it (4096 for SD3; a tiny one's T5 would be 64)
            from types import SimpleNamespace

            width = 4096 if spec != self.tiny_text else 64
            object.__setattr__(
                pipe, "transformer", SimpleNamespace(config=SimpleNamespace(joint_attention_dim=width))
            )
        return pipe

    def max_sequence_length(self, pipe, config) -> int:
        wanted = getattr(config, "max_sequence_length", None) or TRAINING_T5_TOKENS
        if pipe.tokenizer_3 is not None:
            wanted = min(wanted, pipe.tokenizer_3.model_max_length)
        return wanted

    def encode_prompts(self, pipe, prompts: list[str], device: str, max_tokens: int) -> Conditioning:
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts,
            prompts,
            prompts,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_tokens,
        )
        return Conditioning(prompt_embeds=embeds, pooled=pooled)

    def predict(self, model, noisy, timesteps, text: Conditioning, guidance: float) -> torch.Tensor:
        dtype = noisy.dtype  # (the model may be wrapped: DDP, torch.compile)
        return model(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=text["prompt_embeds"].to(dtype),
            pooled_projections=text["pooled"].to(dtype),
            return_dict=False,
        )[0]
