"""The U-Net (diffusers `UNet2DConditionModel`) from named configs or a pretrained folder, and the
frozen text encoder (open_clip's text tower, a pipeline's CLIPTextModel, or embeddings stored in the shards)."""

from __future__ import annotations

from pathlib import Path

from latentmill.errors import InputError

UNET_CONFIGS = {
    "tiny": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
    "sd2-base": dict(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
}


def size_conditioning_config(cross_attention_dim: int, spec: str) -> dict:
    """SDXL-style micro-conditioning: (original h, w, crop top, left, target h, w) Fourier-embedded and added
    to the timestep embedding together with the pooled caption."""
    time_dim = 8 if spec == "tiny" else 256
    return dict(
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=cross_attention_dim + 6 * time_dim,
    )


def load_pretrained_unet(spec: str | Path, what: str):
    """A diffusers U-Net from a pipeline folder (its unet/), a U-Net folder, or a model id in the local cache;
    never downloads. `what` starts the error message (e.g. "--model X: not"), which ends with the fix."""
    from diffusers import UNet2DConditionModel

    path = Path(spec)
    try:
        return UNet2DConditionModel.from_pretrained(
            spec,
            subfolder="unet" if (path / "unet").exists() or not path.exists() else None,
            local_files_only=True,
        )
    except (OSError, ValueError) as err:
        raise InputError(
            f"{what} a diffusers U-Net found locally ({str(err).splitlines()[0][:120]}). Download it first "
            f"or give a local folder."
        ) from None


def build_unet(
    spec: str,
    latent_channels: int,
    cross_attention_dim: int,
    sample_size: int,
    seed: int = 0,
    size_conditioning: bool = False,
    inpainting: bool = False,
    frozen: bool = False,
):
    """A named architecture with fresh weights (seeded), or a pretrained diffusers folder/id (fine-tuning).
    `inpainting`: the U-Net takes the mask and the masked image's latents too (train/inpainting.py); a
    4-channel pretrained one gets them as zero-initialised conv_in channels, unless it stays `frozen`
    (LoRA), where new channels would never learn."""
    import torch
    from diffusers import UNet2DConditionModel

    from latentmill.train.inpainting import inpainting_channels, inpainting_unet

    if spec in UNET_CONFIGS:
        torch.manual_seed(seed)
        extra = size_conditioning_config(cross_attention_dim, spec) if size_conditioning else {}
        return UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=inpainting_channels(latent_channels) if inpainting else latent_channels,
            out_channels=latent_channels,
            cross_attention_dim=cross_attention_dim,
            **UNET_CONFIGS[spec],
            **extra,
        )
    unet = load_pretrained_unet(spec, f"--model {spec}: not a named config ({', '.join(UNET_CONFIGS)}) nor")
    if inpainting:
        unet, widened = inpainting_unet(unet, latent_channels, spec)
        if widened and frozen:
            raise InputError(
                f"--inpainting with --lora-rank: --model {spec} is not an inpainting U-Net, and LoRA leaves its "
                f"new mask channels at zero. Give an inpainting model (9 input channels), or --init-from a run "
                f"trained with --inpainting."
            )
    elif unet.config.in_channels == inpainting_channels(latent_channels):
        raise InputError(
            f"--model {spec} is an inpainting U-Net ({unet.config.in_channels} input channels): train it with "
            f"--inpainting on latents encoded with --mask-variants."
        )
    elif unet.config.in_channels != latent_channels:
        raise InputError(
            f"--model {spec} takes {unet.config.in_channels}-channel latents; the shards hold {latent_channels}."
        )
    if size_conditioning and unet.config.addition_embed_type != "text_time":
        raise InputError(
            f"--model {spec} has no size/crop conditioning (addition_embed_type 'text_time'); "
            f"drop --size-conditioning or start from a named config."
        )
    if unet.config.cross_attention_dim != cross_attention_dim:
        raise InputError(
            f"--model {spec} cross-attends to {unet.config.cross_attention_dim}-d text; the text encoder "
            f"gives {cross_attention_dim}-d."
        )
    return unet
