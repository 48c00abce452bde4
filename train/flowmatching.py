"""Rectified-flow (flow matching) training, as the SD3 paper and diffusers' SD3 and Flux training scripts do
it: the objective of the transformer families (SD3/3.5, Flux).

    u ~ density (logit_normal(mean, std), mode(scale) or uniform)   -- compute_density_for_timestep_sampling
    index = int(u * 1000); t = scheduler.timesteps[index]; sigma = scheduler.sigmas[index]
    x_sigma = (1 - sigma) * x_0 + sigma * noise                      -- FlowMatchEulerDiscreteScheduler.scale_noise
    target = noise - x_0
    loss = mean(weighting(sigma) * (prediction - target)^2)          -- compute_loss_weighting_for_sd3

The scheduler is diffusers' `FlowMatchEulerDiscreteScheduler` with the family's `shift` (SD3: 3.0), so the
sigmas are the ones diffusers trains and samples with. Flux's resolution-dependent shift
(`dynamic_shift`) moves each sample's sigma by mu = the linear interpolation of (base_shift, max_shift)
over the image's token count (256 to 4096 tokens), exp(mu) / (exp(mu) + 1/sigma - 1), as the Flux pipeline
shifts its sampling sigmas. Every draw comes from the generator passed in (noise, then u), so a step is a
pure function of its batch and its seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from latentmill.train.objective import PriorLoss

DENSITIES = ("logit_normal", "mode", "uniform")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def flow_scheduler(shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def density(kind: str, batch: int, generator, mean: float = 0.0, std: float = 1.0, mode_scale: float = 1.29):
    """u in (0, 1) per sample, drawn as diffusers' compute_density_for_timestep_sampling draws it."""
    if kind == "logit_normal":
        return torch.sigmoid(torch.normal(mean=mean, std=std, size=(batch,), generator=generator))
    u = torch.rand(size=(batch,), generator=generator)
    if kind == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def loss_weighting(kind: str, sigmas: torch.Tensor) -> torch.Tensor:
    """SD3's loss weightings of diffusers' compute_loss_weighting_for_sd3 (none: ones)."""
    if kind == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if kind == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def dynamic_mu(tokens: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's shift for an image of `tokens` latent tokens (the pipeline's calculate_shift, 256 to 4096)."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return tokens * slope + (base_shift - slope * 256)


@dataclass
class FlowMatching(PriorLoss):
    """The flow-matching objective of one family. `predict(model, noisy, timesteps, text, metas, inpaint)`
    is the family's forward call (its packing, position ids, pooled and guidance inputs)."""

    predict: Callable
    shift: float = 3.0
    density: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    weighting: str = "none"
    dynamic_shift: bool = False
    patch_size: int = 2
    device: str = "cpu"
    scheduler: object = field(init=False, repr=False)

    def __post_init__(self):
        self.scheduler = flow_scheduler(1.0 if self.dynamic_shift else self.shift)

    def levels(self, u: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, sigmas) for draws `u`, as the training scripts index the scheduler's tables."""
        index = (
            (u * self.scheduler.config.num_train_timesteps).long().clamp(0, len(self.scheduler.sigmas) - 1)
        )
        sigmas = self.scheduler.sigmas[index].to(torch.float32)
        if self.dynamic_shift:
            tokens = (latents.shape[-2] // self.patch_size) * (latents.shape[-1] // self.patch_size)
            mu = dynamic_mu(tokens)
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        return sigmas * self.scheduler.config.num_train_timesteps, sigmas

    def error(self, model, latents, text, metas, noise, sigmas, inpaint=None) -> torch.Tensor:
        """The weighted element-wise squared error at noise levels `sigmas` (one per sample)."""
        s = sigmas.to(latents.device, latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1.0 - s) * latents + s * noise
        timesteps = (sigmas * self.scheduler.config.num_train_timesteps).to(latents.device)
        prediction = self.predict(model, noisy, timesteps, text, metas, inpaint)
        target = noise - latents
        weight = loss_weighting(self.weighting, sigmas.to(latents.device)).view_as(s).float()
        return weight * F.mse_loss(prediction.float(), target.float(), reduction="none")

    def loss(self, model, latents, text, metas, mask, generator, inpaint=None) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        u = density(
            self.density, latents.shape[0], generator, self.logit_mean, self.logit_std, self.mode_scale
        )
        _, sigmas = self.levels(u, latents)
        error = self.error(model, latents, text, metas, noise, sigmas, inpaint)
        dims = tuple(range(1, error.ndim))
        if mask is None:
            return error.mean(dim=dims).mean()
        mask = mask.float()
        return ((error * mask).mean(dim=dims) / mask.mean(dim=dims).clamp_min(1e-6)).mean()

    def fixed_levels(self, batch: int, device) -> list[torch.Tensor]:
        """8 sigmas spread over (0, 1), for the validation loss."""
        return [torch.full((batch,), (i + 0.5) / 8, device=device) for i in range(8)]
