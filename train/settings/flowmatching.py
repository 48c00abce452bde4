"""Flow matching (SD3, Flux): how the noise levels are drawn and shifted, SD3's loss weightings, Flux's
guidance embedding and the T5 sequence length. U-Net runs ignore these."""

from __future__ import annotations

from dataclasses import dataclass

from latentmill.errors import InputError
from latentmill.schema import opt


@dataclass
class FlowMatchingSettings:
    flow_shift: float | None = opt(
        None,
        "Flow-matching families: the shift of the training sigmas (default: the family's, SD3 3.0, Flux 1.0 as "
        "diffusers' scripts train).",
        low=0.0,
        low_open=True,
        since="0.4",
    )
    timestep_density: str = opt(
        "logit_normal",
        "Flow-matching families: how noise levels are drawn (SD3 paper): logit_normal, mode or uniform.",
        choices=("logit_normal", "mode", "uniform"),
        since="0.4",
    )
    logit_mean: float = opt(0.0, "--timestep-density logit_normal: its mean.", since="0.4")
    logit_std: float = opt(
        1.0, "--timestep-density logit_normal: its std.", low=0.0, low_open=True, since="0.4"
    )
    mode_scale: float = opt(1.29, "--timestep-density mode: its scale.", since="0.4")
    loss_weighting: str = opt(
        "none",
        "Flow-matching families: SD3's loss weighting by noise level: none, sigma_sqrt or cosmap.",
        choices=("none", "sigma_sqrt", "cosmap"),
        since="0.4",
    )
    dynamic_shift: bool = opt(
        False,
        "Flow-matching families: move each sample's sigma by its image's token count (Flux's resolution-dependent "
        "shift) instead of --flow-shift.",
        since="0.4",
    )
    guidance_scale: float = opt(
        3.5,
        "Guidance-distilled families (Flux.1 dev): the guidance value the transformer is told while training.",
        low=0.0,
        since="0.4",
    )
    max_sequence_length: int | None = opt(
        None,
        "Transformer families: T5 tokens per caption (default: SD3 77, as diffusers' training script; Flux 512; "
        "at most the tokenizer's length).",
        low=1,
        since="0.4",
    )

    def check_section(self) -> None:
        if self.dynamic_shift and self.flow_shift is not None:
            raise InputError(
                f"{self.name('dynamic_shift')} moves each sample's sigma by its token count, and "
                f"{self.name('flow_shift')} {self.flow_shift} fixes one shift for all: give one of them."
            )
