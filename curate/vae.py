"""The VAE: named architectures (random weights, for tests and speed runs), local folders, or model ids.

Every VAE has a fingerprint (a hash of its config and weights) recorded in the latent manifest, so
latents made with one VAE are never read as if made with another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentmill.curate.fingerprints import weights_fingerprint
from latentmill.errors import InputError

# diffusers AutoencoderKL configs; "sd15" is Stable Diffusion 1.x/2.x's VAE architecture, "tiny16" a tiny one
# with the 16-channel latents of SD3 and Flux
ARCHITECTURES = {
    "tiny": dict(
        block_out_channels=(8, 16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8
    ),
    "sd15": dict(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32
    ),
    # SD3's and Flux's shape of latent space: 16 channels, no quant convs, a shift factor (SD3's factors)
    "tiny16": dict(
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
}


@dataclass
class LoadedVae:
    model: object  # diffusers.AutoencoderKL
    name: str
    fingerprint: str
    scaling_factor: float
    shift_factor: float | None
    latent_channels: int

    def describe(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint, "config": architecture_config(self.model)}


def architecture_config(model) -> dict:
    """The model's config without diffusers' bookkeeping keys (`_use_default_values` is a set: its order
    changes from process to process)."""
    return json.loads(
        json.dumps({k: v for k, v in dict(model.config).items() if not k.startswith("_")}, default=str)
    )


def _pretrained_vae(spec: str):
    """A VAE from a local folder or the local Hugging Face cache (never downloading): a VAE of its own
    (config.json at the top, as stabilityai/sd-vae-ft-mse) or a pipeline's (vae/config.json)."""
    from diffusers import AutoencoderKL

    path = Path(spec)
    if path.exists():
        layouts = ["vae"] if (path / "vae" / "config.json").exists() else [None]
    else:
        layouts = [None, "vae"]  # a VAE repository, then a pipeline repository
    errors = []
    for subfolder in layouts:
        try:
            return AutoencoderKL.from_pretrained(
                spec, subfolder=subfolder, local_files_only=not path.exists()
            )
        except (OSError, ValueError) as err:
            errors.append(str(err).splitlines()[0][:160])
    hub = (
        f" Download it first: `hf download {spec}` for a VAE repository (such as stabilityai/sd-vae-ft-mse), "
        f"or `hf download {spec} --include 'vae/*'` for a pipeline's VAE."
        if not path.exists() and spec.count("/") == 1
        else ""
    )
    raise InputError(
        f"VAE '{spec}' could not be loaded ({errors[0]}). Give a local diffusers folder (config.json and "
        f"diffusion_pytorch_model.safetensors, or a pipeline folder with vae/), or an architecture name: "
        f"{', '.join(ARCHITECTURES)}.{hub}"
    ) from None


def load_vae(spec: str, device: str = "cpu", dtype: str = "fp32", seed: int = 0) -> LoadedVae:
    """`spec`: an architecture name (random weights from `seed`), a local diffusers folder, or a model id."""
    import torch
    from diffusers import AutoencoderKL

    if spec in ARCHITECTURES:
        blocks = len(ARCHITECTURES[spec]["block_out_channels"])
        torch.manual_seed(seed)
        model = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            **ARCHITECTURES[spec],
        )
        name = f"{spec} (random init, seed {seed})"
    else:
        model = _pretrained_vae(spec)
        name = spec
    model.eval().requires_grad_(False)
    fingerprint = weights_fingerprint(model.state_dict(), architecture_config(model))
    model.to(device=device)
    if dtype != "fp32":
        model.to(dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    if device.startswith("cuda"):
        model.to(memory_format=torch.channels_last)
    return LoadedVae(
        model=model,
        name=name,
        fingerprint=fingerprint,
        scaling_factor=float(model.config.scaling_factor),
        shift_factor=getattr(model.config, "shift_factor", None),
        latent_channels=int(model.config.latent_channels),
    )


def _to_tensor(pixels: np.ndarray, device: str, dtype):
    """uint8 (N, H, W, 3) -> the VAE's input in [-1, 1]: pinned and copied without blocking on CUDA."""
    import torch

    tensor = torch.from_numpy(pixels)
    if device.startswith("cuda"):
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    # the layout is fixed on the uint8 batch (a quarter of the float one), then scaled in place: one float
    # copy of the batch at a time. Contiguous NCHW on CPU: a permuted (NHWC-strided) batch takes other conv
    # kernels whose rounding depends on the batch, and a sample's latent must not depend on its batch-mates
    tensor = tensor.permute(0, 3, 1, 2).contiguous(memory_format=_memory_format(device))
    tensor = tensor.to(dtype=torch.float32).div_(127.5).sub_(1.0)
    return tensor.to(dtype)


def encode_batch(vae, images, device: str, with_std: bool, with_flip: bool = False):
    """Posterior mean (and std, and the flipped image's mean) of a batch of same-size RGB images (PIL images
    or a uint8 (N, H, W, 3) array), as float32 numpy arrays. The flip mirrors the batch on the device: one
    decode and one host-to-device copy serve both."""
    import torch

    pixels = (
        images
        if isinstance(images, np.ndarray)
        else np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    )
    dtype = next(vae.model.parameters()).dtype
    with torch.inference_mode():
        batch = _to_tensor(pixels, device, dtype)
        dist = vae.model.encode(batch).latent_dist
        mean = dist.mean.float().cpu().numpy()
        std = dist.std.float().cpu().numpy() if with_std else None
        flipped = None
        if with_flip:
            mirrored = torch.flip(batch, dims=[3]).contiguous(memory_format=_memory_format(device))
            flipped = vae.model.encode(mirrored).latent_dist.mean.float().cpu().numpy()
    return mean, std, flipped


def encode_masked(vae, pixels: np.ndarray, masks: np.ndarray, device: str) -> np.ndarray:
    """Posterior means of masked images as Stable Diffusion's inpainting recipe makes them: the image in
    [-1, 1] times (mask < 0.5), so what is to be filled in is 0 (grey). `pixels` uint8 (N, H, W, 3), `masks`
    (N, H, W), True (or 1) where masked."""
    import torch

    dtype = next(vae.model.parameters()).dtype
    with torch.inference_mode():
        batch = _to_tensor(pixels, device, dtype)
        keep = torch.from_numpy(np.asarray(masks, dtype=np.float32) < 0.5).to(batch.device)[:, None]
        return vae.model.encode(batch * keep.to(dtype)).latent_dist.mean.float().cpu().numpy()


def _memory_format(device: str):
    import torch

    return torch.channels_last if device.startswith("cuda") else torch.contiguous_format
