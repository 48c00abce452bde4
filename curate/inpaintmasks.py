"""Inpainting masks drawn at encode time (`encode --mask-variants K`), as the published inpainting models
were trained: random rectangles and ellipses, LaMa-style free-form strokes, and the whole image masked in a
share of the variants (a quarter by default, as in Stable Diffusion's inpainting recipe).

A mask is True where the image is to be filled in. Variant k of a sample is drawn from a generator seeded by
(seed, shard, key, k), so a re-run encodes the same masks. The kinds and their odds are `--mask-mix`.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
from PIL import Image, ImageDraw

from latentmill.errors import InputError

KINDS = ("rectangles", "ellipses", "strokes", "full")
DEFAULT_MIX = "rectangles=0.25,ellipses=0.25,strokes=0.25,full=0.25"


def parse_mix(text: str) -> dict[str, float]:
    """`kind=weight,...` as {kind: probability} (weights normalised); bad text is an InputError naming it."""
    mix: dict[str, float] = {}
    for part in str(text).split(","):
        kind, sep, weight = part.strip().partition("=")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or kind not in KINDS or not (math.isfinite(value) and value >= 0) or kind in mix:
            raise InputError(
                f"--mask-mix {text!r}: write kind=weight pairs of {', '.join(KINDS)}, each once, e.g. "
                f"{DEFAULT_MIX}."
            )
        mix[kind] = value
    total = sum(mix.values())
    if total <= 0:
        raise InputError(f"--mask-mix {text!r}: the weights add up to 0; give at least one a weight.")
    return {kind: value / total for kind, value in mix.items()}


def variant_rng(seed: int, shard: str, key: str, variant: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"{shard}/{key}".encode()), variant])


def variant_mask(seed: int, shard: str, key: str, variant: int, height: int, width: int, mix: dict) -> tuple:
    """(kind, bool (height, width) mask) of one variant of one sample."""
    rng = variant_rng(seed, shard, key, variant)
    kinds = list(mix)
    kind = kinds[int(rng.choice(len(kinds), p=[mix[k] for k in kinds]))]
    return kind, draw_mask(kind, height, width, rng)


def draw_mask(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "full":
        return np.ones((height, width), bool)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if kind in ("rectangles", "ellipses"):
        for _ in range(int(rng.integers(1, 5))):
            w, h = rng.uniform(0.1, 0.6) * width, rng.uniform(0.1, 0.6) * height
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            (draw.rectangle if kind == "rectangles" else draw.ellipse)([x, y, x + w, y + h], fill=255)
    else:  # strokes: random walks drawn with a thick brush and round joints (LaMa's irregular masks)
        side = min(width, height)
        for _ in range(int(rng.integers(1, 6))):
            brush = max(1, int(rng.uniform(0.05, 0.15) * side))
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            for _ in range(int(rng.integers(4, 13))):
                angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.05, 0.3) * side
                nx = float(np.clip(x + length * math.cos(angle), 0, width - 1))
                ny = float(np.clip(y + length * math.sin(angle), 0, height - 1))
                draw.line([(x, y), (nx, ny)], fill=255, width=brush)
                draw.ellipse([nx - brush / 2, ny - brush / 2, nx + brush / 2, ny + brush / 2], fill=255)
                x, y = nx, ny
    return np.asarray(canvas) > 127


def latent_size_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """A pixel mask at latent size as diffusers' inpainting pipeline makes it (nearest-neighbour
    interpolation): float32 (1, h / factor, w / factor) of 0 and 1."""
    import torch

    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    small = torch.nn.functional.interpolate(tensor, size=(mask.shape[0] // factor, mask.shape[1] // factor))
    return small[0].numpy()
