"""`encode`: image shards (+ selection) -> bucketed, resized, cropped, VAE-encoded latent shards.

One image shard maps to one latent shard. A shard is done when `{shard}.stats.json` exists (written after
its tar and parquet), so a killed encode re-run redoes only unfinished shards, with identical bytes:
crops are seeded per (seed, shard, key) and batches are formed in key order.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from latentmill.curate.atomic import write_json
from latentmill.curate.buckets import make_buckets
from latentmill.curate.errors import InputError
from latentmill.curate.imageshards import ImageSample, ShardReadStats, iter_image_shard, list_image_shards
from latentmill.curate.latentshards import LatentShardWriter, write_manifest
from latentmill.curate.prepare import PreparePool, PrepareSettings, default_workers
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
    bucket_assign: str = "kohya"  # or "log": see curate.buckets.assign_bucket
    seed: int = 0
    max_upscale: float = 1.0  # images needing more enlargement than this are dropped as too_small
    text_encoder: str | None = None  # precompute caption embeddings (see curate.textencoder)
    threads: int | None = None  # torch CPU threads per worker; CPU float sums depend on it, so fix it for identical bytes
    workers: int | None = None  # decode+resize processes (default: the cores available, capped); 0: in-process

    def resolved_workers(self) -> int:
        if self.workers is None:
            return default_workers()
        if self.workers < 0:
            raise InputError(f"--workers {self.workers}: use 0 (decode in the encoding process) or more.")
        return self.workers

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


def _to_tensor(pixels: np.ndarray, device: str, dtype):
    """uint8 (N, H, W, 3) -> the VAE's input in [-1, 1]: pinned and copied without blocking on CUDA."""
    import torch

    tensor = torch.from_numpy(pixels)
    if device.startswith("cuda"):
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    # the layout is fixed on the uint8 batch (a quarter of the float one), then scaled in place: one float
    # copy of the batch at a time. Contiguous NCHW on CPU: a permuted (NHWC-strided) batch takes other conv
    # kernels whose rounding depends on the batch, and a sample's latent must not depend on its batch-mates
    tensor = tensor.permute(0, 3, 1, 2).contiguous(memory_format=_memory_format(device))
    tensor = tensor.to(dtype=torch.float32).div_(127.5).sub_(1.0)
    return tensor.to(dtype)


def encode_batch(vae, images, device: str, with_std: bool, with_flip: bool = False):
    """Posterior mean (and std, and the flipped image's mean) of a batch of same-size RGB images (PIL images
    or a uint8 (N, H, W, 3) array), as float32 numpy arrays. The flip mirrors the batch on the device: one
    decode and one host-to-device copy serve both."""
    import torch

    pixels = images if isinstance(images, np.ndarray) else np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    dtype = next(vae.model.parameters()).dtype
    with torch.inference_mode():
        batch = _to_tensor(pixels, device, dtype)
        dist = vae.model.encode(batch).latent_dist
        mean = dist.mean.float().cpu().numpy()
        std = dist.std.float().cpu().numpy() if with_std else None
        flipped = None
        if with_flip:
            mirrored = torch.flip(batch, dims=[3]).contiguous(memory_format=_memory_format(device))
            flipped = vae.model.encode(mirrored).latent_dist.mean.float().cpu().numpy()
    return mean, std, flipped


def _memory_format(device: str):
    import torch

    return torch.channels_last if device.startswith("cuda") else torch.contiguous_format


def _finite(*arrays) -> bool:
    return all(np.isfinite(a).all() and np.isfinite(a.astype(np.float16)).all() for a in arrays if a is not None)


class _ShardEncoder:
    """The per-shard state of a streamed encode: per-bucket batches filling up as prepared samples arrive,
    caption batches in key order, and samples waiting for the other half (latent or caption) before
    they are written. Batches are the same whatever the workers: each bucket's samples in key order, cut
    every `batch_size`; captions likewise over all samples in key order."""

    def __init__(self, config: EncodeConfig, vae, text_encoder, writer: LatentShardWriter):
        self.config, self.vae, self.text_encoder, self.writer = config, vae, text_encoder, writer
        self.buckets: dict[tuple[int, int], list] = {}
        self.captions: list[tuple[str, str]] = []
        self.latents: dict[str, tuple] = {}  # key -> (sample, placement, mean, std, flipped)
        self.texts: dict[str, np.ndarray] = {}
        self.dropped: Counter = Counter()
        self.per_bucket: Counter = Counter()

    def add(self, sample, prepared) -> None:
        bucket = prepared.placement.bucket
        items = self.buckets.setdefault(bucket, [])
        items.append((sample, prepared.placement, prepared.pixels))
        if len(items) == self.config.batch_size:
            self._encode_images(self.buckets.pop(bucket))
        if self.text_encoder is not None:
            self.captions.append((sample.key, sample.caption or ""))
            if len(self.captions) == self.config.batch_size:
                self._encode_captions()

    def finish(self) -> None:
        for bucket in list(self.buckets):
            self._encode_images(self.buckets.pop(bucket))
        if self.captions:
            self._encode_captions()
        assert not self.latents and not self.texts, "every sample written"

    def _encode_images(self, items: list) -> None:
        pixels = np.stack([p for _, _, p in items])
        mean, std, flipped = encode_batch(self.vae, pixels, self.config.device, self.config.std, self.config.flip)
        for i, (sample, placement, _) in enumerate(items):
            self.latents[sample.key] = (sample, placement, mean[i], None if std is None else std[i],
                                        None if flipped is None else flipped[i])
            self._write_if_complete(sample.key)

    def _encode_captions(self) -> None:
        keys = [key for key, _ in self.captions]
        embeddings = self.text_encoder.encode([caption for _, caption in self.captions])
        self.captions = []
        for key, embedding in zip(keys, embeddings, strict=True):
            self.texts[key] = embedding
            self._write_if_complete(key)

    def _write_if_complete(self, key: str) -> None:
        if key not in self.latents or (self.text_encoder is not None and key not in self.texts):
            return
        sample, placement, mean, std, flipped = self.latents.pop(key)
        text = self.texts.pop(key, None)
        if not _finite(mean, std, flipped, text):
            self.dropped["nonfinite_latent"] += 1
            return
        scores = {k: v for k, v in sample.meta.items() if k not in ("caption", "key", "status", "error_message", "exif")}
        meta = {"bucket": list(placement.bucket), "original_size": list(placement.original_size),
                "crop": list(placement.crop), "resized_size": list(placement.resized_size), **scores}
        self.writer.add(key, mean, sample.caption, meta, std=std, flipped=flipped, text_emb=text)
        self.per_bucket[f"{placement.bucket[0]}x{placement.bucket[1]}"] += 1


def encode_shard(image_shard: Path, output: Path, config: EncodeConfig, vae, selection: str | Path | None = None,
                 text_encoder=None, pool: PreparePool | None = None) -> dict:
    """Encode one image shard into `output/{shard}.tar`; return its stats (every input sample accounted for).

    The shard is read in key order and streamed: `pool` decodes and resizes while the VAE works, batches
    are encoded as they fill, and encoded samples go to the writer's spill file, so memory is bounded by
    the batches in flight, not by the shard."""
    shard = image_shard.stem
    settings = PrepareSettings(tuple(config.buckets()), config.max_upscale, config.crop, config.seed,
                               config.bucket_assign)
    keep = kept_keys(selection, shard)
    read_stats = ShardReadStats()
    writer = LatentShardWriter(output, shard)
    encoder = _ShardEncoder(config, vae, text_encoder, writer)
    waiting: dict[str, object] = {}  # key -> sample (caption, metadata) while its pixels are prepared

    def selected():
        for sample in iter_image_shard(image_shard, read_stats, key_order=True):
            if keep is not None and sample.key not in keep:
                encoder.dropped["not_selected"] += 1
                continue
            waiting[sample.key] = ImageSample(sample.key, sample.shard, b"", sample.image_ext, sample.caption, sample.meta)
            yield sample.key, sample.image_bytes

    own_pool = pool is None
    pool = pool or PreparePool(0)
    try:
        for prepared in pool.map(shard, selected(), settings):
            sample = waiting.pop(prepared.key)
            if prepared.reason:
                encoder.dropped[prepared.reason] += 1
                continue
            encoder.add(sample, prepared)
        encoder.finish()
    finally:
        if own_pool:
            pool.close()
    sha256 = writer.close()
    dropped = encoder.dropped
    for reason in ("incomplete", "duplicate_key"):
        if getattr(read_stats, reason):
            dropped[reason] += getattr(read_stats, reason)
    stats = {
        "shard": shard,
        "input": read_stats.samples + read_stats.incomplete + read_stats.duplicate_key,
        "written": len(writer.rows),
        "dropped": dict(sorted(dropped.items())),
        "damaged_tar": read_stats.damaged,
        "bad_metadata": read_stats.bad_metadata,  # read without their unusable .json fields or caption
        "per_bucket": dict(sorted(encoder.per_bucket.items())),
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

            text_encoder = load_text_encoder(self.config.text_encoder, self.config.device,
                                             dtype=self.config.resolved_precision())
        return vae, text_encoder, PreparePool(self.config.resolved_workers())

    def stats_path(self, shard: Path) -> Path:
        return self.output / f"{shard.stem}.stats.json"

    def process(self, shard: Path, state) -> dict:
        vae, text_encoder, pool = state
        return encode_shard(shard, self.output, self.config, vae, self.selection, text_encoder, pool)


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
    if config.bucket_assign not in ("kohya", "log"):
        raise InputError(f"--bucket-assign {config.bucket_assign!r}: use kohya or log.")
    precision = config.resolved_precision()
    stage = EncodeStage(config, output, selection)
    vae, text_encoder, pool = stage.setup()  # here too: the manifest records what made the latents
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
        "encode_config": {k: v for k, v in asdict(config).items() if k != "workers"} | {"precision": precision},
        "source": str(images),
        "selection": str(selection) if selection else None,
    }
    output.mkdir(parents=True, exist_ok=True)
    _check_same_settings(output, header)
    if text_encoder is not None:
        header["text_encoder"]["empty"] = _write_empty_caption(output, text_encoder)
    try:
        shard_stats = run_shards(stage, shards, executor or ExecutorConfig(), local_state=(vae, text_encoder, pool),
                                 progress=(lambda s: progress(s["input"])) if progress else None)
    finally:
        pool.close()
    manifest = write_manifest(output, header, shard_stats)
    dropped: Counter = Counter()
    for stats in shard_stats.values():
        dropped.update(stats["dropped"])
    return manifest | {"dropped": dict(dropped)}


EMPTY_CAPTION = "empty_caption.text_emb.npy"


def _write_empty_caption(output: Path, text_encoder) -> str:
    """Store the empty caption's embedding beside the shards: the trainer's caption dropout uses it (what
    the text encoder gives for "", as in classifier-free guidance), not zeros."""
    from latentmill.curate.atomic import atomic_path
    from latentmill.curate.latentshards import LATENT_DTYPE, npy_bytes

    with atomic_path(output / EMPTY_CAPTION) as tmp:
        tmp.write_bytes(npy_bytes(text_encoder.encode([""])[0].astype(LATENT_DTYPE)))
    return EMPTY_CAPTION


def _check_same_settings(output: Path, header: dict) -> None:
    """A folder holds one VAE and one bucket set: resuming with other settings would mix latents."""
    settings = output / "encode_settings.json"
    fixed = {k: header[k] for k in ("vae", "resolution", "buckets", "has_std", "has_flip", "text_encoder")}
    fixed["crop"] = header["encode_config"]["crop"], header["encode_config"]["seed"]
    if header["encode_config"]["bucket_assign"] != "log":  # folders made before the rule existed used log
        fixed["bucket_assign"] = header["encode_config"]["bucket_assign"]
    fixed = json.loads(json.dumps(fixed))
    if settings.exists():
        before = json.loads(settings.read_text())
        if before != fixed:
            changed = [k for k in fixed if before.get(k) != fixed[k]]
            raise InputError(f"{output}: already holds latents made with other settings (changed: {', '.join(changed)}). "
                             f"Encode into a new folder, or delete this one.")
    else:
        write_json(settings, fixed)
