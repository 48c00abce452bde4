"""One shard's streamed encode: prepared samples batched per bucket for the VAE, captions batched for the
text encoder, each sample written once both halves are there (`curate/encode.py` drives it)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from latentmill.curate.latentshards import LatentShardWriter
from latentmill.curate.vae import encode_batch
from latentmill.errors import invariant

if TYPE_CHECKING:
    from latentmill.curate.encode import EncodeConfig


def _finite(*arrays) -> bool:
    return all(
        np.isfinite(a).all() and np.isfinite(a.astype(np.float16)).all() for a in arrays if a is not None
    )


class ShardEncoder:
    """The per-shard state of a streamed encode: per-bucket batches filling up as prepared samples arrive,
    caption batches in key order, and samples waiting for the other half (latent or caption) before
    they are written. Batches are the same whatever the workers: each bucket's samples in key order, cut
    every `batch_size`; captions likewise over all samples in key order."""

    def __init__(self, config: EncodeConfig, vae, text_encoder, writer: LatentShardWriter):
        self.config, self.vae, self.text_encoder, self.writer = config, vae, text_encoder, writer
        self.buckets: dict[tuple[int, int], list] = {}
        self.captions: list[tuple[str, str]] = []
        self.latents: dict[str, tuple] = {}  # key -> (sample, placement, mean, std, flipped, mask, inpaint)
        self.texts: dict[str, np.ndarray] = {}
        self.dropped: Counter = Counter()
        self.per_bucket: Counter = Counter()
        self.empty_masks = 0  # loss masks that are zero everywhere: samples --masked-loss learns nothing from

    def add(self, sample, prepared) -> None:
        bucket = prepared.placement.bucket
        items = self.buckets.setdefault(bucket, [])
        items.append((sample, prepared.placement, prepared.pixels, prepared.mask))
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
        invariant(not self.latents and not self.texts, "encode finished with samples not written")

    def _encode_images(self, items: list) -> None:
        pixels = np.stack([p for _, _, p, _ in items])
        mean, std, flipped = encode_batch(
            self.vae, pixels, self.config.device, self.config.std, self.config.flip
        )
        inpaint = self._inpainting(items, pixels, mean) if self.config.mask_variants else [None] * len(items)
        for i, (sample, placement, _, mask) in enumerate(items):
            self.latents[sample.key] = (
                sample,
                placement,
                mean[i],
                None if std is None else std[i],
                None if flipped is None else flipped[i],
                mask,
                inpaint[i],
            )
            self._write_if_complete(sample.key)

    def _inpainting(self, items: list, pixels: np.ndarray, mean: np.ndarray) -> list[tuple]:
        """Per item (its K masks at latent size (K, 1, h, w), its K masked images' latents (K, C, h, w)):
        each variant's masks drawn per sample (curate/inpaintmasks.py), the masked batch through the VAE."""
        from latentmill.curate.inpaintmasks import latent_size_mask, parse_mix, variant_mask
        from latentmill.curate.vae import encode_masked

        mix, (height, width) = parse_mix(self.config.mask_mix), pixels.shape[1:3]
        factor = height // mean.shape[2]
        masks, latents = [], []
        for k in range(self.config.mask_variants):
            drawn = np.stack(
                [variant_mask(self.config.seed, s.shard, s.key, k, height, width, mix)[1] for s, *_ in items]
            )
            latents.append(encode_masked(self.vae, pixels, drawn, self.config.device))
            masks.append(np.stack([latent_size_mask(m, factor) for m in drawn]))
        return [
            (np.stack([m[i] for m in masks]), np.stack([x[i] for x in latents])) for i in range(len(items))
        ]

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
        sample, placement, mean, std, flipped, mask, inpaint = self.latents.pop(key)
        text = self.texts.pop(key, None)
        if not _finite(mean, std, flipped, text, *(inpaint or ())):
            self.dropped["nonfinite_latent"] += 1
            return
        meta = sample_meta(sample.meta, placement)
        held = self.writer.add(  # True: held out for validation (encode --validation-share)
            key,
            mean,
            sample.caption,
            meta,
            std=std,
            flipped=flipped,
            text_emb=text,
            mask=mask,
            inpaint=inpaint,
        )
        if not held:
            self.per_bucket[f"{placement.bucket[0]}x{placement.bucket[1]}"] += 1
            if mask is not None and not mask.any():
                self.empty_masks += 1


def sample_meta(image_meta: dict, placement) -> dict:
    """A latent sample's JSON: its bucket, original size, crop and resized size, then the image sample's
    own fields (scores, url, sizes) but for img2dataset's bookkeeping."""
    carried = {
        k: v for k, v in image_meta.items() if k not in ("caption", "key", "status", "error_message", "exif")
    }
    return {
        "bucket": list(placement.bucket),
        "original_size": list(placement.original_size),
        "crop": list(placement.crop),
        "resized_size": list(placement.resized_size),
        **carried,
    }
