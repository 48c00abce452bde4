"""Training-loader samples/s streaming latent shards from S3 against the same shards on local disk.

    python bench/bench_stream.py --images 1024

Synthetic latent shards at 512 px (as `encode --flip --std` writes them, bench_loader.py's maker) are put
in moto's S3 server, run as its own process on 127.0.0.1 (a real HTTP endpoint, reached through s3fs as a
MinIO would be). One epoch is read by `LatentLoader` (epoch mode, batch 32, in the training process) from
local disk, and from S3 through a cold, fresh ShardCache (every shard fetched during the epoch, the next
ones read ahead, by fetch processes started once before the timing as in a training run); runs
alternate, `--repeats` of each; the ratios are S3 / local of the best and of the median runs, and the
median of each S3 run over the disk run just before it (the fairest on a machine whose speed drifts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "out" / "stream"
GPU_SAMPLES_PER_S = 137  # MLPerf Training v4.1, SD2 U-Net at 512 px, per H100


def epoch(shards: list[str], cache=None) -> float:
    from latentmill.train.loader import LatentLoader

    loader = LatentLoader(shards, batch_size=32, mode="epoch", workers=0, cache=cache)
    start, samples = time.perf_counter(), 0
    for batch in loader:
        if loader.state.epoch > 0:
            break
        samples += len(batch["keys"])
    return samples / (time.perf_counter() - start)


def main() -> None:
    sys.path.insert(0, str(HERE))
    from bench_loader import make_latents

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ahead", type=int, default=2, help="shards fetched ahead (fetch processes)")
    args = parser.parse_args()
    folder = OUT / f"latents-{args.images}"
    if not (folder / "manifest.json").exists():
        make_latents(folder, args.images, shards=args.shards)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        # niced: it stands in for a store on other machines, which takes no cycles from the training node
        ["nice", "-n", "10", sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        import boto3

        for _ in range(100):
            try:
                boto3.client("s3").create_bucket(Bucket="bench")
                break
            except Exception:
                time.sleep(0.1)
        from latentmill.curate.storage import location, upload
        from latentmill.train.loader import expand_shards
        from latentmill.train.shardcache import ShardCache

        for path in sorted(folder.iterdir()):
            upload(path, location(f"s3://bench/latents/{path.name}"))
        local = expand_shards(str(folder))
        remote = expand_shards("s3://bench/latents")
        assert len(local) == len(remote) == args.shards
        epoch(local)  # warm the page cache and the imports
        cache_dir = Path(tempfile.mkdtemp(prefix="bench-cache-"))
        cache = ShardCache(cache_dir, limit=10**10, ahead=args.ahead)
        epoch(remote[:2], cache)  # start the fetch processes once, as a training run does
        rates: dict[str, list[float]] = {"local": [], "s3": []}
        for _ in range(args.repeats):
            rates["local"].append(epoch(local))
            for path in cache_dir.iterdir():  # cold data: every shard fetched again during the epoch
                path.unlink()
            cache._pending.clear()
            before = cache.downloads
            rates["s3"].append(epoch(remote, cache))
            assert cache.downloads - before == args.shards
        cache.close()
        shutil.rmtree(cache_dir)
    finally:
        server.terminate()
        server.wait()
    best = {k: max(v) for k, v in rates.items()}
    median = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
    pairs = sorted(s3 / disk for s3, disk in zip(rates["s3"], rates["local"], strict=True))
    shard_mb = sum(p.stat().st_size for p in folder.glob("*.tar")) / args.shards / 1e6
    print(
        json.dumps(
            {
                "images": args.images,
                "shards": args.shards,
                "shard_mb": round(shard_mb, 1),
                "ahead": args.ahead,
                "local_samples_per_s": round(best["local"], 1),
                "s3_samples_per_s": round(best["s3"], 1),
                "s3_over_local_best": round(best["s3"] / best["local"], 3),
                "s3_over_local_median": round(median["s3"] / median["local"], 3),
                "s3_over_local_pairwise_median": round(
                    pairs[len(pairs) // 2], 3
                ),  # each S3 run / the disk run before it
                "s3_over_one_h100": round(best["s3"] / GPU_SAMPLES_PER_S, 1),
                "all_runs": {k: [round(r, 1) for r in v] for k, v in rates.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
