"""Evaluation and sample grids while training: the validation loss on held-out latents, CLIP score and
FID/KID of generated images, and the sample grids of fixed prompts."""

from __future__ import annotations

from dataclasses import dataclass

from latentmill.errors import InputError
from latentmill.schema import opt
from latentmill.train.schedule import SAMPLER_NAMES

SAMPLE_PROMPTS = [
    "a photograph of a cat",
    "a red circle on a blue background",
    "a landscape with mountains",
    "an astronaut",
]


@dataclass
class EvaluationSettings:
    sample_every: int = opt(0, "Write a sample grid of the sample prompts every N steps (0: never).", low=0)
    sample_prompts: list[str] = opt(
        factory=lambda: list(SAMPLE_PROMPTS),
        flag="--sample-prompt",
        help="A prompt of the sample grids (repeatable).",
    )
    sample_steps: int = opt(20, "Denoising steps of the sample grids.", low=1)
    sample_sampler: str | None = opt(
        None,
        "The sample grids' sampler, as `latentmill sample --sampler` (default: the family's: ddim, or euler).",
        choices=SAMPLER_NAMES,
        since="0.4",
    )
    sample_negative_prompt: str = opt(
        "", "What the sample grids' guidance steers away from (default: the empty caption).", since="0.4"
    )
    eval_every: int = opt(
        0,
        "Every N steps, the validation loss: the denoising loss on held-out latents at 8 fixed timesteps with "
        "fixed noise (raw and EMA weights), logged as val_loss (0: never).",
        low=0,
        since="0.2",
    )
    eval_shards: str | None = opt(
        None,
        "Latents the validation loss is measured on (default: the validation/ folder `encode "
        "--validation-share` made beside the first training folder).",
        since="0.2",
    )
    eval_samples: int = opt(
        128,
        "The most held-out samples the validation loss uses (128: about 3% of training time at --eval-every 1000, BENCHMARKS.md).",
        low=1,
        since="0.2",
    )
    eval_prompts: str | None = opt(
        None,
        "With --eval-every: also generate one image per prompt of this file (EMA weights, fixed seed) on rank 0 "
        "and log their CLIP score (and FID/KID against --eval-reference).",
        path=True,
        since="0.2",
    )
    eval_reference: str | None = opt(
        None,
        "--eval-prompts: the reference images (or .npz statistics) of FID and KID.",
        path=True,
        since="0.2",
    )
    eval_features: str = opt(
        "clip:ViT-L-14-quickgelu:openai",
        "--eval-prompts: the CLIP model of the score and the feature space of FID/KID (clip:MODEL[:PRETRAINED]; "
        "see `latentmill eval`).",
        since="0.2",
    )

    def check_section(self) -> None:
        for key in ("eval_prompts", "eval_shards"):
            if getattr(self, key) is not None and not self.eval_every:
                raise InputError(
                    f"{self.name(key)} is measured every --eval-every steps, which is 0 (never): give "
                    f"{self.name('eval_every')} N too."
                )
        if self.eval_reference is not None and self.eval_prompts is None:
            raise InputError(
                f"{self.name('eval_reference')} is what --eval-prompts' images are compared with (FID, KID): "
                f"give {self.name('eval_prompts')} FILE too."
            )
