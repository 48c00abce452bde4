"""Inpainting training (`train --inpainting`), as Stable Diffusion's inpainting models were made.

The U-Net's input is `cat([noisy_latents, mask, masked_image_latents])`: 2C + 1 channels (9 for SD). The
mask and the masked image's latents are what `encode --mask-variants K` stored (curate/inpaintmasks.py,
curate/vae.py `encode_masked`); the loader draws one of the K variants per sample and step. A 4-channel
pretrained U-Net gets the extra `conv_in` input channels zero-initialised, so at step 0 it predicts exactly
what the base model predicts, whatever the mask; a 9-channel inpainting model trains as it is.
"""

from __future__ import annotations

import numpy as np
import torch

from latentmill.errors import InputError

ENCODE_OPTION = "`latentmill encode --mask-variants K`"


def inpainting_channels(latent_channels: int) -> int:
    """The U-Net input of an inpainting model: latents, one mask channel, the masked image's latents."""
    return 2 * latent_channels + 1


def widen_conv_in(unet, channels: int):
    """`unet` with `conv_in` taking `channels` inputs: the old kernel on the first ones, zeros on the new."""
    old = unet.conv_in
    new = torch.nn.Conv2d(
        channels, old.out_channels, old.kernel_size, old.stride, old.padding, dtype=old.weight.dtype
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=channels)
    return unet


def inpainting_unet(unet, latent_channels: int, spec: str):
    """(the U-Net ready for inpainting, whether its conv_in was widened). A 4-channel U-Net is widened; a
    (2C + 1)-channel one is kept; anything else is refused."""
    wanted = inpainting_channels(latent_channels)
    if unet.config.in_channels == wanted:
        return unet, False
    if unet.config.in_channels == latent_channels:
        return widen_conv_in(unet, wanted), True
    raise InputError(
        f"--inpainting: --model {spec} takes {unet.config.in_channels} input channels; an inpainting U-Net for "
        f"{latent_channels}-channel latents takes {latent_channels} (widened here) or {wanted}."
    )


def check_inpainting_data(manifests: list[dict], names: list) -> None:
    """Every latent folder trained with --inpainting holds mask variants."""
    missing = [str(n) for n, m in zip(names, manifests, strict=True) if not m.get("inpainting")]
    if missing:
        raise InputError(
            f"--inpainting: {', '.join(missing)} hold(s) no inpainting masks; encode with {ENCODE_OPTION} "
            f"(K masks and masked-image latents per sample)."
        )


def draw_variants(samples: list[dict], rng: np.random.Generator) -> dict:
    """One stored variant per sample (drawn from the batch's generator): {"inpaint_mask": (B, 1, h, w),
    "masked_latent": (B, C, h, w)} float32 tensors, or {} when the samples hold none."""
    if not samples or not all("inpaint_mask" in s for s in samples):
        return {}
    picks = rng.integers(0, len(samples[0]["inpaint_mask"]), size=len(samples))
    return {
        name: torch.from_numpy(
            np.stack([s[name][k] for s, k in zip(samples, picks, strict=True)]).astype(np.float32)
        )
        for name in ("inpaint_mask", "masked_latent")
    }


def conditioning(mask: torch.Tensor, masked_latent: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """What goes beside the noisy latents: the mask and the masked image's latents in the U-Net's space."""
    from latentmill.train.latentspace import to_unet_space

    return torch.cat([mask, to_unet_space(masked_latent, scale, shift)], dim=1)


def unconditioned(
    unet, vae, n: int, size: tuple[int, int], scale: float, shift: float, device
) -> torch.Tensor:
    """The conditioning of plain text-to-image with an inpainting U-Net: everything masked, the masked
    image all grey (zeros in [-1, 1]), as the inpainting models were trained for 25% of the time."""
    channels = unet.config.out_channels
    h, w = size[1] // 8, size[0] // 8
    if vae is None:
        masked = torch.zeros((n, channels, h, w), device=device)
    else:
        grey = torch.zeros((n, 3, size[1], size[0]), device=device, dtype=next(vae.parameters()).dtype)
        masked = vae.encode(grey).latent_dist.mean.float()
    return conditioning(torch.ones((n, 1, h, w), device=device), masked, scale, shift)


def grid_examples(shard: str, manifest: dict, count: int) -> dict:
    """The first samples of `shard` in its first sample's bucket (at most `count`), variant 0: their captions,
    masks and masked latents, for the sample grids of an inpainting run."""
    from latentmill.curate.latentshards import iter_latent_shard

    picked: list[dict] = []
    for sample in iter_latent_shard(shard, manifest):
        if picked and sample["meta"]["bucket"] != picked[0]["meta"]["bucket"]:
            continue
        picked.append(sample)
        if len(picked) == count:
            break
    return {
        "captions": [s["caption"] for s in picked],
        "mask": torch.from_numpy(np.stack([s["inpaint_mask"][0] for s in picked]).astype(np.float32)),
        "masked_latent": torch.from_numpy(
            np.stack([s["masked_latent"][0] for s in picked]).astype(np.float32)
        ),
        "size": tuple(picked[0]["meta"]["bucket"]),
    }


@torch.no_grad()
def masked_inputs(examples: dict, vae) -> np.ndarray:
    """The masked images the grid shows above the results: decoded, with the part to fill in tinted red."""
    latents = examples["masked_latent"].to(next(vae.parameters()).device, next(vae.parameters()).dtype)
    pixels = vae.decode(latents).sample.float()
    images = ((pixels.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).cpu().numpy()
    mask = torch.nn.functional.interpolate(examples["mask"], size=images.shape[1:3], mode="nearest")
    mask = mask[:, 0, :, :, None].numpy()
    tinted = images * (1 - 0.5 * mask) + np.array([255.0, 0, 0]) * 0.5 * mask
    return tinted.round().clip(0, 255).astype(np.uint8)
