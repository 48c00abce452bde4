"""How a dataset falls into a bucket set: counts, aspect error and too-small images per bucket, and a chart.

Sizes come from the image headers (EXIF rotation included), so no image is fully decoded.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from PIL import Image

from latentmill.curate.buckets import Bucket, assign_bucket, needed_upscale
from latentmill.curate.imageshards import iter_image_shard, list_image_shards
from latentmill.curate.selection import kept_keys
from latentmill.curate.storage import atomic_path, location, make_folder

ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as displayed, read from the header; None if unreadable."""
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # any header a decoder refuses: counted as unreadable by the caller
        return None
    return (height, width) if orientation in ROTATED else (width, height)


def bucket_distribution(
    images: str | Path, buckets: list[Bucket], selection: str | Path | None = None, rule: str = "kohya"
) -> dict:
    """Per bucket: images, mean |log aspect| error, images smaller than their bucket."""
    rows = {
        b: {"bucket": list(b), "count": 0, "aspect_error_sum": 0.0, "smaller_than_bucket": 0} for b in buckets
    }
    unreadable = total = 0
    for shard in list_image_shards(images):
        keep = kept_keys(selection, shard.stem)
        for sample in iter_image_shard(shard):
            if keep is not None and sample.key not in keep:
                continue
            size = header_size(sample.image_bytes)
            if size is None or min(size) == 0:
                unreadable += 1
                continue
            total += 1
            bucket = assign_bucket(*size, buckets, rule)
            row = rows[bucket]
            row["count"] += 1
            row["aspect_error_sum"] += abs(math.log(size[0] / size[1]) - math.log(bucket[0] / bucket[1]))
            row["smaller_than_bucket"] += needed_upscale(*size, bucket) > 1
    out = []
    for row in rows.values():
        count = row.pop("count")
        error = row.pop("aspect_error_sum")
        out.append(
            {
                "bucket": row["bucket"],
                "count": count,
                "mean_aspect_error": error / count if count else 0.0,
                "smaller_than_bucket": row["smaller_than_bucket"],
            }
        )
    errors = sum(r["mean_aspect_error"] * r["count"] for r in out)
    return {
        "images": total,
        "unreadable": unreadable,
        "buckets": out,
        "mean_aspect_error": errors / total if total else 0.0,
        "smaller_than_bucket": sum(r["smaller_than_bucket"] for r in out),
    }


def plot_distribution(distribution: dict, path: str | Path, title: str = "") -> Path:
    """A bar chart PNG: images per bucket (in aspect order), the too-small part hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = distribution["buckets"]
    labels = [f"{w}x{h}" for w, h in (r["bucket"] for r in rows)]
    counts = [r["count"] for r in rows]
    small = [r["smaller_than_bucket"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 4), dpi=100)
    ax.bar(labels, counts, color="#4C72B0", label="images")
    ax.bar(labels, small, color="#DD8452", hatch="//", label="smaller than bucket")
    ax.set_ylabel("images")
    ax.set_xlabel("bucket (width x height, px), from tall to wide")
    ax.set_title(
        title
        or f"{distribution['images']} images, mean |log aspect error| {distribution['mean_aspect_error']:.3f}"
    )
    ax.tick_params(axis="x", rotation=90, labelsize=7)
    ax.legend()
    fig.tight_layout()
    path = location(path)
    make_folder(path.parent)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
