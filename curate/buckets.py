"""Aspect-ratio buckets: generation (the kohya-ss / NovelAI scheme), assignment and resize-then-crop.

Buckets for resolution R have area at most R² (512 → 262,144 px). Widths run from the minimum to the
maximum side in `step`s; each takes the largest height that is a multiple of `step`, keeps the area within
R² and stays within the maximum side; transposes and the R x R square are added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

Bucket = tuple[int, int]  # (width, height) in px


def make_buckets(
    resolution: int, min_side: int | None = None, max_side: int | None = None, step: int = 64
) -> list[Bucket]:
    """The bucket list for `resolution`, sorted by aspect ratio (width / height).

    Defaults: min side R/2, max side 2R (512: 256..1024; 1024: 512..2048).
    """
    min_side = min_side if min_side is not None else resolution // 2
    max_side = max_side if max_side is not None else resolution * 2
    if step <= 0 or resolution % step or min_side % step or max_side % step:
        raise ValueError(
            f"resolution {resolution}, min side {min_side} and max side {max_side} must be multiples of step {step}"
        )
    if not min_side <= resolution <= max_side:
        raise ValueError(
            f"resolution {resolution} must lie between min side {min_side} and max side {max_side}"
        )
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, (area // width) // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


ASSIGN_RULES = ("kohya", "log")


def assign_bucket(width: int, height: int, buckets: list[Bucket], rule: str = "kohya") -> Bucket:
    """The bucket an image of width x height goes to.

    `kohya` (kohya-ss sd-scripts' BucketManager): a bucket of exactly the image's size if there is one, else
    the nearest in linear aspect ratio (w / h), ties to the first in (width, height) order. `log`: the
    nearest in log aspect ratio (ties: the larger area), symmetric between tall and wide images: 2:1 and
    1:2 are equally far from 1:1, where linear ratios put 2:1 twice as far.
    """
    if rule == "kohya":
        if (width, height) in buckets:
            return (width, height)
        target = width / height
        return min(sorted(buckets), key=lambda b: abs(b[0] / b[1] - target))  # min keeps the first of ties
    if rule == "log":
        target = math.log(width / height)
        return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))
    raise ValueError(f"bucket assignment {rule!r}: use {' or '.join(ASSIGN_RULES)}")


@dataclass(frozen=True)
class Placement:
    """How an image of `original_size` fills its bucket: scaled by `scale`, then cropped at (top, left).

    Coordinates are in the scaled image (as SDXL's crop conditioning expects); a bucket pixel (x, y)
    comes from source pixel ((x + left) / scale, (y + top) / scale).
    """

    bucket: Bucket
    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop: tuple[int, int]  # (top, left)

    @property
    def scale(self) -> float:
        return self.resized_size[0] / self.original_size[0]


def place(width: int, height: int, bucket: Bucket, rng=None, rule: str = "kohya") -> Placement:
    """Scale (width, height) to cover `bucket`, then crop: centred, or uniformly at random with `rng`.

    The side that fits the bucket exactly sets the scale; the other is rounded to the nearest pixel under
    `kohya` (as its BucketManager does), rounded up under `log`."""
    bw, bh = bucket
    if rule == "kohya":
        scale = bh / height if width / height > bw / bh else bw / width
        rw, rh = max(bw, int(width * scale + 0.5)), max(bh, int(height * scale + 0.5))
    else:
        scale = max(bw / width, bh / height)
        rw, rh = max(bw, math.ceil(width * scale - 1e-6)), max(bh, math.ceil(height * scale - 1e-6))
    if rng is None:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    else:
        top, left = int(rng.integers(0, rh - bh + 1)), int(rng.integers(0, rw - bw + 1))
    return Placement(bucket=bucket, original_size=(width, height), resized_size=(rw, rh), crop=(top, left))


def needed_upscale(width: int, height: int, bucket: Bucket) -> float:
    """How much the image must be enlarged to cover its bucket (1.0 or less: no enlarging)."""
    return max(bucket[0] / width, bucket[1] / height)


def resize_and_crop(image: Image.Image, placement: Placement) -> Image.Image:
    """Apply a placement: high-quality resize (Lanczos, with a box pre-reduction for big factors), then crop."""
    resized = image.resize(placement.resized_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    top, left = placement.crop
    bw, bh = placement.bucket
    return resized.crop((left, top, left + bw, top + bh))
