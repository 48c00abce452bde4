"""What inpainting data costs at encode time: throughput with `--mask-variants 2` against without, and the
bytes each sample takes in the shard.

    python -m bench.bench_inpaint --images 48

The same generated JPEG shard (photographs from scikit-image at 1200x900, 512-px buckets) encoded with the
tiny VAE on CPU, workers=0, three times each way alternately; the ratio is the median of the paired runs.
Each variant adds a mask drawn per sample and a second VAE pass over the masked batch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time

from bench.bench_encode import OUT, make_shards


def run(images, output, variants: int, vae) -> tuple[float, dict]:
    from latentmill.curate.encode import EncodeConfig, encode_shard

    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    config = EncodeConfig(vae="tiny", resolution=512, batch_size=16, workers=0, mask_variants=variants)
    start = time.perf_counter()
    stats = encode_shard(images / "00000.tar", output, config, vae)
    return time.perf_counter() - start, stats


def main() -> None:
    from latentmill.curate.vae import load_vae

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    images = OUT / f"images-{args.images}"
    if not (images / "00000.tar").exists():
        make_shards(images, args.images)
    vae = load_vae("tiny")
    run(images, OUT / "warm", 0, vae)  # page cache, allocator
    plain, inpaint = [], []
    for _ in range(args.rounds):
        seconds, stats = run(images, OUT / "plain", 0, vae)
        plain.append(stats["written"] / seconds)
        seconds, stats = run(images, OUT / "inpaint", 2, vae)
        inpaint.append(stats["written"] / seconds)
    per_sample = {
        name: round((OUT / name / "00000.tar").stat().st_size / stats["written"])
        for name in ("plain", "inpaint")
    }
    print(
        json.dumps(
            {
                "images": stats["written"],
                "plain_images_per_s": round(statistics.median(plain), 2),
                "mask_variants_2_images_per_s": round(statistics.median(inpaint), 2),
                "ratio": round(statistics.median(i / p for i, p in zip(inpaint, plain, strict=True)), 3),
                "bytes_per_sample": per_sample,
                "bytes_per_variant": round((per_sample["inpaint"] - per_sample["plain"]) / 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
