"""The latent loader's samples/s on CPU, per worker, against what one GPU consumes.

    python bench/bench_loader.py --images 512

Latent shards at 512 px (64x64x4 latents, with flipped latents and posterior std, as `encode --flip
--std` writes them) are synthesised with the latent-shard writer, then read by `LatentLoader` in
epoch mode with 0 and 2 workers, batch 32. The GPU figure for comparison: NVIDIA's MLPerf Training v4.1
SD2 submission, about 137 samples/s per H100 at 512 px.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
OUT = HERE / "out" / "loader"
GPU_SAMPLES_PER_S = 137  # MLPerf v4.1, SD2 U-Net at 512 px, per H100


def make_latents(folder: Path, count: int, shards: int = 8) -> None:
    from latentmill.curate.buckets import make_buckets
    from latentmill.curate.latentshards import LatentShardWriter, write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    buckets = make_buckets(512)
    stats = {}
    for shard in range(shards):
        writer = LatentShardWriter(folder, f"{shard:05d}")
        per_bucket: dict[str, int] = {}
        for i in range(count // shards):
            w, h = buckets[(shard + i) % 3 + 7]  # three buckets around the square
            shape = (4, h // 8, w // 8)
            writer.add(
                f"{shard:05d}{i:04d}",
                rng.standard_normal(shape),
                f"caption {i}",
                {"bucket": [w, h]},
                std=np.abs(rng.standard_normal(shape)) * 0.1,
                flipped=rng.standard_normal(shape),
            )
            per_bucket[f"{w}x{h}"] = per_bucket.get(f"{w}x{h}", 0) + 1
        stats[f"{shard:05d}"] = {
            "written": count // shards,
            "per_bucket": per_bucket,
        } | writer.close()
    write_manifest(
        folder,
        {
            "vae": {"name": "synthetic", "fingerprint": "none"},
            "scaling_factor": 0.18215,
            "shift_factor": None,
            "latent_channels": 4,
            "downsample_factor": 8,
            "resolution": 512,
            "buckets": [list(b) for b in buckets],
            "text_encoder": None,
            "encode_config": {"vae": "synthetic", "resolution": 512},
        },
        stats,
    )


def epoch_rate(shards: list[str], workers: int, check=None) -> dict:
    """One epoch of the shards through LatentLoader (batches of 32, `workers` processes): samples/s, in
    all and per reader. `check(batch)` looks at each batch."""
    from latentmill.train.loader import LatentLoader

    loader = LatentLoader(shards, batch_size=32, mode="epoch", workers=workers)
    start, samples = time.perf_counter(), 0
    for batch in loader:
        if loader.state.epoch > 0:
            break
        if check:
            check(batch)
        samples += len(batch["keys"])
    seconds = time.perf_counter() - start
    rate = samples / seconds
    return {
        "samples": samples,
        "seconds": round(seconds, 2),
        "samples_per_s": round(rate, 1),
        "samples_per_s_per_reader": round(rate / max(1, workers), 1),
    }


def main() -> None:
    from latentmill.train.loader import expand_shards

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    args = parser.parse_args()
    folder = OUT / f"latents-{args.images}"
    if not (folder / "manifest.json").exists():
        make_latents(folder, args.images)
    shards = expand_shards(str(folder))
    results = {}
    for workers in (0, 0, 2):  # the first run warms the page cache
        results[f"workers={workers}"] = epoch_rate(shards, workers)
    per_reader = results["workers=0"]["samples_per_s"]
    results["gpu_reference_samples_per_s"] = GPU_SAMPLES_PER_S
    results["readers_needed_per_gpu"] = round(GPU_SAMPLES_PER_S / per_reader, 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
