"""The checks of the training modes beyond the plain U-Net: inpainting, textual inversion, text-encoder LoRA
and pivotal tuning. Each refusal names the option and the fix; they run before anything is read or written."""

from __future__ import annotations

from latentmill.errors import InputError


def _trainable_text_encoder(config, option: str) -> None:
    """The option trains part of the text encoder: it must be a transformers CLIP pipeline folder."""
    spec = config.text_encoder
    if not spec or spec.startswith("openclip:"):
        why = "caption embeddings stored in the shards are fixed" if not spec else "open_clip towers are not"
        raise InputError(
            f"{option} trains part of the text encoder, so it needs --text-encoder PIPELINE_FOLDER (a diffusers "
            f"pipeline with text_encoder/ and tokenizer/, as the one you export to); {why}."
        )


def check_modes(config) -> None:
    ti = config.textual_inversion
    for key in ("init_word", "placeholder", "ti_templates"):
        if getattr(config, key) is not None and ti is None:
            raise InputError(f"{config.name(key)} belongs to --textual-inversion TOKEN, which is not given.")
    if config.vectors != 1 and ti is None:
        raise InputError(
            f"{config.name('vectors')} belongs to --textual-inversion TOKEN, which is not given."
        )
    if ti is not None:
        if not ti.strip() or ti != ti.strip() or " " in ti:
            raise InputError(
                f"--textual-inversion {ti!r}: the token is one word without spaces, e.g. '<my-cat>'."
            )
        if not config.init_word or not config.init_word.strip():
            raise InputError(
                f"--textual-inversion {ti}: give --init-word WORD, the word its embedding starts from (what the "
                f"subject is: 'cat', 'painting')."
            )
        if config.placeholder is not None and config.ti_templates is not None:
            raise InputError(
                "--textual-inversion: give --placeholder WORD (the captions, with the token in its place) or "
                "--ti-templates object|style (captions from templates), not both."
            )
        _trainable_text_encoder(config, "--textual-inversion")
        from latentmill.train.families import fresh_models

        if config.model in fresh_models() and not config.init_from:
            raise InputError(
                f"--textual-inversion teaches a word to a trained U-Net, and --model {config.model} is a fresh "
                f"one. Give --model PIPELINE_FOLDER (e.g. Stable Diffusion 1.5) or --init-from RUN."
            )
    if config.lora_text_encoder:
        if not config.lora_rank:
            raise InputError(
                "--lora-text-encoder adds LoRA adapters to the text encoder: give --lora-rank too."
            )
        _trainable_text_encoder(config, "--lora-text-encoder")
    elif config.text_encoder_targets != "attention":
        raise InputError(
            f"{config.name('text_encoder_targets')} belongs to --lora-text-encoder, which is off."
        )
    if config.text_encoder_lr is not None and not (config.lora_text_encoder or ti):
        raise InputError(
            f"{config.name('text_encoder_lr')}: nothing of the text encoder trains; give --lora-text-encoder or "
            f"--textual-inversion."
        )
    if config.inpainting and config.size_conditioning:
        raise InputError(
            "--inpainting with --size-conditioning: the inpainting pipelines feed no size conditions; drop one."
        )
