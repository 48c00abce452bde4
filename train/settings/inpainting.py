"""Inpainting and masks: an inpainting U-Net trained on --mask-variants latents, and the loss weighted by
each sample's alpha mask."""

from __future__ import annotations

from dataclasses import dataclass

from latentmill.errors import InputError
from latentmill.schema import opt


@dataclass
class InpaintingSettings:
    inpainting: bool = opt(
        False,
        "Train an inpainting U-Net on latents encoded with --mask-variants: its input is the noisy latents, "
        "the mask and the masked image's latents; a 4-channel --model gets the extra conv_in channels "
        "zero-initialised, a 9-channel inpainting model trains as it is.",
        since="0.2",
    )
    masked_loss: bool = opt(
        False, "Weight each sample's loss by its mask (encode --alpha-mask), over its mean.", since="0.2"
    )

    def check_section(self) -> None:
        if self.inpainting and self.size_conditioning:
            raise InputError(
                "--inpainting with --size-conditioning: the inpainting pipelines feed no size conditions; drop one."
            )
