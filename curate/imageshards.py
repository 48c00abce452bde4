"""Reading image shards (img2dataset's WebDataset output): samples with key, caption, JSON metadata and
the image decoded on demand.

A truncated or corrupt tar yields the samples before the damage and counts the rest; an image that does
not decode raises `ImageDecodeError` with a reason, for the caller to count, never a crash.
"""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from latentmill.curate.storage import local_file, location

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_IMAGE_PIXELS = 178_956_970  # pillow's own default bomb limit, made explicit


class ImageDecodeError(Exception):
    """An image that cannot be used; `reason` is a short name for the stats (undecodable, truncated, ...)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer / float) gray image as 8-bit gray: 16-bit integers scaled by 255/65535,
    as 8-bit viewers show them (PIL's convert would clip every value above 255 to white)."""
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    scale = 255.0 / 65535.0 if image.mode.startswith("I") else 255.0
    if image.mode == "F" and np.nanmax(values, initial=0) > 1.0:  # float data not in [0, 1]: its own range
        scale = 255.0 / max(np.nanmax(values), 1e-12)
    return Image.fromarray(np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8), "L")


def decode_image(data: bytes, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode to an RGB image: EXIF orientation applied, alpha composited on white, CMYK/gray converted.

    `draft_size` lets JPEG decode at a reduced scale (at least that size) when far fewer pixels are needed.
    """
    if not data:
        raise ImageDecodeError("empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ImageDecodeError("too_large", f"{image.width}x{image.height} pixels")
            if draft_size and image.format == "JPEG":
                image.draft("RGB", draft_size)
            image.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError("too_large", str(err)) from None
    except OSError as err:
        reason = "truncated" if "truncated" in str(err) else "undecodable"
        raise ImageDecodeError(reason, str(err)) from None
    except (ValueError, SyntaxError) as err:
        raise ImageDecodeError("undecodable", str(err)) from None
    image = ImageOps.exif_transpose(image)
    if image.mode in (
        "I;16",
        "I;16B",
        "I;16L",
        "I;16N",
        "I",
        "F",
    ):  # 16-bit or float gray: scale, do not clip
        image = _to_8bit(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


@dataclass
class ImageSample:
    """One sample of an image shard."""

    key: str
    shard: str
    image_bytes: bytes
    image_ext: str
    caption: str | None = None
    meta: dict = field(default_factory=dict)
    mask_bytes: bytes | None = None  # {key}.mask.png: which pixels the loss learns from (white: all)

    def image(self, draft_size: tuple[int, int] | None = None) -> Image.Image:
        """The decoded RGB image (raises ImageDecodeError)."""
        return decode_image(self.image_bytes, draft_size)


@dataclass
class ShardReadStats:
    """What reading one shard met: samples yielded, samples lost and why."""

    samples: int = 0
    incomplete: int = 0  # members without an image
    duplicate_key: int = 0  # a key seen again later in the tar: the first sample is kept
    bad_metadata: int = 0  # a sample whose .json or caption was unusable: read without the bad part
    damaged: bool = False  # the tar ended early or is corrupt: what follows the damage is lost
    damage: str = ""

    def as_dict(self) -> dict:
        return {
            "samples": self.samples,
            "incomplete": self.incomplete,
            "duplicate_key": self.duplicate_key,
            "bad_metadata": self.bad_metadata,
            "damaged": self.damaged,
            "damage": self.damage,
        }


def list_image_shards(folder: str | Path) -> list[Path]:
    """The `.tar` shards of an image folder, sorted; img2dataset's `_tmp` and hidden files are skipped."""
    folder = location(folder)
    if folder.is_file():
        return [folder]
    return sorted(p for p in folder.glob("*.tar") if not p.name.startswith((".", "_")))


def _sample_from(
    key: str, shard: str, members: dict[str, bytes], stats: ShardReadStats
) -> ImageSample | None:
    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if ext is None:
        stats.incomplete += 1
        return None
    meta, bad = {}, False
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (ValueError, RecursionError):
            meta = None
        if not isinstance(meta, dict):
            meta, bad = {}, True
    meta, cleaned = _clean_meta(meta)
    caption = members["txt"].decode("utf-8", errors="replace") if "txt" in members else meta.get("caption")
    if caption is not None and not isinstance(caption, str):
        caption, bad = None, True
    stats.samples += 1
    stats.bad_metadata += bad or cleaned
    return ImageSample(
        key=key,
        shard=shard,
        image_bytes=members[ext],
        image_ext=ext,
        caption=caption,
        meta=meta,
        mask_bytes=members.get("mask.png"),
    )


SIZE_FIELDS = ("width", "height", "original_width", "original_height")
MAX_SIDE = 2**31 - 1


def _clean_meta(meta: dict) -> tuple[dict, bool]:
    """The sample's metadata with the fields latentmill reads made safe: sizes are positive int32 or absent,
    `url` and `caption` strings or absent. Returns (metadata, whether anything was removed)."""
    bad = []
    for name in SIZE_FIELDS:
        value = meta.get(name)
        if value is not None and not (
            isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_SIDE
        ):
            bad.append(name)
    for name in ("url", "caption"):
        if meta.get(name) is not None and not isinstance(meta[name], str):
            bad.append(name)
    if not bad:
        return meta, False
    return {k: v for k, v in meta.items() if k not in bad}, True


def _member_key_ext(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, lower-case extension) of a sample's file in a shard, or None for anything else."""
    name = member.name.rsplit("/", 1)[-1]
    if not member.isfile() or "." not in name:
        return None
    key, ext = name.split(".", 1)
    return key, ext.lower()


def iter_image_shard(
    path: str | Path, stats: ShardReadStats | None = None, key_order: bool = False
) -> Iterator[ImageSample]:
    """Stream the samples of one tar shard in order (members grouped by key, as WebDataset does).

    `key_order` reads them sorted by key instead (an index of the tar's headers first, then a seek per
    sample): img2dataset writes a shard in download-completion order, so batches formed in tar order differ
    between two downloads of the same URLs, and CPU float sums with them. A damaged shard (cut off, or
    unreadable headers) is streamed, reading what it can, and its readable samples are sorted in memory
    (their encoded bytes only: a damaged shard is the exception).

    A key that comes back later in the tar (two samples with one key) keeps its first sample; the later
    ones are counted in `stats.duplicate_key`, in both orders."""
    path = location(path)
    stats = stats if stats is not None else ShardReadStats()
    if key_order:  # an index and a seek per sample: from a local copy of a shard in an object store
        with local_file(path) as local:
            yield from _iter_in_key_order(local, stats)
        return
    yield from _iter_in_tar_order(path, stats)


def _iter_in_key_order(path: Path, stats: ShardReadStats) -> Iterator[ImageSample]:
    try:
        tar = tarfile.open(path, mode="r:*")
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        previous, duplicates = None, 0
        for member in tar.getmembers():
            if named := _member_key_ext(member):
                key, ext = named
                if key != previous and key in groups:  # the key's files come back after another key's
                    duplicates += 1
                previous = key
                group = groups.setdefault(key, {})
                if ext not in group:
                    group[ext] = member
        # tarfile ends an index quietly at a cut-off header or member: an archive that does not end in its
        # two zero blocks after the last member's data is damaged, and the stream counts that damage
        size = path.stat().st_size
        intact = tar.offset + 2 * tarfile.BLOCKSIZE <= size and all(
            m.offset_data + m.size <= size for group in groups.values() for m in group.values()
        )
    except (tarfile.TarError, EOFError, OSError, ValueError):
        intact = False
    if not intact:
        yield from sorted(_iter_in_tar_order(path, stats), key=lambda sample: sample.key)
        return
    stats.duplicate_key += duplicates
    with tar:
        for key in sorted(groups):
            try:
                members = {ext: tar.extractfile(member).read() for ext, member in groups[key].items()}
            except (tarfile.TarError, EOFError, OSError, ValueError) as err:
                stats.damaged, stats.damage, stats.incomplete = (
                    True,
                    f"{type(err).__name__}: {err}",
                    stats.incomplete + 1,
                )
                continue  # a cut-off member: the others are indexed and still readable
            sample = _sample_from(key, path.stem, members, stats)
            if sample:
                yield sample


def _iter_in_tar_order(path: Path, stats: ShardReadStats) -> Iterator[ImageSample]:
    key, members, seen = None, {}, set()
    try:
        with path.open("rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not (named := _member_key_ext(member)):
                    continue
                member_key, ext = named
                if member_key != key:
                    if key is not None and key not in seen:
                        seen.add(key)
                        sample = _sample_from(key, path.stem, members, stats)
                        if sample:
                            yield sample
                    if member_key in seen:
                        stats.duplicate_key += 1
                    key, members = member_key, {}
                members.setdefault(ext, tar.extractfile(member).read())
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        stats.damaged, stats.damage = True, f"{type(err).__name__}: {err}"
        if key is not None:
            stats.incomplete += 1  # the sample being read when the damage came
        return
    if key is not None and key not in seen:
        sample = _sample_from(key, path.stem, members, stats)
        if sample:
            yield sample


def inspect_image_shards(folder: str | Path, decode: bool = False) -> dict:
    """Per-shard sample counts and damage; with `decode`, the keys of images that fail, by reason."""
    shards, errors = [], {}
    for path in list_image_shards(folder):
        stats = ShardReadStats()
        for sample in iter_image_shard(path, stats):
            if decode:
                try:
                    sample.image()
                except ImageDecodeError as err:
                    errors.setdefault(err.reason, []).append(sample.key)
        shards.append({"shard": path.stem, **stats.as_dict()})
    report = {
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "incomplete": sum(s["incomplete"] for s in shards),
        "damaged_shards": sum(s["damaged"] for s in shards),
    }
    if decode:
        report["decode_errors"] = errors
    return report
