"""Streaming latent loader: shards split by rank, then by worker; shuffled; every batch from one bucket;
resumable exactly.

The stream of an epoch is a pure function of (seed, epoch, rank, world size, workers): each worker
reads its own shards and batches them, and torch's DataLoader takes batches from the workers in
turn. Every batch carries its worker's exact position after it (shard, offset in the shard, the
samples in the shuffle buffer and in unfilled batches, the RNG state), and the loader's state keeps the
position of the last batch taken from each worker. Resuming reads from there: its cost is a few
shards, whatever the step, instead of replaying the epoch.
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

from latentmill.curate.latentshards import is_url, iter_latent_shard, read_manifest
from latentmill.curate.storage import is_remote, location
from latentmill.curate.workerprocesses import worker_context, worker_environment
from latentmill.errors import InputError, warn
from latentmill.train.inpainting import draw_variants
from latentmill.train.latentspace import posterior_sample
from latentmill.train.shardcache import ShardCache


def _stem(shard: str) -> str:
    return shard.rsplit("/", 1)[-1].removesuffix(".tar")


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard paths from a folder, a file, a brace pattern (`latents/{00000..00009}.tar`) or a list."""
    import braceexpand

    items = spec if isinstance(spec, list) else [spec]
    shards: list[str] = []
    for item in items:
        path = Path(item)
        if not is_url(item) and path.is_dir():
            shards += [str(p) for p in sorted(path.glob("*.tar"))]
        elif is_remote(item) and not str(item).endswith(".tar") and "{" not in str(item):  # a store prefix
            shards += sorted(str(p) for p in location(item).glob("*.tar"))
        else:
            expanded = list(braceexpand.braceexpand(str(item)))
            missing = [p for p in expanded if not is_url(p) and not Path(p).exists()]
            if missing:
                raise InputError(
                    f"{item}: no latent shards at {missing[0]}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: "
                    f"no such file or folder. Give the folder `latentmill encode` wrote, a brace pattern, or URLs."
                )
            shards += expanded
    if not shards:
        raise InputError(f"{spec}: no latent shards (.tar). Make them with `latentmill encode`.")
    return shards


@dataclass
class LoaderState:
    """Where the loader stands: the epoch, batches taken in it, and per worker the position after the last
    batch the trainer took from it (`WorkerPosition` as a dict), plus which worker gives the next batch."""

    epoch: int = 0
    batches: int = 0  # taken in this epoch
    next_worker: int = 0
    positions: dict = field(default_factory=dict)  # str(worker) -> WorkerPosition fields


@dataclass
class WorkerPosition:
    """A worker's exact place in its stream: the shard (index in this epoch's shard order) and how many of its
    samples were read, the shuffle buffer's and the unfilled batches' samples (as (shard, key): re-read on
    resume), the RNG state, and how many batches it made. Resuming from it costs reading the shards these
    samples come from, whatever the step."""

    shard_index: int = 0
    offset: int = 0
    buffer: list = field(default_factory=list)  # [[shard, key], ...]
    pending: dict = field(default_factory=dict)  # "WxH" -> [[shard, key], ...]
    rng: list | None = None  # random.Random.getstate(), JSON-able
    batches: int = 0
    draining: bool = False  # the shards are read; the buffer (already shuffled) is being emptied


def _json_rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from(state: list) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


@dataclass
class LatentLoader:
    """Batches of one bucket: {"keys", "latents" (B,C,h,w float32), "captions", "text_emb"? (float16), "meta"}."""

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
    pin_memory: bool = False  # page-locked batches, for non-blocking copies to a GPU
    prefetch: int = 4  # batches each worker prepares ahead
    cache: ShardCache | None = None  # local copies of shards in an object store, read ahead
    strict: bool = False  # a damaged shard or sample stops training (InputError) instead of being skipped
    text_states: object | None = None  # train/textstates.py TextStateShards: stored states joined by key
    state: LoaderState = field(default_factory=LoaderState)
    skipped: dict = field(default_factory=dict)  # this process's reader: reason -> samples or shards skipped
    _worker_skipped: dict = field(default_factory=dict)
    missing: int = 0  # shards the manifest lists that are gone (rank 0 counts them)

    def skipped_total(self) -> dict:
        """Skipped samples (bad_sample, unreadable_sample) and shards (damaged_shard, unreadable_shard), over
        every worker."""
        total: dict = {"missing_shard": self.missing} if self.missing else {}
        for counts in [self.skipped, *self._worker_skipped.values()] if self.workers > 1 else [self.skipped]:
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + n
        return total

    def __post_init__(self):
        if self.batch_size < 1:
            raise InputError(f"--batch-size {self.batch_size}: use 1 or more.")
        if self.workers < 0:
            raise InputError(f"--workers {self.workers}: use 0 (read in the training process) or more.")
        readers = self.world_size * max(1, self.workers)
        if len(self.shards) < readers:
            raise InputError(
                f"{len(self.shards)} latent shard(s) for {self.world_size} rank(s) x {max(1, self.workers)} "
                f"worker(s): every reader needs at least one shard. Use fewer --workers, or encode into "
                f"more, smaller shards (download --shard-size)."
            )
        self.folder = (
            self.shards[0].rsplit("/", 1)[0] if is_url(self.shards[0]) else Path(self.shards[0]).parent
        )
        self.manifest = read_manifest(self.folder)
        self._check_listed()
        self.my_shards = self.shards[self.rank :: self.world_size]

    def _check_listed(self) -> None:
        """A shard the manifest lists that is gone (not merely left out of a pattern given) is said at the
        start, counted as `missing_shard` in the log, and stops a --strict run."""
        listed = self.manifest.get("shards")
        if not isinstance(listed, dict):
            return  # a hand-made folder: no list to hold the shards to
        present = {_stem(shard) for shard in self.shards}
        gone = [
            name
            for name in sorted(set(listed) - present)
            if not location(f"{self.folder}/{name}.tar").exists()
        ]
        if not gone:
            return
        message = (
            f"{self.folder}: {len(gone)} of the {len(listed)} shard(s) its manifest lists are gone ("
            f"{', '.join(g + '.tar' for g in gone[:3])}{', …' if len(gone) > 3 else ''}). Re-encode the folder "
            f"(`latentmill encode` redoes the missing shards)"
        )
        if self.strict:
            raise InputError(message + ", or train without --strict to go on without them.")
        warn(message + f"; training on the {len(self.shards)} left (counted as missing_shard).")
        self.missing = len(gone) if self.rank == 0 else 0

    @property
    def logical_workers(self) -> int:
        return max(1, self.workers)

    # --- one worker's stream ---------------------------------------------------------------------------

    def _shard_order(self, epoch: int, worker: int) -> tuple[list[str], random.Random]:
        rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}")
        mine = self.my_shards[worker :: self.logical_workers]
        if self.mode == "epoch":
            order = list(mine)
            rng.shuffle(order)
        else:
            order = [rng.choice(mine) for _ in range(10_000)]
        return order, rng

    def _read(self, shard: str, upcoming: list[str] = ()) -> Iterator[dict]:
        try:
            stream = self.cache.open(shard, upcoming) if self.cache and is_remote(shard) else None
            samples = iter_latent_shard(
                shard, self.manifest, errors=None if self.strict else self.skipped, stream=stream, verify=True
            )
            yield from self.text_states.join(shard, samples) if self.text_states else samples
        except OSError as err:  # the shard cannot be opened at all (gone since the start, URL down)
            message = f"{shard}: cannot be read ({err})."
            if self.strict:
                raise InputError(f"{message} With --strict this stops the run; check the folder.") from None
            self.skipped["unreadable_shard"] = self.skipped.get("unreadable_shard", 0) + 1
            warn(f"{message} Skipped (unreadable_shard); with `train --strict` it stops the run.")

    def _shards_here(self):
        """[shard, key] -> the same with the shard where this run reads it now: a run resumed from another
        directory, or with its latent folder moved, names its shards by another path (same file name)."""
        by_name = {str(s).rsplit("/", 1)[-1]: s for s in self.shards}
        current = set(by_name.values())

        def here(ref: list) -> list:
            shard, key = ref
            return [shard if shard in current else by_name.get(str(shard).rsplit("/", 1)[-1], shard), key]

        return here

    def _fetch(self, refs: list) -> dict[tuple[str, str], dict]:
        """The samples named by [shard, key] pairs, each shard read once (resume only)."""
        wanted: dict[str, set] = {}
        for shard, key in refs:
            wanted.setdefault(shard, set()).add(key)
        found: dict[tuple[str, str], dict] = {}
        for shard, keys in wanted.items():
            samples = iter_latent_shard(shard, self.manifest, errors={}, verify=True)
            for sample in self.text_states.join(shard, samples) if self.text_states else samples:
                if sample["key"] in keys and (shard, sample["key"]) not in found:
                    sample["shard"] = shard
                    found[(shard, sample["key"])] = sample
        return found

    def worker_stream(
        self, epoch: int, worker: int, start: dict | None = None
    ) -> Iterator[tuple[list[dict], dict]]:
        """(samples of one batch, the worker's position after it) for one worker and epoch, from `start`
        (a WorkerPosition as a dict) or the epoch's beginning. Samples pass through a shuffle buffer, then
        wait in their bucket until a batch is full; in epoch mode the unfilled batches end the epoch."""
        order, rng = self._shard_order(epoch, worker)
        position = WorkerPosition(**start) if start else WorkerPosition()
        buffer: list[dict] = []
        pending: dict[str, list[dict]] = {}
        if start:
            rng = _rng_from(position.rng)
            here = self._shards_here()
            position.buffer = [here(ref) for ref in position.buffer]
            position.pending = {b: [here(r) for r in refs] for b, refs in position.pending.items()}
            found = self._fetch(position.buffer + [ref for refs in position.pending.values() for ref in refs])
            buffer = [found[tuple(ref)] for ref in position.buffer if tuple(ref) in found]
            pending = {
                b: [found[tuple(r)] for r in refs if tuple(r) in found]
                for b, refs in position.pending.items()
            }
        batches = position.batches

        def snapshot(shard_index: int, offset: int, draining: bool) -> dict:
            return {
                "shard_index": shard_index,
                "offset": offset,
                "draining": draining,
                "batches": batches,
                "buffer": [[s["shard"], s["key"]] for s in buffer],
                "pending": {
                    b: [[s["shard"], s["key"]] for s in items] for b, items in pending.items() if items
                },
                "rng": _json_rng_state(rng),
            }

        def place(sample: dict) -> list[dict] | None:
            bucket = "{}x{}".format(*sample["meta"]["bucket"])
            items = pending.setdefault(bucket, [])
            items.append(sample)
            if len(items) == self.batch_size:
                return pending.pop(bucket)
            return None

        if not position.draining:
            for shard_index in range(position.shard_index, len(order)):
                skip = position.offset if shard_index == position.shard_index else 0
                upcoming = order[shard_index + 1 : shard_index + 4]  # read ahead from an object store
                for offset, sample in enumerate(self._read(order[shard_index], upcoming), start=1):
                    if offset <= skip:
                        continue
                    sample["shard"] = order[shard_index]
                    buffer.append(sample)
                    if len(buffer) >= self.shuffle_buffer:
                        batch = place(buffer.pop(rng.randrange(len(buffer))))
                        if batch:
                            batches += 1
                            yield batch, snapshot(shard_index, offset, False)
            rng.shuffle(buffer)
        while buffer:
            batch = place(buffer.pop(0))
            if batch:
                batches += 1
                yield batch, snapshot(len(order), 0, True)
        if self.mode == "epoch":
            for bucket in sorted(pending):
                if pending[bucket]:
                    items, pending[bucket] = pending[bucket], []
                    batches += 1
                    yield items, snapshot(len(order), 0, True)

    def _collate(self, samples: list[dict], epoch: int, worker: int, index: int) -> dict:
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker, index])
        latents, masks = [], []
        for sample in samples:
            flipped = self.flip and "latent_flip" in sample and rng.random() < 0.5
            std = sample.get("latent_std") if self.sample_posterior and not flipped else None
            latents.append(posterior_sample(sample["latent_flip"] if flipped else sample["latent"], std, rng))
            if "mask" in sample:  # the loss mask goes where its image went
                masks.append(np.flip(sample["mask"], -1) if flipped else sample["mask"])
        batch = {
            "keys": [s["key"] for s in samples],
            "latents": torch.from_numpy(np.stack(latents)),
            "captions": [s["caption"] for s in samples],
            "meta": [s["meta"] for s in samples],
            "worker": worker,
            "skipped": dict(self.skipped),
        }  # a worker's counts travel with its batches
        if len(masks) == len(samples):
            batch["mask"] = torch.from_numpy(np.stack(masks).astype(np.float32))
        batch |= draw_variants(samples, rng)  # inpainting: one stored mask variant per sample
        if all("text_states" in s for s in samples):  # float16 or float32, as encode-text stored them
            names = samples[0]["text_states"]
            batch["text_states"] = {
                n: torch.from_numpy(np.stack([s["text_states"][n] for s in samples])) for n in names
            }
        if all("text_emb" in s for s in samples):
            batch["text_emb"] = torch.from_numpy(
                np.stack([s["text_emb"] for s in samples])
            )  # float16: half the copy
        return batch

    def worker_batches(self, epoch: int, worker: int, start: dict | None = None) -> Iterator[dict]:
        """The collated batches of one worker's shards in one epoch, each with the position after it."""
        for samples, position in self.worker_stream(epoch, worker, start):
            batch = self._collate(samples, epoch, worker, position["batches"] - 1)
            batch["position"] = position
            yield batch

    # --- the rank's stream: workers taken in turn -------------------------------------------------------

    def epoch_batches(self, epoch: int, state: LoaderState | None = None) -> Iterator[dict]:
        """One epoch's batches from `state` on: in this process, or from `workers` DataLoader processes taken
        in turn (the worker that gives the next batch first, those that have finished skipped)."""
        state = state or LoaderState(epoch=epoch)
        if self.workers <= 1:
            yield from self.worker_batches(epoch, 0, state.positions.get("0"))
            return
        loader = torch.utils.data.DataLoader(
            _EpochDataset(self, epoch, state),
            batch_size=None,
            num_workers=self.workers,
            prefetch_factor=self.prefetch,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            multiprocessing_context=worker_context(),
            worker_init_fn=worker_environment(),
        )
        yield from loader

    def __iter__(self) -> Iterator[dict]:
        """Batches forever, epoch after epoch, from the current state on."""
        while True:
            epoch = self.state.epoch
            if self.state.batches and not self.state.positions:
                stream = self._replayed(
                    epoch, self.state.batches
                )  # a checkpoint from before positions were saved
            else:
                stream = self.epoch_batches(epoch, self.state)
            produced = self.state.batches
            for batch in stream:
                produced += 1
                worker = batch["worker"]
                self.state.batches += 1
                self.state.positions[str(worker)] = batch.pop("position")
                self.state.next_worker = (worker + 1) % self.logical_workers
                self._worker_skipped[worker] = batch["skipped"]
                if self.pin_memory and self.workers <= 1:
                    batch["latents"] = batch["latents"].pin_memory()
                yield batch
            if produced == 0:
                raise InputError(
                    f"the latent shards of rank {self.rank} hold no readable samples "
                    f"({len(self.my_shards)} shard(s), skipped: {self.skipped_total() or 'none'})."
                )
            self.state = LoaderState(epoch=epoch + 1)

    def _replayed(self, epoch: int, skip: int) -> Iterator[dict]:
        for index, batch in enumerate(self.epoch_batches(epoch)):
            if index >= skip:
                yield batch


class _EpochDataset(torch.utils.data.IterableDataset):
    """One epoch of a LatentLoader from a state: DataLoader worker p serves logical worker
    (p + state.next_worker) % workers, so the DataLoader's first request goes to the worker whose batch
    comes next, and taking workers in turn continues the interrupted order."""

    def __init__(self, loader: LatentLoader, epoch: int, state: LoaderState):
        self.loader, self.epoch, self.state = loader, epoch, state

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical = info.id if info else 0
        worker = (physical + self.state.next_worker) % self.loader.logical_workers
        yield from self.loader.worker_batches(self.epoch, worker, self.state.positions.get(str(worker)))
