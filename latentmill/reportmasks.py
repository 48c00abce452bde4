"""The report's mask examples: what `encode --alpha-mask` (loss masks) and `--mask-variants` (inpainting
masks) stored for the first samples of the newest latent folder that has them, at latent size, enlarged."""

from __future__ import annotations

import base64
import io

from latentmill.layout import Layout
from latentmill.reporthtml import Markup, concat, figure, html

EXAMPLES = 6  # samples shown
ENLARGE = 8  # a latent cell as 8 x 8 pixels: the mask over the image it came from


def mask_section(lay: Layout) -> Markup | None:
    """Figures of the stored masks (white: learned / kept, black: not learned / to fill in), or None when no
    latent folder holds masks."""
    from latentmill.curate.latentshards import iter_latent_shard, read_manifest

    for _, folder in sorted(lay.latent_folders().items(), reverse=True):
        manifest = read_manifest(folder)
        if not (manifest.get("has_mask") or manifest.get("inpainting")):
            continue
        figures = []
        for shard in sorted(folder.glob("*.tar"))[:1]:
            for number, sample in enumerate(iter_latent_shard(shard, manifest, errors={})):
                if number == EXAMPLES:
                    break
                if "mask" in sample:
                    figures.append(_figure(sample["mask"][0], f"{sample['key']}: loss mask"))
                for k, mask in enumerate(sample.get("inpaint_mask", ())):
                    figures.append(_figure(1 - mask[0], f"{sample['key']}: inpainting mask {k}"))
        note = html("<p>{}: white is learned (loss masks) or kept (inpainting masks).</p>", folder.name)
        return note + html('<div class="grid">{}</div>', concat(figures))
    return None


def _figure(mask, caption: str) -> Markup:
    import numpy as np
    from PIL import Image

    pixels = (np.clip(np.asarray(mask, np.float32), 0, 1) * 255).astype(np.uint8)
    image = Image.fromarray(pixels).resize(
        (pixels.shape[1] * ENLARGE, pixels.shape[0] * ENLARGE), Image.Resampling.NEAREST
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return figure("mask", uri, caption)
