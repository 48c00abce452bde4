"""What a run's steps draw from: one latent folder, a weighted mixture of several, and for DreamBooth the
class images' folder beside the subject's.

Each folder has its own LatentLoader (its shards, its manifest, its position), so every batch comes from
one bucket of one folder. Which folder gives the n-th batch is drawn from a generator seeded by
(seed, rank, n) alone: the draw needs no state but n, and a resumed run repeats the uninterrupted one.
Folders must agree on what a latent means (VAE, scaling, resolution, channels, stored caption
embeddings); their bucket sets may differ.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from latentmill.curate.latentshards import is_url
from latentmill.errors import InputError, warn
from latentmill.train.loader import LatentLoader, LoaderState, expand_shards

MUST_AGREE = ("resolution", "latent_channels", "downsample_factor", "scaling_factor", "shift_factor")


def latent_sets(sources: list[str]) -> list[tuple[str, list[str]]]:
    """(name, shard paths) per latent set: folders as given, shard files (a shell glob) grouped by their
    folder in order of first appearance. Each set's shards are expanded here, once."""
    groups: dict[str, list[str]] = {}
    for item in sources:
        path = Path(item)
        if is_url(item) or path.is_dir() or "{" in item:
            groups.setdefault(item, []).append(item)
        else:
            groups.setdefault(str(path.parent), []).append(item)
    return [(name, expand_shards(items[0] if len(items) == 1 else items)) for name, items in groups.items()]


def check_same_latent_space(manifests: list[dict], names: list[str], stored_text: bool = True) -> None:
    """Refuse folders whose latents mean different things, naming the two folders and what differs.
    `stored_text`: the run reads the caption embeddings stored in the shards (no --text-encoder), so they
    must agree too."""
    first = manifests[0]
    for manifest, name in zip(manifests[1:], names[1:], strict=True):
        if manifest["vae"]["fingerprint"] != first["vae"]["fingerprint"]:
            raise InputError(
                f"{name}: made with VAE {manifest['vae'].get('name')!r} (fingerprint "
                f"{manifest['vae']['fingerprint']}), {names[0]} with {first['vae'].get('name')!r} (fingerprint "
                f"{first['vae']['fingerprint']}): folders trained together must share the VAE. Re-encode one "
                f"with the other's --vae."
            )
        for key in MUST_AGREE:
            if manifest.get(key) != first.get(key):
                raise InputError(
                    f"{name}: {key} is {manifest.get(key)}, {names[0]}'s is {first.get(key)}: folders trained "
                    f"together must share it (encode both with the same --resolution and --vae)."
                )
        mine, theirs = manifest.get("text_encoder") or {}, first.get("text_encoder") or {}
        if stored_text and (
            mine.get("shape") != theirs.get("shape") or mine.get("name") != theirs.get("name")
        ):
            raise InputError(
                f"{name}: its stored caption embeddings ({mine.get('name') or 'none'}) differ from "
                f"{names[0]}'s ({theirs.get('name') or 'none'}); encode both with the same --text-encoder, "
                f"or train with --text-encoder."
            )


def shard_cache(config, sets: list[tuple[str, list[str]]]):
    """The local cache remote shards stream through (None when every shard is on local disk)."""
    from latentmill.curate.storage import is_remote
    from latentmill.train.shardcache import ShardCache, parse_size

    if not any(is_remote(shard) for _, shards in sets for shard in shards):
        return None
    return ShardCache(config.cache_dir, parse_size(config.cache_limit))


def loader_workers(workers: int | None, device: str, shards_per_rank: int) -> int:
    """Loader processes per rank: as given, or on CUDA several (cores shared between the node's ranks, at
    most 4, at most one per shard), on CPU none (the cores are busy with the model)."""
    if workers is not None:
        return workers
    if not device.startswith("cuda"):
        return 0
    from latentmill.curate.prepare import available_cores

    cores = available_cores()
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = min(4, max(1, cores // ranks_here - 1), shards_per_rank)
    return workers if workers > 1 else 0


class TrainingData:
    """Batches for the loop: `next()` gives (batch, class batch or None). `sets` as `latent_sets` gives them."""

    def __init__(
        self,
        sets: list[tuple[str, list[str]]],
        mix: list[float] | None,
        class_data: str | None,
        seed: int = 0,
        rank: int = 0,
        repeats: list[int] | None = None,
        stored_text: bool = True,
        **loader_options,
    ):
        for option, values, what in (("--mix", mix, "weight"), ("--repeats", repeats, "count")):
            if values is not None and len(values) != len(sets):
                raise InputError(
                    f"{option} has {len(values)} {what}(s) for {len(sets)} latent folder(s): one {what} per folder."
                )
        options = loader_options | {"rank": rank}
        self.loaders = [LatentLoader(shards, seed=seed, **options) for _, shards in sets]
        self.class_loader = (
            LatentLoader(expand_shards(class_data), seed=seed + 1, **options) if class_data else None
        )
        self.names = [name for name, _ in sets] + ([class_data] if class_data else [])
        check_same_latent_space(self.manifests, self.names, stored_text)
        for name, manifest in zip(self.names, self.manifests, strict=True):
            if manifest.get("split") == "validation":
                raise InputError(
                    f"{name}: a held-out validation split (`encode --validation-share`): it never trains. Train "
                    f"on the folder above it; --eval-every measures the validation loss on this one."
                )
        sizes = [loader.manifest.get("samples") or len(loader.shards) for loader in self.loaders]
        self.repeats = list(repeats or [1] * len(self.loaders))
        if repeats:  # kohya's NAME_N folders: a folder is seen N times for each pass over the others
            sizes = [size * n for size, n in zip(sizes, repeats, strict=True)]
        self.weights = list(mix) if mix is not None else sizes
        self.seed, self.rank = seed, rank
        self.drawn = 0  # batches drawn from the mixture so far
        self._streams: list[Iterator | None] = [None] * len(self.loaders)
        self._class_stream: Iterator | None = None

    @property
    def manifest(self) -> dict:
        return self.loaders[0].manifest

    def steps_of_epochs(self, epochs: int, samples_per_step: int) -> int:
        """`epochs` as optimizer steps: every sample of every latent set once per epoch, `repeats` times
        for a folder given repeats (rounded up)."""
        samples = sum(
            loader.manifest["samples"] * n for loader, n in zip(self.loaders, self.repeats, strict=True)
        )
        return max(1, math.ceil(epochs * samples / samples_per_step))

    @property
    def manifests(self) -> list[dict]:
        """Every folder's manifest, the class images' last."""
        return [loader.manifest for loader in self._everyone()]

    @property
    def folder(self):
        return self.loaders[0].folder

    @property
    def my_shards(self) -> list[str]:
        return [shard for loader in self._everyone() for shard in loader.my_shards]

    @property
    def epoch(self) -> int:
        return self.loaders[0].state.epoch

    def _everyone(self) -> list[LatentLoader]:
        return self.loaders + ([self.class_loader] if self.class_loader else [])

    def check_masks(self, names: list) -> None:
        """--masked-loss needs loss masks in every latent folder trained on (class images may have none)."""
        unmasked = [
            n for n, loader in zip(names, self.loaders, strict=True) if not loader.manifest.get("has_mask")
        ]
        if unmasked:
            raise InputError(
                f"--masked-loss: {', '.join(map(str, unmasked))} hold(s) no loss masks; encode with `latentmill "
                f"encode --alpha-mask` (the alpha channel, or NAME.mask.png packed beside each image)."
            )
        for name, loader in zip(names, self.loaders, strict=True):
            empty, samples = loader.manifest.get("empty_masks"), loader.manifest.get("samples")
            if not isinstance(empty, int) or not isinstance(samples, int) or not empty:
                continue
            if empty >= samples:
                raise InputError(
                    f"--masked-loss: every one of the {samples} loss masks of {name} is empty (zero everywhere), "
                    f"so the loss would be 0 and nothing would train. Check the alpha channels or NAME.mask.png "
                    f"files (white: learn, black: ignore), or train without --masked-loss."
                )
            warn(
                f"--masked-loss: {empty} of the {samples} loss masks of {name} are empty (zero everywhere): "
                f"those samples teach nothing."
            )

    def skipped_total(self) -> dict:
        total: dict = {}
        for loader in self._everyone():
            for reason, n in loader.skipped_total().items():
                total[reason] = total.get(reason, 0) + n
        return total

    def source_of(self, n: int) -> int:
        """Which folder gives the n-th batch (a pure function of seed, rank and n)."""
        if len(self.loaders) == 1:
            return 0
        rng = random.Random(f"{self.seed}/mix/{self.rank}/{n}")
        return rng.choices(range(len(self.loaders)), weights=self.weights)[0]

    def next(self) -> tuple[dict, dict | None]:
        source = self.source_of(self.drawn)
        self.drawn += 1
        if self._streams[source] is None:
            self._streams[source] = iter(self.loaders[source])
        batch = next(self._streams[source])
        batch["source"] = source
        if not self.class_loader:
            return batch, None
        if self._class_stream is None:
            self._class_stream = iter(self.class_loader)
        class_batch = next(self._class_stream)
        class_batch["prior"] = True  # DreamBooth's class images: their captions stay theirs
        return batch, class_batch

    # --- the position, saved in each checkpoint -------------------------------------------------------

    def state_dict(self) -> dict:
        """One folder: the loader's state as before; a mixture or DreamBooth: every loader's and the count."""
        if len(self.loaders) == 1 and not self.class_loader:
            return asdict(self.loaders[0].state)
        return {
            "drawn": self.drawn,
            "sources": [asdict(loader.state) for loader in self.loaders],
            "class": asdict(self.class_loader.state) if self.class_loader else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if "sources" not in state:
            state = {"drawn": 0, "sources": [state], "class": None}
        if len(state["sources"]) != len(self.loaders) or (state.get("class") is None) != (
            self.class_loader is None
        ):
            raise InputError(
                f"--resume: the checkpoint was trained on {len(state['sources'])} latent folder(s)"
                f"{' with class data' if state.get('class') else ''}; give the same folders (and --class-data)."
            )
        self.drawn = state["drawn"]
        for loader, saved in zip(self.loaders, state["sources"], strict=True):
            loader.state = LoaderState(**saved)
        if self.class_loader:
            self.class_loader.state = LoaderState(**state["class"])
        self._streams = [None] * len(self.loaders)
        self._class_stream = None
