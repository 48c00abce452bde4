"""Loss masks (kohya's `alpha_mask`): which pixels of an image training learns from, at latent size.

The mask is the image's alpha channel (a subject cut out on a transparent background: the background is
not learned), or a mask file packed beside the image (`NAME.mask.png`, white = learned), or all ones. It
is placed like the pixels (the same resize and crop to the sample's bucket), then averaged over each
8 x 8 block (area downsampling) to the latent's size, as values in [0, 1].
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from latentmill.curate.buckets import Placement, resize_and_crop


def source_mask(image_bytes: bytes, mask_bytes: bytes | None) -> Image.Image | None:
    """The mask at the image's own size (mode "L"): the mask file when given, else the image's alpha
    channel, else None (no alpha: every pixel counts)."""
    with Image.open(io.BytesIO(image_bytes)) as opened:
        image = ImageOps.exif_transpose(opened)
        size = image.size
        if mask_bytes is None:
            has_alpha = image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info)
            return image.convert("RGBA").getchannel("A") if has_alpha else None
    with Image.open(io.BytesIO(mask_bytes)) as mask:
        if mask.size != size:  # a mask of another picture, or of another crop: never stretched to fit
            raise MaskSizeMismatch(mask.size, size)
        return mask.convert("L")


class MaskSizeMismatch(ValueError):
    def __init__(self, mask_size: tuple[int, int], image_size: tuple[int, int]):
        super().__init__(f"{mask_size[0]}x{mask_size[1]} against its image's {image_size[0]}x{image_size[1]}")
        self.mask_size, self.image_size = mask_size, image_size


def latent_mask(mask: Image.Image | None, placement: Placement, factor: int) -> np.ndarray:
    """The mask placed like the pixels and area-downsampled by `factor`: float32 (1, h / factor, w / factor)."""
    width, height = placement.bucket
    if mask is None:
        return np.ones((1, height // factor, width // factor), np.float32)
    pixels = np.asarray(resize_and_crop(mask, placement), dtype=np.float32) / 255.0
    blocks = pixels.reshape(height // factor, factor, width // factor, factor)
    return blocks.mean(axis=(1, 3))[None].astype(np.float32)
