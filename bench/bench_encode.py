"""Encode throughput on CPU with the tiny VAE, and decode+resize per core: pillow-simd against plain pillow.

    python bench/bench_encode.py --images 64

1. `latentmill encode` (tiny VAE, 512-px buckets) on generated JPEG shards: images/s, and the share of
   time in decode+resize versus the VAE.
2. Decode + bucket resize + crop of the same JPEGs on one core, run under this environment's PIL
   (pillow-simd where installed) and under a side environment with plain pillow (bench/out/pillow-venv,
   made on first use): images/s each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "out" / "encode"

RESIZE_WORKER = r"""
import io, sys, time, json, tarfile
from PIL import Image, ImageOps
import PIL
path, repeats = sys.argv[1], int(sys.argv[2])
blobs = []
with tarfile.open(path) as tar:
    for m in tar:
        if m.name.endswith(".jpg"):
            blobs.append(tar.extractfile(m).read())
def work(data):
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    w, h = im.size
    bw, bh = (576, 448) if w > h else (448, 576)
    s = max(bw / w, bh / h)
    r = im.resize((max(bw, round(w * s)), max(bh, round(h * s))), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return r.crop((0, 0, bw, bh))
for d in blobs[:4]:
    work(d)
start = time.perf_counter()
for _ in range(repeats):
    for d in blobs:
        work(d)
seconds = time.perf_counter() - start
print(json.dumps({"pil": PIL.__version__, "images_per_s": round(len(blobs) * repeats / seconds, 1)}))
"""


def make_shards(folder: Path, count: int) -> None:
    sys.path.insert(0, str(HERE.parent))
    from latentmill.curate import samples
    from tests.conftest import make_shard

    folder.mkdir(parents=True, exist_ok=True)
    photos = list(samples.PHOTOS)
    entries = []
    for i in range(count):
        w, h = (1200, 900) if i % 2 else (900, 1200)
        image = samples.photo(photos[i % len(photos)], w, h)
        entries.append((f"{i:09d}", {"jpg": samples.encode(image, "jpg", quality=92), "txt": b"a photo"}))
    make_shard(folder / "00000.tar", entries)


def plain_pillow_python() -> Path:
    venv = HERE / "out" / "pillow-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "pillow"], check=True)
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    images = OUT / f"images-{args.images}"
    if not (images / "00000.tar").exists():
        make_shards(images, args.images)

    from latentmill.curate import shardencoder as encode_module  # where encode_batch is called
    from latentmill.curate.encode import EncodeConfig, encode_shard
    from latentmill.curate.vae import load_vae

    timings = {"vae": 0.0}
    original = encode_module.encode_batch

    def timed_encode_batch(*a, **k):
        start = time.perf_counter()
        result = original(*a, **k)
        timings["vae"] += time.perf_counter() - start
        return result

    encode_module.encode_batch = timed_encode_batch  # measure the VAE's share without touching the code path
    import shutil

    shutil.rmtree(OUT / "latents", ignore_errors=True)
    (OUT / "latents").mkdir(parents=True)
    start = time.perf_counter()
    vae = load_vae("tiny")
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    stats = encode_shard(
        images / "00000.tar", OUT / "latents", EncodeConfig(vae="tiny", resolution=512, batch_size=16), vae
    )
    total = time.perf_counter() - start
    encode_module.encode_batch = original

    tar = str(images / "00000.tar")
    here = json.loads(
        subprocess.run(
            [sys.executable, "-c", RESIZE_WORKER, tar, str(args.repeats)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    plain = json.loads(
        subprocess.run(
            [str(plain_pillow_python()), "-c", RESIZE_WORKER, tar, str(args.repeats)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    print(
        json.dumps(
            {
                "encode_cpu_tiny_vae": {
                    "images": stats["written"],
                    "vae_load_seconds": round(load_seconds, 2),
                    "seconds": round(total, 2),
                    "images_per_s": round(stats["written"] / total, 1),
                    "vae_share": round(timings["vae"] / total, 3),
                    "decode_resize_write_share": round(1 - timings["vae"] / total, 3),
                },
                "decode_resize_one_core": {
                    "this_env": here,
                    "plain_pillow": plain,
                    "speedup": round(here["images_per_s"] / plain["images_per_s"], 2),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
