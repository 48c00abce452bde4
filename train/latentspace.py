"""From a stored latent to what the U-Net is trained on, the way diffusers' training scripts make it.

diffusers' `train_text_to_image.py` computes `vae.encode(pixels).latent_dist.sample() * scaling_factor`
(minus `shift_factor` first for VAEs that have one, SD3/Flux). latentmill stores the posterior's mean as
float16 (`latent.npy`) and, with `encode --std`, its standard deviation (`latent_std.npy`); the manifest
holds `scaling_factor` and `shift_factor`. So, for any trainer reading latentmill shards:

    unet_latent = (float32(mean) + float32(std) * N(0, 1) - shift_factor) * scaling_factor

with the std term only where it was stored (without it the posterior mean stands in, as kohya's latent
cache does). `latentmill train` uses these functions; other trainers can call `unet_input`.
"""

from __future__ import annotations

import numpy as np


def posterior_sample(mean: np.ndarray, std: np.ndarray | None, rng: np.random.Generator | None) -> np.ndarray:
    """float32 posterior sample `mean + std * N(0, 1)`; the mean itself without a std or without an rng."""
    latent = np.asarray(mean, dtype=np.float32)
    if std is None or rng is None:
        return latent
    return latent + np.asarray(std, dtype=np.float32) * rng.standard_normal(latent.shape, dtype=np.float32)


def to_unet_space(latents, scaling_factor: float, shift_factor: float | None = 0.0):
    """VAE latent space -> the U-Net's: (latents - shift) * scale (numpy arrays or torch tensors)."""
    return (latents - (shift_factor or 0.0)) * scaling_factor


def from_unet_space(latents, scaling_factor: float, shift_factor: float | None = 0.0):
    """The U-Net's latent space -> the VAE decoder's input: latents / scale + shift."""
    return latents / scaling_factor + (shift_factor or 0.0)


def starting_noise(shape: tuple, n: int, seed: int, seeds: list[int] | None = None):
    """The samplers' starting latents: one draw of (n, *shape) from `seed`, or each image's from its own seed
    (so an image does not depend on its batch)."""
    import torch

    if seeds is not None:
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def to_images(latents, vae, scaling_factor: float, shift_factor: float | None):
    """(N, H, W, 3) uint8 images of sampled latents: decoded by `vae`, or without one the first three latent
    channels, stretched to the full range."""
    if vae is None:
        pixels = latents[:, :3]
        pixels = (pixels - pixels.amin()) / (pixels.amax() - pixels.amin() + 1e-6) * 2 - 1
    else:
        pixels = vae.decode(from_unet_space(latents, scaling_factor, shift_factor).to(vae.dtype)).sample
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def unet_input(sample: dict, manifest: dict, rng: np.random.Generator | None = None) -> np.ndarray:
    """One stored sample (from `iter_latent_shard` or webdataset: `latent`, optional `latent_std`) as the
    float32 (C, H/8, W/8) array diffusers' scripts feed the U-Net; `rng` draws the posterior sample where the
    std was stored (None: the mean)."""
    latent = posterior_sample(sample["latent"], sample.get("latent_std"), rng)
    return to_unet_space(latent, manifest["scaling_factor"], manifest.get("shift_factor")).astype(np.float32)
