"""The denoising objective of one batch: noise, random timesteps, epsilon or v target, MSE with optional
min-SNR weighting; and DreamBooth's step loss, the subject's plus the weighted class images'.

Every draw comes from the generator passed in, in a fixed order (noise, its offset, timesteps), so a step
is a pure function of its batches and its generator's seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latentmill.train.conditioning import size_condition

VALIDATION_TIMESTEPS = tuple(int((i + 0.5) * 1000 / 8) for i in range(8))


class PriorLoss:
    """DreamBooth's step loss over an objective's `loss`, for every objective (DDPM here, flow matching)."""

    def step_loss(self, model, instance: tuple, class_images: tuple | None, prior_weight: float, generator):
        """One micro-step's loss: the batch's, plus `prior_weight` times the class batch's (DreamBooth's
        prior preservation). Each batch is (latents, text states, metas, loss mask or None, inpainting
        conditioning or None); they may come
        from different buckets, so they take separate forward passes."""
        return self.step_losses(model, instance, class_images, prior_weight, generator)["loss"]

    def step_losses(self, model, instance: tuple, class_images: tuple | None, prior_weight: float, generator):
        """`step_loss` as {"loss": ...}, and with a class batch its two terms apart, logged as DreamBooth
        runs log them: {"loss", "instance_loss", "prior_loss"} (the prior term before its weight)."""
        loss = self.batch_loss(model, instance, generator)
        if class_images is None:
            return {"loss": loss}
        prior = self.batch_loss(model, class_images, generator)
        return {"loss": loss + prior_weight * prior, "instance_loss": loss, "prior_loss": prior}

    def batch_loss(self, model, batch: tuple, generator) -> torch.Tensor:
        latents, text, metas, mask, inpaint = batch
        return self.loss(model, latents, text, metas, mask, generator, inpaint)


@dataclass
class Objective(PriorLoss):
    schedule: object  # a diffusers DDPMScheduler (training_scheduler)
    prediction: str = "epsilon"  # or "v_prediction"
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    size_conditioning: bool = False
    device: str = "cpu"
    # a family's forward call (model, inputs, timesteps, text, metas) -> prediction; default: the U-Net's
    predict: Callable | None = None

    def __post_init__(self):
        # on the device once, not copied there every step
        self.alphas = self.schedule.alphas_cumprod.to(self.device)

    def loss(
        self, model, latents: torch.Tensor, text: torch.Tensor, metas: list, mask, generator, inpaint=None
    ) -> torch.Tensor:
        """The batch's mean loss (a scalar on the model's device). `mask` (B, 1, h, w) in [0, 1], or None:
        each sample's squared error weighted by it and divided by its mean (kohya's masked loss), so a
        subject on a transparent background is learned without the background, at the same loss scale.
        `inpaint` (B, 1 + C, h, w), or None: an inpainting U-Net's mask and masked-image latents, fed
        beside the noisy latents."""
        device, b = latents.device, latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(device)
        if self.noise_offset:
            noise += self.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator).to(
                device
            )
        timesteps = torch.randint(0, 1000, (b,), generator=generator).to(device)
        error = self.error(model, latents, text, metas, noise, timesteps, inpaint)
        if mask is None:
            per_sample = error.mean(dim=(1, 2, 3))
        else:
            mask = mask.float()
            per_sample = (error * mask).mean(dim=(1, 2, 3)) / mask.mean(dim=(1, 2, 3)).clamp_min(1e-6)
        if self.min_snr_gamma:
            alphas = self.alphas[timesteps]
            snr = alphas / (1 - alphas)
            weight = torch.clamp(snr, max=self.min_snr_gamma) / (
                snr if self.prediction == "epsilon" else snr + 1
            )
            per_sample = per_sample * weight
        return per_sample.mean()

    def error(self, model, latents, text, metas, noise, timesteps, inpaint=None) -> torch.Tensor:
        """The element-wise squared error (float32) of `model`'s prediction at `timesteps` with `noise`: the
        part of the loss every caller shares (training draws noise and timesteps; validation fixes them)."""
        noisy = self.schedule.add_noise(latents, noise, timesteps)
        target = (
            noise if self.prediction == "epsilon" else self.schedule.get_velocity(latents, noise, timesteps)
        )
        inputs = noisy if inpaint is None else torch.cat([noisy, inpaint.to(noisy.dtype)], dim=1)
        if self.predict is not None:
            prediction = self.predict(model, inputs, timesteps, text, metas)
        else:
            extra = {"added_cond_kwargs": size_condition(text, metas)} if self.size_conditioning else {}
            prediction = model(inputs, timesteps, encoder_hidden_states=text, **extra).sample
        return F.mse_loss(prediction.float(), target.float(), reduction="none")

    def fixed_levels(self, batch: int, device) -> list[torch.Tensor]:
        """The noise levels validation measures at: 8 timesteps spread over the schedule, one tensor each."""
        return [torch.full((batch,), t, device=device, dtype=torch.long) for t in VALIDATION_TIMESTEPS]
