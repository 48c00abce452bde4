"""A folder of image files as image shards in img2dataset's layout, so that `score`, `select` and `encode`
take local pictures (a subject's photos for DreamBooth, class images made with `latentmill sample`) as
they take downloads.

Each image keeps its bytes (no re-encoding); its caption is the `.txt` file beside it (`dog1.jpg` ->
`dog1.txt`) or `caption`, and its loss mask, if any, the `dog1.mask.png` beside it. Files are taken in sorted path order, so packing twice gives the same shards;
a file that does not decode is dropped and counted with its reason. Shards are written atomically and a
shard with its `_stats.json` is done: re-running skips it.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from latentmill.curate.imageshards import IMAGE_EXTENSIONS, ImageDecodeError, decode_image
from latentmill.curate.records import read_record
from latentmill.curate.storage import atomic_path, location, make_folder, remove_stale_temporaries, write_json
from latentmill.errors import InputError, warn
from latentmill.schema import StageConfig, opt

MASK_SUFFIX = ".mask.png"


@dataclass
class PackConfig(StageConfig):
    SECTION = "pack"
    caption: str | None = opt(
        None, "Caption of every image without a .txt file beside it (e.g. 'a photo of sks dog')."
    )
    shard_size: int = opt(10_000, "Images per shard.", low=1)


def image_files(folder: str | Path) -> list[Path]:
    """The folder's image files (jpg, jpeg, png, webp; subfolders too), in sorted order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder of images.")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and not _is_mask(p)
    )
    if not files:
        raise InputError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it or below it.")
    return files


SAMPLE_INDEX = ".latentmill-samples.json"  # `latentmill sample --to-folder`'s index (train/samplefolder.py)


def sampled_files(folder: Path, files: list[Path]) -> tuple[list[Path], int]:
    """For a folder `latentmill sample --to-folder` filled: the images its index lists (the set or sets it
    holds, in their order) and how many other images lie there; else `files` as they are and 0."""
    from latentmill.curate.records import read_optional

    index = read_optional(folder / SAMPLE_INDEX, fix=f"delete {folder / SAMPLE_INDEX} and sample again")
    if not isinstance(index, dict) or not isinstance(index.get("files"), dict):
        return files, 0
    listed = [folder / f"{name}.png" for name in sorted(index["files"])]
    listed = [p for p in listed if p.exists()]
    return listed, len(set(files) - set(listed))


def _is_mask(path: Path) -> bool:
    return path.name.lower().endswith(MASK_SUFFIX)


def _mask_file(path: Path) -> Path:
    """Where an image's loss mask lies: `NAME.mask.png` beside `NAME.jpg` (white: learned)."""
    return path.with_name(path.stem + MASK_SUFFIX)


def _caption(path: Path, default: str | None) -> str | None:
    text = path.with_suffix(".txt")
    return text.read_text(encoding="utf-8", errors="replace").strip() if text.exists() else default


def _outside(path: Path, root: Path) -> bool:
    """`path` (or the file a link there points to) lies outside the folder being packed: a link out of
    the folder must not bring a file from elsewhere (an image, or a system file as a caption) in."""
    return not path.resolve().is_relative_to(root.resolve())


def _check_inputs(files: list[Path], output) -> None:
    """What would stop packing halfway, refused before a shard is written: a name that is not UTF-8 (a
    shard's metadata is JSON text), a caption path that is a folder, an output that is a file."""
    if output.is_file():
        raise InputError(f"-o {output}: a file; give a folder for the image shards.")
    for path in files:
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(
                f"{os.fsencode(path)!r}: the file name is not UTF-8; rename it (e.g. convmv -f latin1 -t utf8)."
            ) from None
        if path.with_suffix(".txt").is_dir():
            raise InputError(
                f"{path.with_suffix('.txt')}: a folder where {path.name}'s caption file would be; rename it."
            )


def pack_images(
    folder: str | Path, output: str | Path, config: PackConfig | None = None, overwrite: bool = False
) -> dict:
    """Write `output/{shard}.tar` (+ `.parquet`, `_stats.json`) from the images in `folder`; return the
    totals: images packed, and dropped by reason (the decoder's: undecodable, truncated, ...; no_caption).
    Done shards are kept; an `output` packed from other pictures or captions is refused, or with
    `overwrite` packed again (its record: output/_latentmill/lineage.json)."""
    from latentmill.curate.lineage import IMAGE_SHARDS_RECORD, claim, make_record, remove_files

    config = (config or PackConfig()).validate()
    folder, output = Path(folder), location(output)
    files, unlisted = sampled_files(folder, image_files(folder))
    _check_inputs(files, output)
    if config.caption is None:
        missing = [p for p in files if not p.with_suffix(".txt").exists()]
        if len(missing) == len(files):
            raise InputError(
                f"{folder}: no image has a caption (.txt beside it); give --caption 'a photo of ...' for all."
            )
    make_folder(output)
    make_folder((output / IMAGE_SHARDS_RECORD).parent)
    record = make_record("pack", config, inputs={"folder": folder})
    claim(
        output, record, overwrite, clear=lambda: remove_files(output, ("*.tar", "*.parquet", "*_stats.json"))
    )
    remove_stale_temporaries(output)  # of an earlier run killed mid-write
    totals = {"packed": 0, "dropped": {"not_in_sample_index": unlisted} if unlisted else {}}
    for index in range(0, len(files), config.shard_size):
        shard = f"{index // config.shard_size:05d}"
        if (output / f"{shard}_stats.json").exists():  # done in an earlier run
            stats = read_record(
                output / f"{shard}_stats.json",
                fields={"successes": int},
                fix=f"delete it and pack again (shard {shard} is redone)",
            )
        else:
            stats = _pack_shard(
                folder, files[index : index + config.shard_size], output, shard, index, config
            )
        totals["packed"] += stats["successes"]
        for reason, n in stats["dropped"].items():
            totals["dropped"][reason] = totals["dropped"].get(reason, 0) + n
    return totals


def _mask_size_problem(mask: Path, size: tuple[int, int]) -> str | None:
    """How `mask` differs in size from its image (None when it matches or cannot be read: encode counts
    an unreadable mask)."""
    from PIL import Image

    try:
        with Image.open(mask) as opened:
            found = opened.size
    except (OSError, ValueError, SyntaxError):
        return None
    return None if found == size else f"{found[0]}x{found[1]} against its image's {size[0]}x{size[1]}"


def _pack_shard(folder: Path, files: list[Path], output: Path, shard: str, first: int, config) -> dict:
    import pandas as pd

    rows, dropped = [], {}
    with atomic_path(output / f"{shard}.tar") as tmp, tarfile.open(tmp, "w") as tar:
        for number, path in enumerate(files, start=first):
            mask = _mask_file(path)
            if any(_outside(p, folder) for p in (path, path.with_suffix(".txt"), mask)):
                dropped["outside_folder"] = dropped.get("outside_folder", 0) + 1
                continue
            data = path.read_bytes()
            caption = _caption(path, config.caption)
            try:
                image = decode_image(data)
            except ImageDecodeError as err:
                dropped[err.reason] = dropped.get(err.reason, 0) + 1
                continue
            if caption is None:
                dropped["no_caption"] = dropped.get("no_caption", 0) + 1
                continue
            if mask.is_file() and (problem := _mask_size_problem(mask, image.size)):
                warn(
                    f"{mask}: {problem}: a loss mask must have its image's size. Dropped (mask_size_mismatch)."
                )
                dropped["mask_size_mismatch"] = dropped.get("mask_size_mismatch", 0) + 1
                continue
            key = f"{number:09d}"
            meta = {
                "key": key,
                "url": str(path.relative_to(folder)),
                "caption": caption,
                "width": image.width,
                "height": image.height,
                "original_width": image.width,
                "original_height": image.height,
                "status": "success",
            }
            extension = path.suffix.lower().lstrip(".")
            payloads = [(f"{key}.{extension}", data), (f"{key}.txt", caption.encode())]
            if mask.is_file():  # encode --alpha-mask takes it as the loss mask
                payloads.append((f"{key}.mask.png", mask.read_bytes()))
            for name, payload in [*payloads, (f"{key}.json", json.dumps(meta).encode())]:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            rows.append(meta)
    with atomic_path(output / f"{shard}.parquet") as tmp:
        pd.DataFrame(rows, columns=list(rows[0]) if rows else ["key"]).to_parquet(tmp, index=False)
    stats = {"count": len(files), "successes": len(rows), "failed_to_download": 0, "dropped": dropped}
    write_json(output / f"{shard}_stats.json", stats)
    return stats


def format_pack_summary(totals: dict) -> str:
    dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(totals["dropped"].items()))
    return f"packed {totals['packed']:,} image(s)" + (f"; dropped: {dropped}" if dropped else "")
