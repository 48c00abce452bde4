"""Where and how a run runs: the launcher (this process, torchrun, Ray Train), the device and precision, the
loader's processes and the shard cache of shards in an object store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from latentmill.curate.raycluster import scale_wait_field, timeout_field
from latentmill.errors import InputError
from latentmill.schema import opt


@dataclass
class LaunchSettings:
    launcher: str = opt(
        "local",
        "local: this process (many GPUs: start it with torchrun); ray: Ray Train workers across a cluster.",
        choices=("local", "ray"),
    )
    ray_address: str | None = opt(None, "--launcher ray: the cluster ('auto', HOST:6379); default: Ray here.")
    ray_timeout: float = timeout_field()
    ray_scale_wait: float = scale_wait_field()
    num_workers: int = opt(1, "--launcher ray: training workers (one per GPU), across the nodes.", low=1)
    gpus_per_worker: float = opt(
        0.0, "--launcher ray: GPUs each worker takes (0: CPU workers, gloo).", low=0.0
    )
    max_failures: int = opt(
        2, "--launcher ray: times a lost worker or node restarts the workers from the last checkpoint.", low=0
    )
    device: str = opt("auto", "auto (cuda when available), cpu, cuda, cuda:1, ...")
    precision: str = opt(
        "auto",
        "auto: bf16 on CUDA, fp32 on CPU. (No fp16: it would need a gradient scaler.)",
        choices=("auto", "bf16", "fp32"),
    )
    compile: bool = opt(False, "torch.compile the U-Net.")
    gradient_checkpointing: bool = opt(
        False, "Recompute activations in the backward pass (less memory, slower)."
    )
    workers: int | None = opt(
        None,
        "Loader processes per rank reading shards (default: up to 4 on CUDA, with pinned memory; 0 on CPU).",
        low=0,
    )
    cache_dir: str | None = opt(
        None,
        "Shards in an object store (s3://…): the local folder their copies stream through "
        "(default: a temporary folder of the run).",
        path=True,
    )
    cache_limit: str = opt(
        "50GB",
        "Shards in an object store: the most the cache folder holds; the least recently read shards are "
        "evicted first.",
    )
    strict: bool = opt(
        False,
        "Stop at the first damaged latent shard or sample (bytes changed since encode, a broken tar) instead "
        "of skipping it with a warning and counting it in log.jsonl.",
    )

    def check_precision(self) -> None:
        """Before the option's own check, which would only list the choices."""
        if self.precision == "fp16":
            raise InputError(
                f"{self.name('precision')} = 'fp16': fp16 training needs a gradient scaler, which this "
                f"loop does not have; use bf16 on CUDA (as fast, no scaler needed) or fp32 on CPU."
            )

    def check_section(self) -> None:
        from latentmill.train.shardcache import parse_size

        parse_size(self.cache_limit)
        if self.cache_dir:
            _check_folder(self.cache_dir, self.name("cache_dir"))
        if self.launcher == "ray" and self.ray_address not in (None, "local"):
            from latentmill.curate.raycluster import checked_address

            checked_address(self.ray_address, "--ray-address", self.ray_timeout)


def _check_folder(path: str, name: str) -> None:
    """A local folder that is (or can be made) a folder: not a file, nor inside one."""
    from latentmill.curate.storage import is_remote

    if is_remote(path):
        raise InputError(
            f"{name} {path}: the shard cache is a local folder (the shards it holds come from the store)."
        )
    for place in (Path(path), *Path(path).parents):
        if place.exists() and not place.is_dir():
            raise InputError(
                f"{name} {path}: {place} is a file, not a folder; give a folder for the shard cache."
            )
        if place.exists():
            return
