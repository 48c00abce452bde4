"""LoRA: adapters on the frozen denoiser (and, with --lora-text-encoder, on the text encoder), their rank,
alpha, target layers and the text encoder's learning rate."""

from __future__ import annotations

from dataclasses import dataclass

from latentmill.errors import InputError
from latentmill.schema import opt


@dataclass
class LoraSettings:
    lora_rank: int = opt(
        0, "LoRA: train rank-R adapters on the frozen --model instead of the whole U-Net (0: off).", low=0
    )
    lora_alpha: float | None = opt(
        None, "LoRA: the adapters' updates are scaled by alpha / rank (default: alpha = rank).", low=0.0
    )
    lora_targets: str = opt(
        "attention",
        "LoRA: the layers that get adapters: attention (q, k, v, out), attention+ff, or all-linear.",
        choices=("attention", "attention+ff", "all-linear"),
    )
    lora_text_encoder: bool = opt(
        False,
        "LoRA: adapters on the text encoder's attention layers too (needs --text-encoder PIPELINE_FOLDER).",
        since="0.2",
    )
    text_encoder_targets: str = opt(
        "attention",
        "--lora-text-encoder: the text encoder's layers that get adapters: attention (q, k, v, out) or "
        "attention+mlp.",
        choices=("attention", "attention+mlp"),
        since="0.2",
    )
    text_encoder_lr: float | None = opt(
        None,
        "Learning rate of the text encoder's adapters and of a --textual-inversion token (default: "
        "--learning-rate).",
        low=0.0,
        low_open=True,
        since="0.2",
    )

    def check_section(self) -> None:
        if self.lora_rank == 0 and self.lora_alpha is not None:
            raise InputError(
                f"{self.name('lora_alpha')} is set but LoRA is off: give {self.name('lora_rank')} too."
            )
        from latentmill.train.families import fresh_models

        if self.lora_rank and self.model in fresh_models() and not self.init_from:
            raise InputError(
                f"{self.name('lora_rank')} {self.lora_rank}: LoRA adapts a trained model, and --model "
                f"{self.model} is a fresh one. Give --model PIPELINE_FOLDER (e.g. Stable Diffusion 1.5) or "
                f"--init-from RUN."
            )
        if self.lora_text_encoder:
            if not self.lora_rank:
                raise InputError(
                    "--lora-text-encoder adds LoRA adapters to the text encoder: give --lora-rank too."
                )
            trainable_text_encoder(self, "--lora-text-encoder")
        elif self.text_encoder_targets != "attention":
            raise InputError(
                f"{self.name('text_encoder_targets')} belongs to --lora-text-encoder, which is off."
            )
        if self.text_encoder_lr is not None and not (self.lora_text_encoder or self.textual_inversion):
            raise InputError(
                f"{self.name('text_encoder_lr')}: nothing of the text encoder trains; give --lora-text-encoder "
                f"or --textual-inversion."
            )


def trainable_text_encoder(config, option: str) -> None:
    """The option trains part of the text encoder: it must be a transformers CLIP pipeline folder."""
    spec = config.text_encoder
    if not spec or spec.startswith("openclip:"):
        why = "caption embeddings stored in the shards are fixed" if not spec else "open_clip towers are not"
        raise InputError(
            f"{option} trains part of the text encoder, so it needs --text-encoder PIPELINE_FOLDER (a diffusers "
            f"pipeline with text_encoder/ and tokenizer/, as the one you export to); {why}."
        )
