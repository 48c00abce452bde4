"""Streaming latent loader: shards split by rank, then by worker; shuffled; every batch from one bucket;
resumable exactly.

The stream of an epoch is a pure function of (seed, epoch, rank, world size, workers): each worker
reads its own shards and batches them, and torch's DataLoader takes batches from the workers in
turn. So the loader's state is just (epoch, batches taken this epoch): resuming replays the epoch's
stream and skips what was taken (re-reading those shards, which is cheap next to training).
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
import torch

from latentmill.curate.errors import InputError
from latentmill.curate.latentshards import is_url, iter_latent_shard, read_manifest


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard paths from a folder, a file, a brace pattern (`latents/{00000..00009}.tar`) or a list."""
    import braceexpand

    items = spec if isinstance(spec, list) else [spec]
    shards: list[str] = []
    for item in items:
        path = Path(item)
        if not is_url(item) and path.is_dir():
            shards += [str(p) for p in sorted(path.glob("*.tar"))]
        else:
            expanded = list(braceexpand.braceexpand(str(item)))
            missing = [p for p in expanded if not is_url(p) and not Path(p).exists()]
            if missing:
                raise InputError(f"{item}: no latent shards at {missing[0]}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: "
                                 f"no such file or folder. Give the folder `latentmill encode` wrote, a brace pattern, or URLs.")
            shards += expanded
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
    workers: int = 0  # DataLoader worker processes reading shards (0: in the training process)
    flip: bool = True  # use stored flipped latents half of the time
    sample_posterior: bool = True  # mean + std * noise where the std is stored
    state: LoaderState = field(default_factory=LoaderState)
    skipped: dict = field(default_factory=dict)  # this process's reader: reason -> samples or shards skipped
    _worker_skipped: dict = field(default_factory=dict)

    def skipped_total(self) -> dict:
        """Skipped samples (bad_sample, unreadable_sample) and shards (damaged_shard, unreadable_shard), over
        every worker."""
        total: dict = {}
        for counts in [self.skipped, *self._worker_skipped.values()] if self.workers > 1 else [self.skipped]:
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + n
        return total

    def __post_init__(self):
        readers = self.world_size * max(1, self.workers)
        if len(self.shards) < readers:
            raise InputError(f"{len(self.shards)} latent shard(s) for {self.world_size} rank(s) x {max(1, self.workers)} "
                             f"worker(s): every reader needs at least one shard. Use fewer --workers, or encode into "
                             f"more, smaller shards (download --shard-size).")
        folder = self.shards[0].rsplit("/", 1)[0] if is_url(self.shards[0]) else Path(self.shards[0]).parent
        self.manifest = read_manifest(folder)
        self.my_shards = self.shards[self.rank::self.world_size]

    def _samples(self, epoch: int, worker: int = 0) -> Iterator[dict]:
        rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}")
        mine = self.my_shards[worker::max(1, self.workers)]
        if self.mode == "epoch":
            order = list(mine)
            rng.shuffle(order)
        else:
            order = [rng.choice(mine) for _ in range(10_000)]
        buffer: list[dict] = []
        for shard in order:
            try:
                for sample in iter_latent_shard(shard, self.manifest, errors=self.skipped):
                    buffer.append(sample)
                    if len(buffer) >= self.shuffle_buffer:
                        yield buffer.pop(rng.randrange(len(buffer)))
            except OSError:  # the shard cannot be opened at all (missing file, URL down)
                self.skipped["unreadable_shard"] = self.skipped.get("unreadable_shard", 0) + 1
        rng.shuffle(buffer)
        yield from buffer

    def _batches(self, epoch: int, worker: int = 0) -> Iterator[list[dict]]:
        pending: dict[tuple, list[dict]] = {}
        for sample in self._samples(epoch, worker):
            bucket = tuple(sample["meta"]["bucket"])
            pending.setdefault(bucket, []).append(sample)
            if len(pending[bucket]) == self.batch_size:
                yield pending.pop(bucket)
        if self.mode == "epoch":
            for bucket in sorted(pending):
                yield pending[bucket]

    def _collate(self, samples: list[dict], epoch: int, worker: int, index: int) -> dict:
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker, index])
        latents = []
        for sample in samples:
            flipped = self.flip and "latent_flip" in sample and rng.random() < 0.5
            latent = (sample["latent_flip"] if flipped else sample["latent"]).astype(np.float32)
            if self.sample_posterior and "latent_std" in sample and not flipped:
                latent = latent + sample["latent_std"].astype(np.float32) * rng.standard_normal(latent.shape, dtype=np.float32)
            latents.append(latent)
        batch = {"keys": [s["key"] for s in samples], "latents": torch.from_numpy(np.stack(latents)),
                 "captions": [s["caption"] for s in samples], "meta": [s["meta"] for s in samples],
                 "worker": worker, "skipped": dict(self.skipped)}  # a worker's counts travel with its batches
        if all("text_emb" in s for s in samples):
            batch["text_emb"] = torch.from_numpy(np.stack([s["text_emb"].astype(np.float32) for s in samples]))
        return batch

    def worker_batches(self, epoch: int, worker: int) -> Iterator[dict]:
        """The collated batches of one worker's shards in one epoch."""
        for index, samples in enumerate(self._batches(epoch, worker)):
            yield self._collate(samples, epoch, worker, index)

    def epoch_batches(self, epoch: int) -> Iterator[dict]:
        """One epoch's batches: in this process, or from `workers` DataLoader processes taken in turn."""
        if self.workers <= 1:
            yield from self.worker_batches(epoch, 0)
            return
        loader = torch.utils.data.DataLoader(_EpochDataset(self, epoch), batch_size=None, num_workers=self.workers,
                                             prefetch_factor=4, persistent_workers=False)
        yield from loader

    def __iter__(self) -> Iterator[dict]:
        """Batches forever, epoch after epoch, from the current state on."""
        while True:
            epoch, skip = self.state.epoch, self.state.batches
            produced = 0
            for index, batch in enumerate(self.epoch_batches(epoch)):
                produced += 1
                if index < skip:
                    continue
                self.state.batches = index + 1
                self._worker_skipped[batch["worker"]] = batch["skipped"]
                yield batch
            if produced == 0:
                raise InputError(f"the latent shards of rank {self.rank} hold no readable samples "
                                 f"({len(self.my_shards)} shard(s), skipped: {self.skipped_total() or 'none'}).")
            self.state = LoaderState(epoch=epoch + 1, batches=0)


class _EpochDataset(torch.utils.data.IterableDataset):
    """One epoch of a LatentLoader, each DataLoader worker reading its own shards."""

    def __init__(self, loader: LatentLoader, epoch: int):
        self.loader, self.epoch = loader, epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        yield from self.loader.worker_batches(self.epoch, info.id if info else 0)
