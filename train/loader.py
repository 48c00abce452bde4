"""Streaming latent loader: shards split by rank, shuffled, every batch from one bucket, resumable exactly.

The stream of an epoch is a pure function of (seed, epoch, rank, world size), so the loader's state is
just (epoch, batches taken this epoch): resuming replays the epoch's stream and skips what was taken.
Epoch mode yields every sample of the rank's shards once per epoch (incomplete per-bucket batches are
yielded at the end of the epoch); resampled mode draws shards with replacement, forever, and the
training loop bounds it with `--steps`. Corrupt samples and unreadable shards are skipped and counted.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from latentmill.curate.errors import InputError
from latentmill.curate.latentshards import iter_latent_shard, read_manifest


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard paths from a folder, a file, a brace pattern (`latents/{00000..00009}.tar`) or a list."""
    import braceexpand

    items = spec if isinstance(spec, list) else [spec]
    shards: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            shards += [str(p) for p in sorted(path.glob("*.tar"))]
        else:
            shards += list(braceexpand.braceexpand(str(item)))
    if not shards:
        raise InputError(f"{spec}: no latent shards (.tar). Make them with `latentmill encode`.")
    return shards


@dataclass
class LoaderState:
    epoch: int = 0
    batches: int = 0  # taken in this epoch


@dataclass
class LatentLoader:
    """Batches of one bucket: {"keys", "latents" (B,C,h,w float32), "captions", "text_emb"?, "meta"}."""

    shards: list[str]
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    mode: str = "epoch"  # or "resampled"
    shuffle_buffer: int = 256
    flip: bool = True  # use stored flipped latents half of the time
    sample_posterior: bool = True  # mean + std * noise where the std is stored
    state: LoaderState = field(default_factory=LoaderState)
    skipped: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.shards) < self.world_size:
            raise InputError(f"{len(self.shards)} latent shard(s) for {self.world_size} ranks: every rank needs at "
                             f"least one shard. Encode with more, smaller shards (img2dataset --shard-size).")
        folder = Path(self.shards[0]).parent
        self.manifest = read_manifest(folder)
        self.my_shards = self.shards[self.rank::self.world_size]

    def _samples(self, epoch: int) -> Iterator[dict]:
        rng = random.Random(f"{self.seed}/{epoch}/{self.rank}")
        if self.mode == "epoch":
            order = list(self.my_shards)
            rng.shuffle(order)
        else:
            order = [rng.choice(self.my_shards) for _ in range(10_000)]
        buffer: list[dict] = []
        for shard in order:
            try:
                for sample in iter_latent_shard(shard, self.manifest):
                    buffer.append(sample)
                    if len(buffer) >= self.shuffle_buffer:
                        yield buffer.pop(rng.randrange(len(buffer)))
            except (InputError, OSError, ValueError) as err:
                reason = type(err).__name__
                self.skipped[reason] = self.skipped.get(reason, 0) + 1
        rng.shuffle(buffer)
        yield from buffer

    def _batches(self, epoch: int) -> Iterator[list[dict]]:
        pending: dict[tuple, list[dict]] = {}
        for sample in self._samples(epoch):
            bucket = tuple(sample["meta"]["bucket"])
            pending.setdefault(bucket, []).append(sample)
            if len(pending[bucket]) == self.batch_size:
                yield pending.pop(bucket)
        if self.mode == "epoch":
            for bucket in sorted(pending):
                yield pending[bucket]

    def _collate(self, samples: list[dict], epoch: int, index: int) -> dict:
        import torch

        rng = np.random.default_rng([self.seed, epoch, self.rank, index])
        latents = []
        for sample in samples:
            flipped = self.flip and "latent_flip" in sample and rng.random() < 0.5
            latent = (sample["latent_flip"] if flipped else sample["latent"]).astype(np.float32)
            if self.sample_posterior and "latent_std" in sample and not flipped:
                latent = latent + sample["latent_std"].astype(np.float32) * rng.standard_normal(latent.shape, dtype=np.float32)
            latents.append(latent)
        batch = {"keys": [s["key"] for s in samples], "latents": torch.from_numpy(np.stack(latents)),
                 "captions": [s["caption"] for s in samples], "meta": [s["meta"] for s in samples]}
        if all("text_emb" in s for s in samples):
            batch["text_emb"] = torch.from_numpy(np.stack([s["text_emb"].astype(np.float32) for s in samples]))
        return batch

    def __iter__(self) -> Iterator[dict]:
        """Batches forever, epoch after epoch, from the current state on."""
        while True:
            epoch, skip = self.state.epoch, self.state.batches
            for index, samples in enumerate(self._batches(epoch)):
                if index < skip:
                    continue
                self.state.batches = index + 1
                yield self._collate(samples, epoch, index)
            self.state = LoaderState(epoch=epoch + 1, batches=0)
