"""`encode`: image shards (+ selection) -> bucketed, resized, cropped, VAE-encoded latent shards.

One image shard maps to one latent shard. A shard is done when `{shard}.stats.json` exists (written after
its tar and parquet), so a killed encode re-run redoes only unfinished shards, with identical bytes:
crops are seeded per (seed, shard, key) and batches are formed in key order.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from latentmill.curate.atomic import write_json
from latentmill.curate.buckets import assign_bucket, make_buckets, needed_upscale, place, resize_and_crop
from latentmill.curate.errors import InputError
from latentmill.curate.imageshards import (
    ImageDecodeError,
    ShardReadStats,
    iter_image_shard,
    list_image_shards,
)
from latentmill.curate.latentshards import LatentShardWriter, write_manifest
from latentmill.curate.selection import kept_keys

DOWNSAMPLE = 8  # SD-family VAEs: latent side = image side / 8


@dataclass
class EncodeConfig:
    resolution: int = 512
    min_side: int | None = None  # default resolution / 2
    max_side: int | None = None  # default resolution * 2
    step: int = 64
    vae: str = "tiny"
    device: str = "cpu"
    precision: str = "auto"  # bf16 on CUDA, fp32 on CPU
    batch_size: int = 16
    flip: bool = False
    std: bool = False
    crop: str = "center"  # or "random" (seeded per sample)
    seed: int = 0
    max_upscale: float = 1.0  # images needing more enlargement than this are dropped as too_small
    text_encoder: str | None = None  # precompute caption embeddings (see curate.textencoder)
    threads: int | None = None  # torch CPU threads per worker; CPU float sums depend on it, so fix it for identical bytes

    def resolved_precision(self) -> str:
        if self.precision == "auto":
            return "bf16" if self.device.startswith("cuda") else "fp32"
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise InputError(f"--precision {self.precision!r}: use auto, fp32, bf16 or fp16.")
        return self.precision

    def buckets(self) -> list[tuple[int, int]]:
        try:
            return make_buckets(self.resolution, self.min_side, self.max_side, self.step)
        except ValueError as err:
            raise InputError(f"bucket options: {err}.") from None


def _to_tensor(images: list, device: str, dtype):
    import torch

    array = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # N,H,W,3
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2).to(device=device, dtype=torch.float32) / 127.5 - 1.0
    # contiguous NCHW on CPU: a permuted (NHWC-strided) batch takes other conv kernels whose rounding
    # depends on the batch, and a sample's latent must not depend on its batch-mates
    memory_format = torch.channels_last if device.startswith("cuda") else torch.contiguous_format
    return tensor.to(dtype).contiguous(memory_format=memory_format)


def encode_batch(vae, images: list, device: str, with_std: bool):
    """Posterior mean (and std) of a batch of same-size RGB images, as float32 numpy arrays."""
    import torch

    dtype = next(vae.model.parameters()).dtype
    with torch.inference_mode():
        dist = vae.model.encode(_to_tensor(images, device, dtype)).latent_dist
        mean = dist.mean.float().cpu().numpy()
        std = dist.std.float().cpu().numpy() if with_std else None
    return mean, std


def encode_shard(image_shard: Path, output: Path, config: EncodeConfig, vae, selection: str | Path | None = None,
                 text_encoder=None) -> dict:
    """Encode one image shard into `output/{shard}.tar`; return its stats (every input sample accounted for)."""
    shard = image_shard.stem
    buckets = config.buckets()
    keep = kept_keys(selection, shard)
    read_stats = ShardReadStats()
    dropped: Counter = Counter()
    prepared: dict[tuple[int, int], list] = {}
    order: list[str] = []
    for sample in iter_image_shard(image_shard, read_stats):
        if keep is not None and sample.key not in keep:
            dropped["not_selected"] += 1
            continue
        try:
            image = sample.image()
        except ImageDecodeError as err:
            dropped[err.reason] += 1
            continue
        bucket = assign_bucket(image.width, image.height, buckets)
        if needed_upscale(image.width, image.height, bucket) > config.max_upscale + 1e-9:
            dropped["too_small"] += 1
            continue
        rng = None
        if config.crop == "random":
            rng = np.random.default_rng([config.seed, zlib.crc32(f"{shard}/{sample.key}".encode())])
        placement = place(image.width, image.height, bucket, rng)
        pixels = resize_and_crop(image, placement)
        prepared.setdefault(bucket, []).append((sample, placement, pixels))
        order.append(sample.key)

    order.sort()  # key order throughout: the same batches, so the same bytes, whatever order the tar has
    results: dict[str, tuple] = {}
    for items in prepared.values():
        items.sort(key=lambda item: item[0].key)
        for start in range(0, len(items), config.batch_size):
            batch = items[start:start + config.batch_size]
            images = [pixels for _, _, pixels in batch]
            mean, std = encode_batch(vae, images, config.device, config.std)
            flipped = None
            if config.flip:
                from PIL import ImageOps

                flipped, _ = encode_batch(vae, [ImageOps.mirror(im) for im in images], config.device, False)
            for i, (sample, placement, _) in enumerate(batch):
                results[sample.key] = (sample, placement, mean[i], None if std is None else std[i],
                                       None if flipped is None else flipped[i])

    text = {}
    if text_encoder is not None:
        for start in range(0, len(order), config.batch_size):
            keys = order[start:start + config.batch_size]
            for key, emb in zip(keys, text_encoder.encode([results[k][0].caption or "" for k in keys]), strict=True):
                text[key] = emb

    writer = LatentShardWriter(output, shard)
    per_bucket: Counter = Counter()
    for key in order:
        sample, placement, mean, std, flipped = results[key]
        arrays = [a for a in (mean, std, flipped, text.get(key)) if a is not None]
        if not all(np.isfinite(a).all() and np.isfinite(a.astype(np.float16)).all() for a in arrays):
            dropped["nonfinite_latent"] += 1
            continue
        scores = {k: v for k, v in sample.meta.items() if k not in ("caption", "key", "status", "error_message", "exif")}
        meta = {"bucket": list(placement.bucket), "original_size": list(placement.original_size),
                "crop": list(placement.crop), "resized_size": list(placement.resized_size), **scores}
        writer.add(key, mean, sample.caption, meta, std=std, flipped=flipped, text_emb=text.get(key))
        per_bucket[f"{placement.bucket[0]}x{placement.bucket[1]}"] += 1
    sha256 = writer.close()
    stats = {
        "shard": shard,
        "input": read_stats.samples + read_stats.incomplete,
        "written": len(writer.rows),
        "dropped": dict(sorted(dropped.items())) | ({"incomplete": read_stats.incomplete} if read_stats.incomplete else {}),
        "damaged_tar": read_stats.damaged,
        "per_bucket": dict(sorted(per_bucket.items())),
        "sha256": sha256,
    }
    assert stats["input"] == stats["written"] + sum(stats["dropped"].values()), stats
    write_json(output / f"{shard}.stats.json", stats)
    return stats


@dataclass
class EncodeStage:
    """`encode` as a shard stage for the executors: the VAE (and text encoder) loaded once per worker."""

    config: EncodeConfig
    output: Path
    selection: str | Path | None

    def setup(self):
        from latentmill.curate.vae import load_vae

        if self.config.threads:
            import torch

            torch.set_num_threads(self.config.threads)
        vae = load_vae(self.config.vae, self.config.device, self.config.resolved_precision())
        text_encoder = None
        if self.config.text_encoder:
            from latentmill.curate.textencoder import load_text_encoder

            text_encoder = load_text_encoder(self.config.text_encoder, self.config.device)
        return vae, text_encoder

    def stats_path(self, shard: Path) -> Path:
        return self.output / f"{shard.stem}.stats.json"

    def process(self, shard: Path, state) -> dict:
        vae, text_encoder = state
        return encode_shard(shard, self.output, self.config, vae, self.selection, text_encoder)


def encode(images: str | Path, output: str | Path, config: EncodeConfig, selection: str | Path | None = None,
           progress=None, executor=None) -> dict:
    """Encode every image shard of `images` (skipping done ones) and write `manifest.json`; return it."""
    from latentmill.curate.executors import ExecutorConfig, run_shards

    images, output = Path(images), Path(output)
    shards = list_image_shards(images)
    if not shards:
        raise InputError(f"{images}: no .tar image shards. Make them with `latentmill download`.")
    buckets = config.buckets()
    if config.crop not in ("center", "random"):
        raise InputError(f"--crop {config.crop!r}: use center or random.")
    precision = config.resolved_precision()
    stage = EncodeStage(config, output, selection)
    vae, text_encoder = stage.setup()  # here too: the manifest records what made the latents
    header = {
        "format": "latentmill.latents/1",
        "vae": vae.describe(),
        "scaling_factor": vae.scaling_factor,
        "shift_factor": vae.shift_factor,
        "latent_channels": vae.latent_channels,
        "downsample_factor": DOWNSAMPLE,
        "resolution": config.resolution,
        "buckets": [list(b) for b in buckets],
        "has_std": config.std,
        "has_flip": config.flip,
        "text_encoder": text_encoder.describe() if text_encoder else None,
        "encode_config": asdict(config) | {"precision": precision},
        "source": str(images),
        "selection": str(selection) if selection else None,
    }
    output.mkdir(parents=True, exist_ok=True)
    _check_same_settings(output, header)
    shard_stats = run_shards(stage, shards, executor or ExecutorConfig(), local_state=(vae, text_encoder),
                             progress=(lambda s: progress(s["input"])) if progress else None)
    manifest = write_manifest(output, header, shard_stats)
    dropped: Counter = Counter()
    for stats in shard_stats.values():
        dropped.update(stats["dropped"])
    return manifest | {"dropped": dict(dropped)}


def _check_same_settings(output: Path, header: dict) -> None:
    """A folder holds one VAE and one bucket set: resuming with other settings would mix latents."""
    settings = output / "encode_settings.json"
    fixed = {k: header[k] for k in ("vae", "resolution", "buckets", "has_std", "has_flip", "text_encoder")}
    fixed["crop"] = header["encode_config"]["crop"], header["encode_config"]["seed"]
    fixed = json.loads(json.dumps(fixed))
    if settings.exists():
        before = json.loads(settings.read_text())
        if before != fixed:
            changed = [k for k in fixed if before.get(k) != fixed[k]]
            raise InputError(f"{output}: already holds latents made with other settings (changed: {', '.join(changed)}). "
                             f"Encode into a new folder, or delete this one.")
    else:
        write_json(settings, fixed)
