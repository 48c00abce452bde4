"""Textual inversion: a new token's embedding trained on the frozen model (with --lora-rank: pivotal
tuning), where it starts from, how many vectors it has and which captions it learns from."""

from __future__ import annotations

from dataclasses import dataclass

from latentmill.errors import InputError
from latentmill.schema import opt
from latentmill.train.settings.lora import trainable_text_encoder


@dataclass
class TextualInversionSettings:
    textual_inversion: str | None = opt(
        None,
        "Textual inversion: add this token (e.g. '<my-cat>') to the tokenizer and train only its embedding "
        "(with --lora-rank: pivotal tuning, the adapters too). Needs --text-encoder PIPELINE_FOLDER.",
        since="0.2",
    )
    init_word: str | None = opt(
        None, "--textual-inversion: the word whose embedding the new token's vectors start from.", since="0.2"
    )
    vectors: int = opt(1, "--textual-inversion: embedding vectors of the new token.", low=1, since="0.2")
    placeholder: str | None = opt(
        None,
        "--textual-inversion: the word of each caption the token takes the place of (default: the "
        "--ti-templates captions).",
        since="0.2",
    )
    ti_templates: str | None = opt(
        None,
        "--textual-inversion: captions made from the original paper's templates ('a photo of a {}') instead "
        "of the samples' captions: object or style (the default without --placeholder: object).",
        choices=("object", "style"),
        since="0.2",
    )

    def check_section(self) -> None:
        ti = self.textual_inversion
        for key in ("init_word", "placeholder", "ti_templates"):
            if getattr(self, key) is not None and ti is None:
                raise InputError(
                    f"{self.name(key)} belongs to --textual-inversion TOKEN, which is not given."
                )
        if self.vectors != 1 and ti is None:
            raise InputError(
                f"{self.name('vectors')} belongs to --textual-inversion TOKEN, which is not given."
            )
        if ti is None:
            return
        if not ti.strip() or ti != ti.strip() or " " in ti:
            raise InputError(
                f"--textual-inversion {ti!r}: the token is one word without spaces, e.g. '<my-cat>'."
            )
        if not self.init_word or not self.init_word.strip():
            raise InputError(
                f"--textual-inversion {ti}: give --init-word WORD, the word its embedding starts from (what the "
                f"subject is: 'cat', 'painting')."
            )
        if self.placeholder is not None and self.ti_templates is not None:
            raise InputError(
                "--textual-inversion: give --placeholder WORD (the captions, with the token in its place) or "
                "--ti-templates object|style (captions from templates), not both."
            )
        trainable_text_encoder(self, "--textual-inversion")
        from latentmill.train.families import fresh_models

        if self.model in fresh_models() and not self.init_from:
            raise InputError(
                f"--textual-inversion teaches a word to a trained U-Net, and --model {self.model} is a fresh "
                f"one. Give --model PIPELINE_FOLDER (e.g. Stable Diffusion 1.5) or --init-from RUN."
            )
