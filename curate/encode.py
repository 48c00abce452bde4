"""`encode`: image shards (+ selection) -> bucketed, resized, cropped, VAE-encoded latent shards.

One image shard maps to one latent shard. A shard is done when `{shard}.stats.json` exists (written after
its tar and parquet), so a killed encode re-run redoes only unfinished shards, with identical bytes:
crops are seeded per (seed, shard, key) and batches are formed in key order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from latentmill.curate.buckets import make_buckets
from latentmill.curate.imageshards import ImageSample, ShardReadStats, iter_image_shard, list_image_shards
from latentmill.curate.inpaintmasks import DEFAULT_MIX, parse_mix
from latentmill.curate.latentshards import LatentShardWriter, write_manifest
from latentmill.curate.prepare import PreparePool, PrepareSettings, default_workers
from latentmill.curate.selection import check_selection, kept_keys
from latentmill.curate.shardencoder import ShardEncoder
from latentmill.curate.storage import location, make_folder, remove_stale_temporaries, write_json
from latentmill.curate.validationsplit import VALIDATION, SplitWriter, validation_stats
from latentmill.devices import PRECISIONS, resolve_device_precision
from latentmill.errors import InputError, invariant, nothing_left, warn
from latentmill.schema import StageConfig, opt

DOWNSAMPLE = 8  # SD-family VAEs: latent side = image side / 8


@dataclass
class EncodeConfig(StageConfig):
    SECTION = "encode"
    RUNTIME = ("device", "batch_size", "torch_threads", "workers")
    resolution: int = opt(512, "Bucket area is at most RESOLUTION² px.", low=1)
    bucket_min_side: int | None = opt(
        None,
        "Smallest bucket side in px (default: resolution / 2).",
        low=1,
        old=("--min-side",),
        old_key="min_side",
    )
    bucket_max_side: int | None = opt(
        None,
        "Largest bucket side in px (default: resolution * 2).",
        low=1,
        old=("--max-side",),
        old_key="max_side",
    )
    step: int = opt(64, "Bucket sides are multiples of this (px).", low=1)
    vae: str = opt(
        "stabilityai/sd-vae-ft-mse",
        "Diffusers model id or local folder, or an architecture with random "
        "weights: tiny, sd15 (tests, speed runs).",
        model=True,
    )
    device: str = opt("auto", "auto (cuda when available), cpu, cuda, cuda:1, ...")
    precision: str = opt("auto", "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16.", choices=PRECISIONS)
    batch_size: int = opt(16, "Images per VAE call (one bucket per batch).", low=1)
    flip: bool = opt(False, "Also store the latent of the horizontally flipped image.")
    std: bool = opt(False, "Also store the posterior std (fresh latent samples at train time).")
    alpha_mask: bool = opt(
        False,
        "Also store a loss mask at latent size: the image's alpha channel, or the NAME.mask.png packed beside "
        "it (absent: all ones), for train --masked-loss.",
        since="0.2",
    )
    mask_variants: int = opt(
        0,
        "Inpainting: also store K seeded masks per image and the latents of the masked images (for train "
        "--inpainting); each costs a latent and a latent-size mask per sample.",
        low=0,
        high=16,
        since="0.2",
    )
    mask_mix: str = opt(
        DEFAULT_MIX, "Inpainting masks: kind=weight of rectangles, ellipses, strokes, full.", since="0.2"
    )
    validation_share: float = opt(
        0.0,
        "Hold out this share of the samples (by a hash of the key: the same on every re-run) in OUT/validation/, "
        "for train --eval-every; they never train.",
        low=0.0,
        high=0.5,
        since="0.2",
    )
    crop: str = opt(
        "center", "Where a bucket's crop is taken (random: seeded per sample).", choices=("center", "random")
    )
    bucket_assign: str = opt(
        "kohya",
        "kohya: kohya-ss's rule (nearest linear aspect ratio, nearest-pixel resize); log: "
        "nearest log aspect ratio (symmetric between tall and wide), resize rounded up.",
        choices=("kohya", "log"),
    )
    seed: int = opt(0, "Seed for random crops.")
    max_upscale: float = opt(
        1.0,
        "Images that must be enlarged more than this to cover their bucket are dropped as too_small.",
        low=1.0,
    )
    text_encoder: str | None = opt(
        None, "Also store caption embeddings: openclip:NAME[:PRETRAINED] or a pipeline folder.", model=True
    )
    torch_threads: int | None = opt(
        None,
        "torch CPU threads per worker; CPU float sums depend on it, so the same "
        "number gives byte-identical outputs.",
        low=1,
        old=("--threads",),
        old_key="threads",
    )
    workers: int | None = opt(
        None,
        "Processes decoding and resizing while the VAE works (default: the cores available, "
        "at most 8; 0: decode in the encoding process). Outputs are the same bytes whatever the "
        "number.",
        low=0,
    )

    def resolved_workers(self) -> int:
        return default_workers() if self.workers is None else self.workers

    def resolved_device_precision(self) -> tuple[str, str]:
        return resolve_device_precision(self.device, self.precision)

    def buckets(self) -> list[tuple[int, int]]:
        try:
            return make_buckets(self.resolution, self.bucket_min_side, self.bucket_max_side, self.step)
        except ValueError as err:
            raise InputError(f"bucket options: {err}.") from None

    def check_more(self) -> None:
        self.buckets()
        parse_mix(self.mask_mix)
        if self.mask_variants and self.flip:
            raise InputError(
                "--mask-variants with --flip: a flipped image's masked latent is not the flip of the stored one; "
                "encode inpainting data without --flip."
            )


def encode_shard(
    image_shard: Path,
    output: Path,
    config: EncodeConfig,
    vae,
    selection: str | Path | None = None,
    text_encoder=None,
    pool: PreparePool | None = None,
) -> dict:
    """Encode one image shard into `output/{shard}.tar`; return its stats (every input sample accounted for).

    The shard is read in key order and streamed: `pool` decodes and resizes while the VAE works, batches
    are encoded as they fill, and encoded samples go to the writer's spill file, so memory is bounded by
    the batches in flight, not by the shard."""
    shard = image_shard.stem
    settings = PrepareSettings(
        tuple(config.buckets()),
        config.max_upscale,
        config.crop,
        config.seed,
        config.bucket_assign,
        mask_factor=DOWNSAMPLE if config.alpha_mask else 0,
    )
    keep = kept_keys(selection, shard)
    read_stats = ShardReadStats()
    writer = SplitWriter(output, shard, config.validation_share) if config.validation_share else None
    writer = writer or LatentShardWriter(output, shard)
    encoder = ShardEncoder(config, vae, text_encoder, writer)
    waiting: dict[str, object] = {}  # key -> sample (caption, metadata) while its pixels are prepared

    def selected():
        for sample in iter_image_shard(image_shard, read_stats, key_order=True):
            if keep is not None and sample.key not in keep:
                encoder.dropped["not_selected"] += 1
                continue
            waiting[sample.key] = ImageSample(
                sample.key, sample.shard, b"", sample.image_ext, sample.caption, sample.meta
            )
            yield (
                sample.key,
                (sample.image_bytes, sample.mask_bytes) if config.alpha_mask else sample.image_bytes,
            )

    own_pool = pool is None
    pool = pool or PreparePool(0)
    try:
        for prepared in pool.map(shard, selected(), settings):
            sample = waiting.pop(prepared.key)
            if prepared.reason:
                encoder.dropped[prepared.reason] += 1
                if prepared.detail:
                    source = sample.meta.get("url") if isinstance(sample.meta, dict) else None
                    warn(prepared.detail + (f" (its image: {source})" if isinstance(source, str) else ""))
                continue
            encoder.add(sample, prepared)
        encoder.finish()
    finally:
        if own_pool:
            pool.close()
    checksums = writer.close()  # {xxh3_128, sha256}: the manifest's, checked as training reads
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
    } | checksums
    if config.validation_share:
        stats["held_out"] = writer.held  # to the validation split
    if config.alpha_mask:
        stats["empty_masks"] = encoder.empty_masks
    invariant(
        stats["input"] == stats["written"] + stats.get("held_out", 0) + sum(stats["dropped"].values()),
        f"shard {shard}: input != written + dropped in {stats}",
    )
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

        if self.config.torch_threads:
            import torch

            torch.set_num_threads(self.config.torch_threads)
        # "auto" resolved where the model runs (a Ray actor may have the GPU the driver lacks)
        device, precision = self.config.resolved_device_precision()
        vae = load_vae(self.config.vae, device, precision)
        text_encoder = None
        if self.config.text_encoder:
            from latentmill.curate.textencoder import load_text_encoder

            text_encoder = load_text_encoder(self.config.text_encoder, device, dtype=precision)
        resolved = replace(self.config, device=device, precision=precision)
        return vae, text_encoder, PreparePool(self.config.resolved_workers()), resolved

    def stats_path(self, shard: Path) -> Path:
        return self.output / f"{shard.stem}.stats.json"

    def damaged(self, shard: Path, stats: dict) -> str | None:
        """What is wrong with a done shard's latent tar against its stats (gone, another size, another
        digest), or None when it is whole."""
        from latentmill.curate.shardchecksum import FAST, KINDS, new_digest

        tar = self.output / f"{shard.stem}.tar"
        if not (self.output / f"{shard.stem}.parquet").exists():
            return f"{shard.stem}.parquet is gone"
        try:
            size = tar.stat().st_size
        except FileNotFoundError:
            return f"{tar.name} is gone"
        if isinstance(stats.get("bytes"), int) and size != stats["bytes"]:
            return f"{tar.name} holds {size:,} bytes, {stats['bytes']:,} when it was written"
        kind = next((k for k in (FAST, *KINDS) if isinstance(stats.get(k), str)), None)
        if kind is None:
            return None  # stats of a release before digests: nothing to check against
        digest = new_digest(kind)
        with tar.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != stats[kind]:
            return f"{tar.name} changed since it was written ({kind} differs)"
        return None

    def teardown(self, state) -> None:
        state[2].close()  # the prepare pool: its processes and shared memory

    def process(self, shard: Path, state) -> dict:
        vae, text_encoder, pool, config = state
        return encode_shard(shard, self.output, config, vae, self.selection, text_encoder, pool)


def encode(
    images: str | Path,
    output: str | Path,
    config: EncodeConfig,
    selection: str | Path | None = None,
    progress=None,
    executor=None,
    overwrite: bool = False,
) -> dict:
    """Encode every image shard of `images` (skipping done ones) and write `manifest.json`; return it. An
    `output` encoded with other settings, models, images or selection is refused, or with `overwrite`
    encoded again."""
    from latentmill.curate.executors import ExecutorConfig, run_shards
    from latentmill.curate.lineage import claim, make_record, remove_files

    images, output = location(images), location(output)
    shards = list_image_shards(images)
    if not shards:
        raise InputError(f"{images}: no .tar image shards. Make them with `latentmill download`.")
    config.validate()
    buckets = config.buckets()
    stage = EncodeStage(config, output, selection)
    vae, text_encoder, pool, resolved = stage.setup()  # here too: the manifest records what made the latents
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
        "has_mask": config.alpha_mask,
        "inpainting": (
            {"variants": config.mask_variants, "mix": parse_mix(config.mask_mix)}
            if config.mask_variants
            else None
        ),
        "text_encoder": text_encoder.describe() if text_encoder else None,
        "encode_config": {k: v for k, v in asdict(resolved).items() if k != "workers"},
        "source": str(images),
        "selection": str(selection) if selection else None,
    }
    check_selection(selection, [shard.stem for shard in shards])  # before anything is written
    make_folder(output)
    record = make_record("encode", config, inputs={"images": images, "selection": selection})

    def clear():
        remove_files(output, ("*.tar", "*.parquet", "*.stats.json", "manifest.json", EMPTY_CAPTION))
        if (output / VALIDATION).exists():
            remove_files(output / VALIDATION, ("*.tar", "*.parquet", "*.stats.json", "manifest.json"))

    claim(output, record, overwrite, clear)
    remove_stale_temporaries(output)  # of an earlier run killed mid-write
    if text_encoder is not None:
        header["text_encoder"]["empty"] = _write_empty_caption(output, text_encoder)
    try:
        shard_stats = run_shards(
            stage,
            shards,
            executor or ExecutorConfig(),
            local_state=(vae, text_encoder, pool, resolved),
            progress=(lambda s: progress(s["input"])) if progress else None,
        )
    finally:
        pool.close()
    if config.validation_share:  # the held-out split: same format, its own manifest
        held = validation_stats(output, sorted(shard_stats))
        write_manifest(output / VALIDATION, header | {"split": VALIDATION}, held)
        header["validation"] = {"share": config.validation_share, "folder": VALIDATION}
    manifest = write_manifest(output, header, shard_stats)
    dropped: Counter = Counter()
    for stats in shard_stats.values():
        dropped.update(stats["dropped"])
    if sum(s["input"] for s in shard_stats.values()) and not manifest["samples"]:
        raise nothing_left(f"encode {images}: no latents", sum(dropped.values()), dict(dropped))
    nodes = Counter(stats["node"] for stats in shard_stats.values() if "node" in stats)  # Ray: where
    return manifest | {"dropped": dict(dropped), "nodes": dict(sorted(nodes.items()))}


EMPTY_CAPTION = "empty_caption.text_emb.npy"


def _write_empty_caption(output: Path, text_encoder) -> str:
    """Store the empty caption's embedding beside the shards: the trainer's caption dropout uses it (what
    the text encoder gives for "", as in classifier-free guidance), not zeros."""
    from latentmill.curate.latentshards import LATENT_DTYPE, npy_bytes
    from latentmill.curate.storage import write_bytes

    write_bytes(output / EMPTY_CAPTION, npy_bytes(text_encoder.encode([""])[0].astype(LATENT_DTYPE)))
    return EMPTY_CAPTION


def format_encode_summary(manifest: dict, output: str | Path = "") -> str:
    """What `encode` (the command and the run stage) prints: latents per bucket and what was dropped."""
    lines = [
        f"{manifest['samples']:,} latents in {len(manifest['shards'])} shard(s) at {manifest['resolution']} px"
        + (f" in {output}" if output else "")
    ]
    for bucket, count in sorted(manifest["per_bucket"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {bucket:>10} {count:>8,}")
    if manifest.get("nodes"):
        lines.append(
            "shards by Ray node: " + ", ".join(f"{k[:12]} {n}" for k, n in manifest["nodes"].items())
        )
    if manifest["dropped"]:
        lines.append("dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(manifest["dropped"].items())))
    return "\n".join(lines)
