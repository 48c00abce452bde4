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


def available_cores() -> int:
    """The cores this process may use (its CPU affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """The cores available, capped: decoding scales with cores until the VAE is the bottleneck."""
    return max(1, min(available_cores(), MAX_DEFAULT_WORKERS))


@dataclass(frozen=True)
class PrepareSettings:
    """What fixes a sample's pixels: the bucket set, the enlargement limit and the crop policy."""

    buckets: tuple[Bucket, ...]
    max_upscale: float = 1.0
    crop: str = "center"  # or "random": seeded per (seed, shard, key)
    seed: int = 0
    assign: str = "kohya"  # bucket assignment and resize rounding: kohya or log (curate.buckets)
    mask_factor: int = 0  # > 0: also the loss mask at 1 / mask_factor of the pixels (curate.lossmask)


@dataclass
class Prepared:
    """One sample ready for the VAE (`pixels`, `placement`), or dropped (`reason`)."""

    key: str
    pixels: np.ndarray | None = None
    placement: Placement | None = None
    reason: str = ""
    mask: np.ndarray | None = None  # float32 (1, h, w) at latent size, with PrepareSettings.mask_factor
    detail: str = ""  # why it was dropped, for a warning, where the reason alone does not say enough


def prepare_sample(shard: str, key: str, data: bytes | tuple, settings: PrepareSettings) -> Prepared:
    """Decode one image, pick its bucket, resize to cover it and crop. `data`: the image's bytes, or (its
    bytes, its mask file's bytes or None) when a loss mask is made too."""
    image_bytes, mask_bytes = data if isinstance(data, tuple) else (data, None)
    try:
        image = decode_image(image_bytes)
    except ImageDecodeError as err:
        return Prepared(key, reason=err.reason)
    bucket = assign_bucket(image.width, image.height, list(settings.buckets), settings.assign)
    if needed_upscale(image.width, image.height, bucket) > settings.max_upscale + 1e-9:
        return Prepared(key, reason="too_small")
    rng = None
    if settings.crop == "random":
        rng = np.random.default_rng([settings.seed, zlib.crc32(f"{shard}/{key}".encode())])
    placement = place(image.width, image.height, bucket, rng, settings.assign)
    pixels = np.asarray(resize_and_crop(image, placement), dtype=np.uint8)
    mask = None
    if settings.mask_factor:
        from latentmill.curate.lossmask import MaskSizeMismatch, latent_mask, source_mask

        try:
            mask = latent_mask(source_mask(image_bytes, mask_bytes), placement, settings.mask_factor)
        except MaskSizeMismatch as err:
            detail = (
                f"{shard}: {key}.mask.png is {err}: a loss mask must have its image's size. Dropped "
                f"(mask_size_mismatch); make the mask at the image's size and pack the folder again."
            )
            return Prepared(key, reason="mask_size_mismatch", detail=detail)
        except (OSError, ValueError, SyntaxError):
            return Prepared(key, reason="undecodable_mask")
    return Prepared(key, pixels=pixels, placement=placement, mask=mask)


def _prepare_chunk(
    shard: str,
    items: list[tuple[str, bytes]],
    settings: PrepareSettings,
    slot: str | None = None,
    slot_image_bytes: int = 0,
) -> list[Prepared]:
    """Prepare a few samples; with `slot` (a shared-memory block's name) the pixels go there, image i at
    offset i * slot_image_bytes, and only their shapes travel back: pickling pixels through a pipe costs
    about as much as decoding them."""
    results = [prepare_sample(shard, key, data, settings) for key, data in items]
    if slot is None:
        return results
    block = _attached(slot)
    for i, prepared in enumerate(results):
        if prepared.pixels is not None:
            shape = prepared.pixels.shape
            np.ndarray(shape, np.uint8, buffer=block.buf, offset=i * slot_image_bytes)[...] = prepared.pixels
            prepared.pixels = shape  # the pixels are in the slot
    return results


_ATTACHED: dict = {}


def _attached(name: str):
    """A worker's handle on a parent's shared-memory block, opened once. The parent owns and unlinks it
    (workers from the fork server share the parent's resource tracker, so attaching registers nothing new)."""
    if name not in _ATTACHED:
        from multiprocessing import shared_memory

        _ATTACHED[name] = shared_memory.SharedMemory(name=name)
    return _ATTACHED[name]


class PreparePool:
    """Worker processes that prepare samples; results come back in input order, a bounded window ahead.

    Pixels travel through shared-memory slots (one per chunk in flight, sized for the largest bucket), so
    the parent copies each image once, into its batch."""

    def __init__(self, workers: int, chunk: int = 8, window_per_worker: int = 4):
        self.workers, self.chunk = workers, chunk
        self.window = max(2, workers * window_per_worker)
        self._pool = None
        self._slots: list = []
        self._slot_image_bytes = 0
        if workers > 0:
            from concurrent.futures import ProcessPoolExecutor

            from latentmill.curate.workerprocesses import worker_context, worker_environment

            # never forked from this process: it may hold torch's thread pools and a store's client
            self._pool = ProcessPoolExecutor(
                workers, mp_context=worker_context(), initializer=worker_environment()
            )

    def _ensure_slots(self, settings: PrepareSettings) -> None:
        from multiprocessing import shared_memory

        largest = max(w * h for w, h in settings.buckets) * 3
        if largest <= self._slot_image_bytes and len(self._slots) >= self.window + 1:
            return
        self._free_slots()
        self._slot_image_bytes = largest
        self._slots = [
            shared_memory.SharedMemory(create=True, size=largest * self.chunk) for _ in range(self.window + 1)
        ]

    def map(
        self, shard: str, samples: Iterable[tuple[str, bytes | tuple]], settings: PrepareSettings
    ) -> Iterator[Prepared]:
        """Prepared samples of (key, image bytes or (image, mask file) bytes) pairs, in the order given."""
        if self._pool is None:
            for key, data in samples:
                yield prepare_sample(shard, key, data, settings)
            return
        self._ensure_slots(settings)
        free = deque(range(len(self._slots)))
        pending: deque = deque()

        def submit(chunk):
            slot = free.popleft()
            future = self._pool.submit(
                _prepare_chunk, shard, chunk, settings, self._slots[slot].name, self._slot_image_bytes
            )
            pending.append((future, slot))

        def collect():
            future, slot = pending.popleft()
            results = future.result()
            buffer = self._slots[slot].buf
            for i, prepared in enumerate(results):
                if prepared.pixels is not None:
                    view = np.ndarray(
                        prepared.pixels, np.uint8, buffer=buffer, offset=i * self._slot_image_bytes
                    )
                    prepared.pixels = view.copy()
            free.append(slot)
            return results

        chunk: list[tuple[str, bytes]] = []
        for item in samples:
            chunk.append(item)
            if len(chunk) == self.chunk:
                submit(chunk)
                chunk = []
                while len(pending) >= self.window:
                    yield from collect()
        if chunk:
            submit(chunk)
        while pending:
            yield from collect()

    def _free_slots(self) -> None:
        for block in self._slots:
            block.close()
            block.unlink()
        self._slots = []

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        self._free_slots()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
