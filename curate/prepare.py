"""Decode, bucket, resize and crop image samples for the VAE, in worker processes, in input order.

`PreparePool.map` streams prepared samples in the order the samples arrive, with at most a bounded
number in flight, so memory depends on `workers` and `chunk`, never on the shard's size. With
`workers=0` the same work runs in the calling process. Each prepared sample is either its pixels
(uint8 H x W x 3, the bucket's size) with its placement, or the reason it was dropped.
"""

from __future__ import annotations

import os
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from latentmill.curate.buckets import Bucket, Placement, assign_bucket, needed_upscale, place, resize_and_crop
from latentmill.curate.imageshards import ImageDecodeError, decode_image

MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """The cores this process may use, capped: decoding scales with cores until the VAE is the bottleneck."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


@dataclass(frozen=True)
class PrepareSettings:
    """What fixes a sample's pixels: the bucket set, the enlargement limit and the crop policy."""

    buckets: tuple[Bucket, ...]
    max_upscale: float = 1.0
    crop: str = "center"  # or "random": seeded per (seed, shard, key)
    seed: int = 0


@dataclass
class Prepared:
    """One sample ready for the VAE (`pixels`, `placement`), or dropped (`reason`)."""

    key: str
    pixels: np.ndarray | None = None
    placement: Placement | None = None
    reason: str = ""


def prepare_sample(shard: str, key: str, image_bytes: bytes, settings: PrepareSettings) -> Prepared:
    """Decode one image, pick its bucket, resize to cover it and crop."""
    try:
        image = decode_image(image_bytes)
    except ImageDecodeError as err:
        return Prepared(key, reason=err.reason)
    bucket = assign_bucket(image.width, image.height, list(settings.buckets))
    if needed_upscale(image.width, image.height, bucket) > settings.max_upscale + 1e-9:
        return Prepared(key, reason="too_small")
    rng = None
    if settings.crop == "random":
        rng = np.random.default_rng([settings.seed, zlib.crc32(f"{shard}/{key}".encode())])
    placement = place(image.width, image.height, bucket, rng)
    pixels = np.asarray(resize_and_crop(image, placement), dtype=np.uint8)
    return Prepared(key, pixels=pixels, placement=placement)


def _prepare_chunk(shard: str, items: list[tuple[str, bytes]], settings: PrepareSettings) -> list[Prepared]:
    return [prepare_sample(shard, key, data, settings) for key, data in items]


class PreparePool:
    """Worker processes that prepare samples; results come back in input order, a bounded window ahead."""

    def __init__(self, workers: int, chunk: int = 4, window_per_worker: int = 4):
        self.workers, self.chunk = workers, chunk
        self.window = max(2, workers * window_per_worker)
        self._pool = None
        if workers > 0:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: the parent may hold torch's thread pools, which a forked child must not inherit
            self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def map(self, shard: str, samples: Iterable[tuple[str, bytes]], settings: PrepareSettings) -> Iterator[Prepared]:
        """Prepared samples of (key, image bytes) pairs, in the order given."""
        if self._pool is None:
            for key, data in samples:
                yield prepare_sample(shard, key, data, settings)
            return
        pending: deque = deque()
        chunk: list[tuple[str, bytes]] = []
        for item in samples:
            chunk.append(item)
            if len(chunk) == self.chunk:
                pending.append(self._pool.submit(_prepare_chunk, shard, chunk, settings))
                chunk = []
                while len(pending) >= self.window:
                    yield from pending.popleft().result()
        if chunk:
            pending.append(self._pool.submit(_prepare_chunk, shard, chunk, settings))
        while pending:
            yield from pending.popleft().result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
