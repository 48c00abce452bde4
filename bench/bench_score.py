"""`score` throughput on CPU with the tiny open_clip model, and the share of time decoding vs in the model.

    python bench/bench_score.py --images 256

Generated JPEG photographs (1200x900) in two image shards. Runs `score` with 0 and with 2 DataLoader
workers; in the 0-worker run, decoding and the model take turns on the main process, so their shares
are measured directly (the model's time is timed around the CLIP calls). Each setting runs twice and
the second run is reported, so imports and the page cache do not count against the first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "out" / "score"


def make_images(folder: Path, count: int) -> None:
    sys.path.insert(0, str(HERE.parent))
    from latentmill.curate import samples
    from tests.conftest import make_shard

    folder.mkdir(parents=True, exist_ok=True)
    photos = list(samples.PHOTOS)
    half = count // 2
    for shard in range(2):
        entries = []
        for i in range(half):
            image = samples.photo(photos[(shard * half + i) % len(photos)], 1200, 900)
            entries.append(
                (
                    f"{shard:05d}{i:04d}",
                    {"jpg": samples.encode(image, "jpg", quality=92), "txt": f"photo number {i}".encode()},
                )
            )
        make_shard(folder / f"{shard:05d}.tar", entries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    images = OUT / f"images-{args.images}"
    if not (images / "00001.tar").exists():
        make_images(images, args.images)

    from latentmill.filters import clip as clip_module
    from latentmill.filters.score import ScoreConfig, score

    model_seconds = {"t": 0.0}
    for name in ("embed_images", "embed_texts"):
        original = getattr(clip_module.ClipModel, name)

        def timed(self, *a, _original=original, **k):
            start = time.perf_counter()
            result = _original(self, *a, **k)
            model_seconds["t"] += time.perf_counter() - start
            return result

        setattr(clip_module.ClipModel, name, timed)

    results = {}
    for workers in (0, 2, 0, 2):  # the first pair warms up (imports, page cache); the second is kept
        shutil.rmtree(OUT / "scores", ignore_errors=True)
        model_seconds["t"] = 0.0
        start = time.perf_counter()
        totals = score(
            images,
            OUT / "scores",
            ScoreConfig(clip_model="latentmill-tiny", pretrained="none", workers=workers, batch_size=32),
        )
        seconds = time.perf_counter() - start
        results[f"workers={workers}"] = {
            "images": totals["scored"],
            "seconds": round(seconds, 2),
            "images_per_s": round(totals["scored"] / seconds, 1),
            "model_seconds": round(model_seconds["t"], 2),
        }
    serial = results["workers=0"]
    serial["model_share"] = round(serial["model_seconds"] / serial["seconds"], 3)
    serial["decode_and_rest_share"] = round(1 - serial["model_share"], 3)
    results["speedup_from_workers"] = round(results["workers=2"]["images_per_s"] / serial["images_per_s"], 2)

    # what JPEG draft mode saves for a ViT-L/14-sized input (224 px): decode only, one core
    from latentmill.curate.imageshards import iter_image_shard

    blobs = [s for s in iter_image_shard(images / "00000.tar")]
    decode = {}
    for label, draft in (("full_decode", None), ("draft_224", (224, 224))):
        start = time.perf_counter()
        for sample in blobs:
            sample.image(draft_size=draft)
        decode[label] = round(len(blobs) / (time.perf_counter() - start), 1)
    results["decode_images_per_s_one_core"] = decode | {
        "draft_speedup": round(decode["draft_224"] / decode["full_decode"], 2)
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
