"""Feeding the GPU, on CPU: encode memory and decode rate, resume start-up, loader rate, loop overhead.

    python bench/bench_feed.py encode-memory --sizes 500,2000,8000 --baseline-sizes 500,2000
    python bench/bench_feed.py prepare --images 400
    python bench/bench_feed.py resume --late 2000
    python bench/bench_feed.py loader --images 1024
    python bench/bench_feed.py overhead --steps 60

- encode-memory: peak RSS of `encode` (streamed, 2 decode workers) on one shard of N JPEGs at 512-px
  buckets, against the in-memory encoder it replaced (the specification kept in tests/test_encode.py),
  each in its own process. The VAE is a micro AutoencoderKL (4 channels per block, no attention) saved
  as a folder: memory does not depend on the VAE's width, and a CPU would take hours with a real one.
- prepare: decode + bucket + resize + crop images/s through `PreparePool` with 0, 1 and 2 workers.
- resume: a tiny-U-Net run checkpointed at step 10 and at step N; the wall time from `train(resume)` to
  its first step for each, against the same resumes made to replay the epoch (the pre-position loader).
- loader: `LatentLoader` samples/s at 512 px with stored text embeddings (77 x 768), per worker, against
  one H100's consumption (137 samples/s, MLPerf Training v4.1 SD2).
- overhead: seconds per step of `latentmill train` against a plain `train_text_to_image.py`-style loop on
  the same tiny U-Net, batch and data, on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
OUT = HERE / "out" / "feed"
sys.path.insert(0, str(HERE.parent))
GPU_SAMPLES_PER_S = 137


def micro_vae(folder: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(4, 4, 4, 4),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=2,
            mid_block_add_attention=False,
        ).save_pretrained(folder)
    return folder


def jpeg_shard(path: Path, count: int, distinct: int = 160) -> Path:
    """One image shard of `count` samples cycling through `distinct` photographs (640x480 .. 720x540 JPEGs)."""
    from latentmill.curate import samples
    from tests.conftest import make_shard

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    photos = list(samples.PHOTOS)
    payloads = []
    for i in range(distinct):
        w, h = (640 + 16 * (i % 6), 480 + 12 * (i % 6)) if i % 3 else (480 + 12 * (i % 6), 640 + 16 * (i % 6))
        payloads.append(
            samples.encode(
                samples.photo(photos[i % len(photos)], w, h, view=i // len(photos)), "jpg", quality=90
            )
        )
    entries = (
        (f"{i:09d}", {"jpg": payloads[i % distinct], "txt": f"photo {i}".encode()}) for i in range(count)
    )
    make_shard(path, entries)
    return path


def _encode_child(args) -> None:
    """Run one encode in this process; print its peak RSS. (Decode workers are ~110 MiB each, 54 MiB of it the
    shared pixel slots also counted here; RUSAGE_CHILDREN is no measure of them: any fork a library makes
    reports the parent's RSS at that moment.)"""
    from latentmill.curate.encode import EncodeConfig, encode
    from latentmill.curate.vae import load_vae

    config = EncodeConfig(resolution=512, vae=args.vae, batch_size=16, workers=2, max_upscale=1.0)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    if args.impl == "streamed":
        written = encode(Path(args.shard).parent, out, config)["samples"]
    else:
        from tests.test_encode import reference_encode_shard

        data = reference_encode_shard(Path(args.shard), out, config, load_vae(args.vae))
        written = data.count(b".latent.npy")
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "written": written,
                "seconds": round(seconds, 1),
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            }
        )
    )


def encode_memory(args) -> dict:
    vae = str(micro_vae(OUT / "micro-vae"))
    results = {}
    sizes = [int(n) for n in args.sizes.split(",")]
    baseline = {int(n) for n in args.baseline_sizes.split(",") if n}
    for n in sizes:
        shard = jpeg_shard(OUT / f"images-{n}" / "00000.tar", n)
        for impl in ("streamed", "in_memory"):
            if impl == "in_memory" and n not in baseline:
                continue
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "_encode_child",
                    "--impl",
                    impl,
                    "--shard",
                    str(shard),
                    "--out",
                    str(OUT / f"latents-{impl}-{n}"),
                    "--vae",
                    vae,
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            results[f"{impl} {n}"] = json.loads(child.stdout.strip().splitlines()[-1])
            print(impl, n, results[f"{impl} {n}"], flush=True)
    return results


def prepare_rate(args) -> dict:
    from latentmill.curate.buckets import make_buckets
    from latentmill.curate.imageshards import iter_image_shard
    from latentmill.curate.prepare import PreparePool, PrepareSettings

    shard = jpeg_shard(OUT / f"images-{args.images}" / "00000.tar", args.images)
    items = [(s.key, s.image_bytes) for s in iter_image_shard(shard, key_order=True)]
    settings = PrepareSettings(tuple(make_buckets(512)))
    runs: dict[int, list[float]] = {0: [], 1: [], 2: []}
    pools = {workers: PreparePool(workers) for workers in runs}
    try:
        for pool in pools.values():
            list(pool.map("x", items[:16], settings))  # start the workers
        for _ in range(args.repeats):  # alternate: the machine's noise hits every setting alike
            for workers, pool in pools.items():
                start = time.perf_counter()
                count = sum(1 for p in pool.map("x", items, settings) if not p.reason)
                runs[workers].append(round(count / (time.perf_counter() - start), 1))
                print(workers, runs[workers][-1], flush=True)
    finally:
        for pool in pools.values():
            pool.close()
    results = {
        f"workers={w}": {"images": len(items), "images_per_s_runs": r, "best": max(r)}
        for w, r in runs.items()
    }
    results["speedup_2_over_1"] = round(max(runs[2]) / max(runs[1]), 2)
    results["speedup_2_over_0"] = round(max(runs[2]) / max(runs[0]), 2)
    return results


def tiny_latents(folder: Path, images: int = 64, shards: int = 8) -> Path:
    """Latent shards of the tiny test setup (128 px, flip and std), with a tiny CLIP text pipeline beside."""
    from latentmill.curate.encode import EncodeConfig, encode
    from tests.conftest import image_entry, make_shard, tiny_clip_text_pipeline

    if (folder / "latents" / "manifest.json").exists():
        return folder
    (folder / "images").mkdir(parents=True, exist_ok=True)
    per = images // shards
    for s in range(shards):
        make_shard(
            folder / "images" / f"{s:05d}.tar",
            [image_entry(f"{s:05d}{i:04d}", 256, 256 if i % 2 else 192, seed=i % 8) for i in range(per)],
        )
    tiny_clip_text_pipeline(folder / "pipeline")
    encode(
        folder / "images",
        folder / "latents",
        EncodeConfig(
            vae="tiny",
            resolution=128,
            bucket_min_side=64,
            bucket_max_side=256,
            step=32,
            flip=True,
            std=True,
            workers=0,
            text_encoder=str(folder / "pipeline"),
        ),
    )
    return folder


def resume_startup(args) -> dict:
    from latentmill.train.config import TrainConfig
    from latentmill.train.loop import train

    data = tiny_latents(OUT / "tiny", images=256, shards=16)
    run = OUT / "resume-run-resampled"
    base = dict(
        shards=str(data / "latents"),
        model="tiny",
        text_encoder=str(data / "pipeline"),
        batch_size=8,
        warmup_steps=10,
        checkpoint_every=10_000_000,
        keep_checkpoints=10,
        log_every=100,
        mode="resampled",
        workers=0,
    )
    if not (run / "checkpoints" / f"step-{args.late:07d}").exists():
        shutil.rmtree(run, ignore_errors=True)
        train(TrainConfig(output=str(run), steps=10, **base))
        train(TrainConfig(output=str(run), steps=args.late, resume=True, **base))
    results = {}
    for step in (10, args.late):
        for how in ("position", "replay"):
            trial = OUT / f"resume-{step}-{how}"
            shutil.rmtree(trial, ignore_errors=True)
            (trial / "checkpoints").mkdir(parents=True)
            shutil.copytree(
                run / "checkpoints" / f"step-{step:07d}", trial / "checkpoints" / f"step-{step:07d}"
            )
            if how == "replay":  # the loader before positions were saved: (epoch, batches) only
                state_path = trial / "checkpoints" / f"step-{step:07d}" / "state.json"
                state = json.loads(state_path.read_text())
                state["loader"] = {"epoch": state["loader"]["epoch"], "batches": state["loader"]["batches"]}
                state_path.write_text(json.dumps(state))
            start = time.perf_counter()
            train(TrainConfig(output=str(trial), steps=step + 1, resume=True, **base))
            results[f"step {step}, {how}"] = round(time.perf_counter() - start, 2)
            print(step, how, results[f"step {step}, {how}"], flush=True)
    results["late_over_early_position"] = round(
        results[f"step {args.late}, position"] / results["step 10, position"], 2
    )
    return results


def loader_rate(args) -> dict:
    from bench.bench_loader import make_latents
    from latentmill.curate.latentshards import LatentShardWriter
    from latentmill.train.loader import expand_shards

    folder = OUT / f"latents-text-{args.images}"
    if not (folder / "manifest.json").exists():
        make_latents(folder, args.images)
        rng = np.random.default_rng(1)
        manifest = json.loads((folder / "manifest.json").read_text())
        for shard in manifest["shards"]:  # rewrite each shard with a 77 x 768 caption embedding per sample
            from latentmill.curate.latentshards import iter_latent_shard

            samples = list(iter_latent_shard(folder / f"{shard}.tar", manifest))
            writer = LatentShardWriter(folder, shard)
            for s in samples:
                writer.add(
                    s["key"],
                    s["latent"],
                    s["caption"],
                    s["meta"],
                    std=s["latent_std"],
                    flipped=s["latent_flip"],
                    text_emb=rng.standard_normal((77, 768)).astype(np.float16),
                )
            manifest["shards"][shard].update(writer.close())
        manifest["text_encoder"] = {"name": "synthetic", "fingerprint": "none", "shape": [77, 768]}
        (folder / "manifest.json").write_text(json.dumps(manifest))
    shards = expand_shards(str(folder))
    results = {}
    from bench.bench_loader import epoch_rate

    def stored_captions(batch):
        assert batch["text_emb"].shape[1:] == (77, 768)

    for workers in (0, 0, 1, 2):  # the first run warms the page cache
        results[f"workers={workers}"] = epoch_rate(shards, workers, check=stored_captions)
        print(workers, results[f"workers={workers}"], flush=True)
    results["gpu_reference_samples_per_s"] = GPU_SAMPLES_PER_S
    return results


def plain_loop(data: Path, steps: int, batch_size: int) -> float:
    """A train_text_to_image.py-style loop: precomputed latents and text states in memory, the same tiny U-Net,
    AdamW, noise, timesteps, MSE, backward, clipping, step, EMA. Seconds per step after 5 warm-up steps."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from latentmill.curate.textencoder import load_text_encoder
    from latentmill.train.loader import LatentLoader, expand_shards
    from latentmill.train.models import build_unet

    loader = LatentLoader(expand_shards(str(data / "latents")), batch_size, mode="resampled", seed=0)
    encoder = load_text_encoder(str(data / "pipeline"))
    it = iter(loader)
    batches = []
    for _ in range(steps + 5):
        batch = next(it)
        batches.append((batch["latents"] * 0.18215, batch["text_emb"].float()))
    unet = build_unet("tiny", 4, encoder.width, 16, 0, False)
    ema = build_unet("tiny", 4, encoder.width, 16, 0, False).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    for index, (latents, text) in enumerate(batches):
        if index == 5:
            start = time.perf_counter()
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],))
        prediction = unet(
            scheduler.add_noise(latents, noise, timesteps), timesteps, encoder_hidden_states=text
        ).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters(), strict=True):
                e.lerp_(p, 1e-4)
    return (time.perf_counter() - start) / steps


def ours(data: Path, steps: int, batch_size: int) -> float:
    from latentmill.train.config import TrainConfig
    from latentmill.train.loop import train

    run = OUT / "overhead-run"
    shutil.rmtree(run, ignore_errors=True)
    times = []
    train(
        TrainConfig(
            shards=str(data / "latents"),
            output=str(run),
            model="tiny",
            batch_size=batch_size,
            steps=steps + 5,
            log_every=1,
            checkpoint_every=10_000,
            workers=0,
        ),
        progress=lambda m: times.append(time.perf_counter()),
    )
    return (times[-1] - times[4]) / steps


def loop_overhead(args) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    data = tiny_latents(
        OUT / "tiny-text", images=256, shards=16
    )  # stored caption embeddings, as the plain loop
    results = {"plain_s_per_step": [], "latentmill_s_per_step": []}
    for _ in range(args.repeats):  # alternate, best of each
        results["plain_s_per_step"].append(round(plain_loop(data, args.steps, 16), 4))
        results["latentmill_s_per_step"].append(round(ours(data, args.steps, 16), 4))
        print(results, flush=True)
    results["ratio_best"] = round(min(results["latentmill_s_per_step"]) / min(results["plain_s_per_step"]), 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("encode-memory")
    p.add_argument("--sizes", default="500,2000,8000")
    p.add_argument("--baseline-sizes", default="500,2000")
    p = sub.add_parser("_encode_child")
    for name in ("--impl", "--shard", "--out", "--vae"):
        p.add_argument(name, required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("resume")
    p.add_argument("--late", type=int, default=2000)
    p = sub.add_parser("loader")
    p.add_argument("--images", type=int, default=1024)
    p = sub.add_parser("overhead")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.command == "_encode_child":
        _encode_child(args)
        return
    run = {
        "encode-memory": encode_memory,
        "prepare": prepare_rate,
        "resume": resume_startup,
        "loader": loader_rate,
        "overhead": loop_overhead,
    }[args.command]
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
