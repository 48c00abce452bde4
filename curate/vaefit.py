"""Fit a small VAE briefly on image shards, so that its decodes are pictures: the demo's VAE.

A VAE with random weights decodes every latent to the same grey noise, so a demo trained on its latents
cannot show whether the U-Net learned anything. A few hundred CPU steps of the tiny architecture on the
sample's own pictures (reconstruction MSE plus a small KL term, random crops and flips) give a VAE whose
reconstructions resemble the originals; its latents' spread sets the scaling factor, as SD's 0.18215 was
set. The result is a diffusers folder `encode --vae` takes. Not a substitute for a real VAE: at 8x
downsampling and a few minutes of training, fine detail is lost and colours and shapes survive.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from latentmill.curate.storage import temporary_name
from latentmill.errors import InputError


@dataclass
class VaeFitConfig:
    architecture: str = "tiny"  # an architecture of curate.vae (random init, then fitted)
    steps: int = 300
    batch_size: int = 16
    size: int = 96  # every picture resized to size x size for training (crops of `crop` are drawn from it)
    crop: int = 64
    learning_rate: float = 2e-3
    kl_weight: float = 1e-6
    seed: int = 0


def load_pictures(images: str | Path, selection: str | Path | None, size: int) -> np.ndarray:
    """(N, size, size, 3) uint8: every kept, decodable picture of the shards, resized to a square."""
    from PIL import Image

    from latentmill.curate.imageshards import ImageDecodeError, iter_image_shard, list_image_shards
    from latentmill.curate.selection import kept_keys

    pictures = []
    for shard in list_image_shards(images):
        keep = kept_keys(selection, shard.stem)
        for sample in iter_image_shard(shard):
            if keep is not None and sample.key not in keep:
                continue
            try:
                image = sample.image(draft_size=(size, size))
            except ImageDecodeError:
                continue
            pictures.append(np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)))
    if len(pictures) < 4:
        raise InputError(
            f"{images}: only {len(pictures)} decodable kept pictures; a VAE needs at least 4 to fit."
        )
    return np.stack(pictures)


def _to_unit(pixels: np.ndarray):
    import torch

    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def reconstruct(model, pixels: np.ndarray):
    """(the pixels in [-1, 1], the model's reconstructions from the posterior mean, clamped to [-1, 1])."""
    import torch

    with torch.no_grad():
        x = _to_unit(pixels)
        return x, model.decode(model.encode(x).latent_dist.mean).sample.clamp(-1, 1)


def psnr(model, pixels: np.ndarray) -> float:
    """Mean PSNR (dB) of the model's reconstructions of `pixels`."""
    import torch

    x, recon = reconstruct(model, pixels)
    mse = ((recon - x) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return float((10 * torch.log10(4.0 / mse)).mean())


def fit_vae(
    images: str | Path,
    selection: str | Path | None,
    output: str | Path,
    config: VaeFitConfig | None = None,
    log=print,
) -> dict:
    """Fit the VAE and write `output` (a diffusers AutoencoderKL folder, with `fit.json` and
    `reconstructions.png`: originals above, reconstructions below). An existing output is kept."""
    import torch

    from latentmill.curate.vae import load_vae

    config, output = config or VaeFitConfig(), Path(output)
    if (output / "fit.json").exists():
        from latentmill.curate.records import read_record

        return read_record(output / "fit.json", fix=f"delete {output} and fit again")
    pictures = load_pictures(images, selection, config.size)
    rng = np.random.default_rng(config.seed)
    held_out = pictures[rng.permutation(len(pictures))[: min(8, len(pictures))]]
    model = load_vae(config.architecture, seed=config.seed).model
    before = psnr(model, held_out)
    model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    for step in range(config.steps):
        for group in optimizer.param_groups:  # cosine decay: the last steps settle the colours
            group["lr"] = config.learning_rate * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        index = rng.integers(0, len(pictures), config.batch_size)
        top, left = rng.integers(0, config.size - config.crop + 1, 2)
        batch = _to_unit(pictures[index, top : top + config.crop, left : left + config.crop])
        if rng.random() < 0.5:
            batch = torch.flip(batch, dims=[3])
        posterior = model.encode(batch).latent_dist
        recon = model.decode(posterior.sample(generator=generator)).sample
        loss = torch.nn.functional.mse_loss(recon, batch) + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            log(f"[fit-vae] step {step + 1}/{config.steps}: loss {loss.item():.4f}")
    model.eval().requires_grad_(False)
    after = psnr(model, held_out)
    with torch.no_grad():
        latents = model.encode(_to_unit(pictures)).latent_dist.mean
    scaling = float(1.0 / latents.std())  # unit variance in the U-Net's space, as SD's 0.18215
    model.register_to_config(scaling_factor=scaling)
    metrics = {
        "pictures": int(len(pictures)),
        "steps": config.steps,
        "psnr_random_init_db": round(before, 2),
        "psnr_fitted_db": round(after, 2),
        "scaling_factor": round(scaling, 5),
        "config": asdict(config),
    }
    tmp = temporary_name(output)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    _save_reconstructions(model, held_out, tmp / "reconstructions.png")
    (tmp / "fit.json").write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(output, ignore_errors=True)
    os.replace(tmp, output)
    log(
        f"[fit-vae] {len(pictures)} pictures, reconstruction PSNR {before:.1f} dB (random) -> {after:.1f} dB: {output}"
    )
    return metrics


def _save_reconstructions(model, pixels: np.ndarray, path: Path) -> None:
    from PIL import Image

    _, recon = reconstruct(model, pixels)
    recon = ((recon + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    rows = [np.concatenate(list(pixels), axis=1), np.concatenate(list(recon), axis=1)]
    Image.fromarray(np.concatenate(rows, axis=0)).resize(
        (pixels.shape[2] * len(pixels) * 2, pixels.shape[1] * 4), Image.Resampling.NEAREST
    ).save(path)
