"""`score`: per image shard, CLIP embeddings (images and captions), predictor heads, one score parquet.

Images are decoded in DataLoader workers (for CLIP alone, JPEG `draft` mode: decode at the smallest scale
that still covers the model's input; a full decode when a pixel head is scored or with `exact_decode`) and preprocessed with the model's own transform, so the model never waits on
decoding. Output `scores/{shard}.parquet`, one row per image in shard order: key, url, caption, width,
height (decoded, EXIF applied), original_width, original_height, one column per head, clip_similarity,
error; rows sorted by key, so the output does not depend on the order img2dataset happened to write. `--save-embeddings` adds `embeddings/{shard}.npy` (float16, parquet row order, NaN rows for
errors). A shard is done when `scores/{shard}.stats.json` exists.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from latentmill.curate.bucketstats import header_size
from latentmill.curate.imageshards import (
    ImageDecodeError,
    ShardReadStats,
    iter_image_shard,
    list_image_shards,
)
from latentmill.curate.storage import atomic_path, location, make_folder, remove_stale_temporaries, write_json
from latentmill.curate.workerprocesses import worker_context, worker_environment
from latentmill.devices import PRECISIONS
from latentmill.errors import InputError, nothing_left
from latentmill.filters.clip import DEFAULT_MODEL, DEFAULT_PRETRAINED
from latentmill.filters.embeddings import embeddings_folder
from latentmill.schema import StageConfig, opt

WATERMARK_SIZE = 256
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ScoreConfig(StageConfig):
    SECTION = "score"
    RUNTIME = ("device", "batch_size", "workers", "torch_threads")
    clip_model: str = opt(DEFAULT_MODEL, "open_clip model name.")
    pretrained: str | None = opt(
        DEFAULT_PRETRAINED,
        "open_clip pretrained tag, a local checkpoint file, or 'none' (random weights).",
        model=True,
    )
    device: str = opt("auto", "auto (cuda when available), cpu, cuda, cuda:1, ...")
    precision: str = opt("auto", "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16.", choices=PRECISIONS)
    batch_size: int = opt(64, "Images per CLIP call.", low=1)
    workers: int = opt(2, "DataLoader workers decoding images.", low=0)
    aesthetic_head: str | None = opt(
        None, "LAION aesthetic predictor (v2 MLP or v1 linear) state dict.", path=True
    )
    unsafe_head: str | None = opt(
        None,
        "LAION's CLIP-based NSFW detector: its published zip "
        "(clip_autokeras_binary_nsfw.zip, clip_autokeras_nsfw_b32.zip), a `convert-head` "
        "output, h14_nsfw.pth, or the PyTorch port.",
        path=True,
    )
    watermark_head: str | None = opt(
        None, "LAION-5B watermark detector (efficientnet_b3a) weights.", path=True
    )
    heads: list[str] = opt(
        factory=list,
        flag="--head",
        path=True,
        old_key="fitted_heads",
        help="A head made by `latentmill fit-head` (repeatable).",
    )
    save_embeddings: bool = opt(False, "Also write embeddings/{shard}.npy beside the output.")
    torch_threads: int | None = opt(
        None,
        "torch CPU threads per worker; the same number gives byte-identical outputs "
        "across executors and machines.",
        low=1,
        old=("--threads",),
        old_key="threads",
    )
    exact_decode: bool = opt(
        False,
        "Decode JPEGs at full size for CLIP too (default: a reduced-scale draft decode for "
        "CLIP alone; the watermark head always gets the full decode its authors used).",
    )


def decode_modes(config: ScoreConfig, pixel_heads: bool) -> dict[str, str]:
    """How each branch's images are decoded. A pixel head (the watermark detector) sees what its authors'
    code gives: a full decode, then its own resize; a JPEG draft (decoded at a reduced scale) would change
    its input by up to 1.05 normalised units. With a pixel head the one full decode serves CLIP too; without
    one, CLIP takes the draft unless `exact_decode`."""
    clip = "full" if config.exact_decode or pixel_heads else "draft"
    return {"clip": clip, **({"watermark": "full"} if pixel_heads else {})}


class ShardImages(torch.utils.data.IterableDataset):
    """One shard's samples, decoded and preprocessed, split between DataLoader workers by position."""

    def __init__(self, path: Path, preprocess, image_size: int, watermark: bool, draft: bool):
        self.path, self.preprocess, self.image_size, self.watermark = path, preprocess, image_size, watermark
        self.draft = draft  # decided by decode_modes: never with a pixel head

    def __iter__(self):
        from torchvision import transforms

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        wm_transform = transforms.Compose(
            [
                transforms.Resize((WATERMARK_SIZE, WATERMARK_SIZE)),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        stats = ShardReadStats()
        for index, sample in enumerate(iter_image_shard(self.path, stats, key_order=True)):
            if index % workers != worker:
                continue
            row = {
                "index": index,
                "key": sample.key,
                "url": sample.meta.get("url"),
                "caption": sample.caption,
                "original_width": sample.meta.get("original_width"),
                "original_height": sample.meta.get("original_height"),
                "width": None,
                "height": None,
                "error": None,
                "pixels": None,
                "wm_pixels": None,
            }
            try:
                size = header_size(sample.image_bytes)
                image = sample.image(draft_size=(self.image_size, self.image_size) if self.draft else None)
                row["width"], row["height"] = size or image.size
                row["pixels"] = self.preprocess(image)
                if self.watermark:
                    row["wm_pixels"] = wm_transform(image)
            except ImageDecodeError as err:
                row["error"] = err.reason
            yield row
        if worker == 0 and (stats.damaged or stats.incomplete or stats.duplicate_key or stats.bad_metadata):
            yield {
                "index": -1,
                "damaged": stats.damaged,
                "incomplete": stats.incomplete,
                "duplicate_key": stats.duplicate_key,
                "bad_metadata": stats.bad_metadata,
            }


def _collate(rows):
    return rows


def load_heads(config: ScoreConfig, embed_dim: int) -> list:
    """Load every head asked for and check it fits the CLIP model, before any image is read."""
    from latentmill.filters.heads import load_aesthetic, load_fitted, load_watermark
    from latentmill.filters.unsafehead import load_unsafe

    heads = []
    if config.aesthetic_head:
        heads.append((config.aesthetic_head, load_aesthetic(config.aesthetic_head)))
    if config.unsafe_head:
        heads.append((config.unsafe_head, load_unsafe(config.unsafe_head)))
    if config.watermark_head:
        heads.append((config.watermark_head, load_watermark(config.watermark_head)))
    for path in config.heads:
        heads.append((path, load_fitted(path)))
    for path, head in heads:
        if not head.on_pixels and head.input_dim != embed_dim:
            raise InputError(
                f"{path}: the {head.column} head takes {head.input_dim}-d embeddings but "
                f"--clip-model {config.clip_model} gives {embed_dim}-d. Use the CLIP model the head was "
                f"trained on (LAION heads: ViT-L-14-quickgelu with openai weights, 768-d)."
            )
    columns = [h.column for _, h in heads]
    if len(set(columns)) != len(columns):
        raise InputError(
            f"two heads write the same column ({', '.join(columns)}); fit-head --column names it."
        )
    return [h for _, h in heads]


def score_shard(
    path: Path, output: Path, config: ScoreConfig, clip, heads: list, embeddings_dir: Path | None
) -> dict:
    """Score one image shard into `output/{shard}.parquet` (+ embeddings); return its stats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    watermark = any(h.on_pixels for h in heads)
    draft = decode_modes(config, watermark)["clip"] == "draft"
    loader = torch.utils.data.DataLoader(
        ShardImages(path, clip.preprocess, clip.image_size, watermark, draft),
        batch_size=config.batch_size,
        num_workers=config.workers,
        collate_fn=_collate,
        multiprocessing_context=worker_context() if config.workers else None,
        worker_init_fn=worker_environment() if config.workers else None,
    )
    rows, damage = [], {"damaged": False, "incomplete": 0, "duplicate_key": 0, "bad_metadata": 0}
    embeddings: dict[int, np.ndarray] = {}
    for batch in loader:
        damage_rows = [r for r in batch if r["index"] == -1]
        for r in damage_rows:
            damage = {name: r[name] for name in damage}
        good = [r for r in batch if r["index"] >= 0 and r["error"] is None]
        rows += [r for r in batch if r["index"] >= 0]
        if not good:
            continue
        image_emb = clip.embed_images(torch.stack([r["pixels"] for r in good]))
        captioned = [r for r in good if r["caption"]]
        if captioned:
            text_emb = clip.embed_texts([r["caption"] for r in captioned])
            position = {id(r): i for i, r in enumerate(good)}
            for r, t in zip(captioned, text_emb, strict=True):
                r["clip_similarity"] = float(image_emb[position[id(r)]] @ t)
        for head in heads:
            if head.on_pixels:
                values = head(torch.stack([r["wm_pixels"] for r in good]))
            else:
                values = head(image_emb)
            for r, v in zip(good, values, strict=True):
                r[head.column] = float(v)
        for r, e in zip(good, image_emb.numpy(), strict=True):
            embeddings[r["index"]] = e
    rows.sort(key=lambda r: r["key"])  # key order: img2dataset writes a shard in download-completion order
    head_columns = [h.column for h in heads]
    table = pa.table(
        {
            "key": [r["key"] for r in rows],
            "url": [r["url"] for r in rows],
            "caption": [r["caption"] for r in rows],
            "width": pa.array([r["width"] for r in rows], pa.int32()),
            "height": pa.array([r["height"] for r in rows], pa.int32()),
            "original_width": pa.array([r["original_width"] for r in rows], pa.int32()),
            "original_height": pa.array([r["original_height"] for r in rows], pa.int32()),
            **{c: pa.array([r.get(c) for r in rows], pa.float32()) for c in head_columns},
            "clip_similarity": pa.array([r.get("clip_similarity") for r in rows], pa.float32()),
            "error": pa.array([r["error"] for r in rows], pa.string()),
        }
    )
    if embeddings_dir is not None:
        matrix = np.full((len(rows), clip.embed_dim), np.nan, dtype=np.float16)
        for i, r in enumerate(rows):
            if r["index"] in embeddings:
                matrix[i] = embeddings[r["index"]]
        with atomic_path(embeddings_dir / f"{path.stem}.npy") as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, matrix)
    with atomic_path(output / f"{path.stem}.parquet") as tmp:
        pq.write_table(table, tmp)
    errors = Counter(r["error"] for r in rows if r["error"])
    stats = {
        "shard": path.stem,
        "images": len(rows),
        "scored": len(rows) - sum(errors.values()),
        "errors": dict(errors),
        **damage,
    }
    write_json(output / f"{path.stem}.stats.json", stats)
    return stats


@dataclass
class ScoreStage:
    """`score` as a shard stage for the executors: CLIP and the heads loaded once per worker."""

    config: ScoreConfig
    output: Path
    embeddings_dir: Path | None

    def setup(self):
        from latentmill.filters.clip import load_clip

        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        clip = load_clip(
            self.config.clip_model, self.config.pretrained, self.config.device, self.config.precision
        )
        return clip, load_heads(self.config, clip.embed_dim)

    def stats_path(self, shard: Path) -> Path:
        return self.output / f"{shard.stem}.stats.json"

    def process(self, shard: Path, state) -> dict:
        clip, heads = state
        return score_shard(shard, self.output, self.config, clip, heads, self.embeddings_dir)


def score(
    images: str | Path,
    output: str | Path,
    config: ScoreConfig,
    progress=None,
    executor=None,
    overwrite: bool = False,
) -> dict:
    """Score every image shard of `images` into `output` (done shards skipped); return the totals. An
    `output` scored with other settings, heads or images is refused, or with `overwrite` scored again."""
    from latentmill.curate.executors import ExecutorConfig, run_shards
    from latentmill.curate.lineage import claim, make_record, remove_files

    images, output = location(images), location(output)
    shards = list_image_shards(images)
    if not shards:
        raise InputError(f"{images}: no .tar image shards. Make them with `latentmill download`.")
    embeddings_dir = embeddings_folder(output) if config.save_embeddings else None
    stage = ScoreStage(config, output, embeddings_dir)
    clip, heads = stage.setup()  # here too: bad heads are refused before anything is written
    make_folder(output)

    def clear():
        remove_files(output, ("*.parquet", "*.stats.json", "score_config.json"))
        remove_files(embeddings_folder(output), ("*.npy",))

    claim(output, make_record("score", config, inputs={"images": images}), overwrite, clear)
    remove_stale_temporaries(output)  # of an earlier run killed mid-write
    if embeddings_dir:
        make_folder(embeddings_dir)
    write_json(
        output / "score_config.json",
        asdict(config)
        | {"clip_model": clip.name, "embed_dim": clip.embed_dim, "columns": [h.column for h in heads]},
    )
    all_stats = run_shards(
        stage,
        shards,
        executor or ExecutorConfig(),
        local_state=(clip, heads),
        progress=(lambda s: progress(s["images"])) if progress else None,
    )
    totals = Counter()
    totals["decode"] = decode_modes(config, any(h.on_pixels for h in heads))
    for stats in all_stats.values():
        totals.update({"shards": 1, "images": stats["images"], "scored": stats["scored"]})
        for reason, n in stats["errors"].items():
            totals[f"error:{reason}"] += n
    if totals["images"] and not totals["scored"]:
        errors = {k.removeprefix("error:"): v for k, v in totals.items() if k.startswith("error:")}
        raise nothing_left(f"score {images}: no image could be scored", totals["images"], errors)
    return dict(totals)


def format_score_totals(totals: dict, output: str | Path = "") -> str:
    """What `score` (the command and the run stage) prints."""
    errors = {k[6:]: v for k, v in totals.items() if k.startswith("error:")}
    return (
        f"scored {totals['scored']:,} of {totals['images']:,} images in {totals['shards']} shard(s)"
        + (f" -> {output}" if output else "")
        + (f"; not decodable: {errors}" if errors else "")
        + "\ndecode: "
        + ", ".join(f"{branch} {mode}" for branch, mode in totals["decode"].items())
    )
