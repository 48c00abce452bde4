"""Sample images for tests and the demo: scikit-image photographs and seeded synthetic pictures,
rendered at any size and in the formats the web serves (JPEG, PNG with alpha, grayscale, CMYK, WebP,
EXIF-rotated), plus the broken payloads a crawler meets (truncated, HTML, empty, decompression bomb).
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

# scikit-image photographs bundled with the package (no download), with captions
PHOTOS = {
    "astronaut": "a portrait of an astronaut in a white spacesuit in front of an american flag",
    "coffee": "a cup of coffee with latte art on a saucer, seen from above",
    "chelsea": "a ginger tabby cat looking to the side",
    "rocket": "a rocket standing on the launch pad under a blue sky",
    "hubble_deep_field": "hubble deep field, thousands of distant galaxies in black space",
    "immunohistochemistry": "a microscope slide of stained tissue in brown and blue",
    "retina": "a photograph of the back of a human eye, the retina with blood vessels",
    "camera": "a black and white photo of a cameraman with a tripod",
    "moon": "a grayscale photograph of the surface of the moon",
    "coins": "old coins on a dark table, black and white",
    "colorwheel": "a color wheel with every hue",
    "clock": "a wall clock photographed at an angle",
}

COLORS = {
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (230, 200, 40),
    "purple": (130, 50, 160),
    "orange": (240, 130, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "stripes")


@lru_cache(maxsize=32)
def _photo(name: str) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, name)()
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    image = Image.fromarray(array)
    return image.convert("RGB") if image.mode not in ("RGB", "L") else image


def photo(name: str, width: int, height: int, view: int = 0) -> Image.Image:
    """A scikit-image photograph scaled to cover width x height, then cropped: view 0 is the centre crop,
    view k > 0 a seeded zoomed-in crop elsewhere in the picture (more distinct photographs from the few
    bundled ones)."""
    source = _photo(name)
    zoom, fx, fy = 1.0, 0.5, 0.5
    if view:
        rng = np.random.default_rng([view, sum(map(ord, name))])
        zoom, fx, fy = rng.uniform(1.2, 1.8), rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9)
    scale = max(width / source.width, height / source.height) * zoom
    size = (max(width, round(source.width * scale)), max(height, round(source.height * scale)))
    image = source.resize(size, Image.Resampling.LANCZOS)
    left, top = round((image.width - width) * fx), round((image.height - height) * fy)
    return image.crop((left, top, left + width, top + height))


def synthetic(seed: int, width: int, height: int) -> tuple[Image.Image, str]:
    """A seeded picture (a shape of one colour on a gradient of another) and the caption that says so."""
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    fg_name, bg_name = rng.choice(names, size=2, replace=False)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    bg, fg = np.array(COLORS[bg_name], float), np.array(COLORS[fg_name], float)
    ramp = np.linspace(0.75, 1.1, height)[:, None, None] * np.ones((1, width, 1))
    noise = rng.normal(0, 6, (height, width, 1))
    image = Image.fromarray(np.clip(bg * ramp + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cx, cy, r = (
        width * rng.uniform(0.35, 0.65),
        height * rng.uniform(0.35, 0.65),
        min(width, height) * rng.uniform(0.2, 0.35),
    )
    color = tuple(int(c) for c in fg)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    else:
        step = max(4, int(r / 3))
        for x in range(0, width, 2 * step):
            draw.rectangle((x, 0, x + step, height), fill=color)
    return image, f"a {fg_name} {shape} on a {bg_name} background"


def add_watermark(image: Image.Image, text: str = "(c) STOCKPHOTO") -> Image.Image:
    """Tile a semi-transparent text watermark over the image, as stock-photo sites do."""
    base = image.convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    step_x, step_y = max(60, base.width // 3), max(30, base.height // 5)
    for y in range(0, base.height, step_y):
        for x in range(-step_x // 2 if (y // step_y) % 2 else 0, base.width, step_x):
            draw.text((x, y), text, fill=(255, 255, 255, 150))
    draw.line((0, 0, base.width, base.height), fill=(255, 255, 255, 90), width=3)
    draw.line((0, base.height, base.width, 0), fill=(255, 255, 255, 90), width=3)
    return Image.alpha_composite(base, layer).convert("RGB")


def encode(
    image: Image.Image, fmt: str, mode: str = "RGB", orientation: int | None = None, quality: int = 90
) -> bytes:
    """Encode as jpg|png|webp in `mode` (RGB, RGBA, L, CMYK); `orientation` writes that EXIF tag (JPEG)."""
    if mode == "RGBA":
        alpha = Image.linear_gradient("L").resize(image.size)
        image = image.convert("RGB")
        image.putalpha(alpha)
    else:
        image = image.convert(mode)
    buffer = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        exif = None
        if orientation:
            tags = Image.Exif()
            tags[0x0112] = orientation
            exif = tags.tobytes()
        image.save(buffer, "JPEG", quality=quality, **({"exif": exif} if exif else {}))
    elif fmt == "png":
        image.save(buffer, "PNG")
    elif fmt == "webp":
        image.save(buffer, "WEBP", quality=quality)
    else:
        raise ValueError(f"unknown image format {fmt!r}: use jpg, png or webp")
    return buffer.getvalue()


def decompression_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A small PNG that declares width x height pixels (a few rows of data follow)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def truncated_jpeg(keep_fraction: float = 0.4) -> bytes:
    """A JPEG cut off part-way through its data."""
    data = encode(photo("astronaut", 400, 400), "jpg")
    return data[: int(len(data) * keep_fraction)]
