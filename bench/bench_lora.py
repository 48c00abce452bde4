"""LoRA and textual inversion against full fine-tuning of the same U-Net: step time and peak memory,
through `latentmill train`.

    python -m bench.bench_lora --steps 12

A "pretrained" U-Net (a small SD-shaped config: 3 levels, 2 layers each, 64-128-256 channels, random
weights) is written as a diffusers folder; each mode then trains it from synthetic 256 px latents (32x32x4)
at batch 4 in a fresh process, on the CPU: full fine-tuning (AdamW over every weight, plus the EMA copy),
LoRA rank 16 on the attention layers, and textual inversion of a 4-vector token (the U-Net frozen; the
text encoder runs with gradients to the token, captions from the object templates). Reported per mode: seconds per step after the first two steps,
peak resident memory of the process (ru_maxrss) and, exactly, the bytes of training state (weights,
gradients, AdamW moments, EMA) the mode holds. Results go to bench/out/lora/results.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
OUT = HERE / "out" / "lora"
UNET = dict(
    block_out_channels=(64, 128, 256),
    layers_per_block=2,
    attention_head_dim=8,
    norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
MODES = ("full", "lora-16", "ti-4")


def prepare(folder: Path, count: int = 64) -> None:
    """Synthetic latents at 256 px, a tiny CLIP text pipeline and the base U-Net folder."""
    import torch
    from diffusers import UNet2DConditionModel

    from latentmill.curate.latentshards import LatentShardWriter, write_manifest
    from latentmill.curate.textencoder import write_tiny_clip_pipeline

    if (folder / "base" / "unet" / "config.json").exists():
        return
    latents = folder / "latents"
    latents.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    stats = {}
    for shard in range(2):
        writer = LatentShardWriter(latents, f"{shard:05d}")
        for i in range(count // 2):
            writer.add(
                f"{shard:05d}{i:04d}",
                rng.standard_normal((4, 32, 32)),
                f"caption {i}",
                {"bucket": [256, 256]},
            )
        stats[f"{shard:05d}"] = {
            "written": count // 2,
            "per_bucket": {"256x256": count // 2},
        } | writer.close()
    write_manifest(
        latents,
        {
            "vae": {"name": "synthetic", "fingerprint": "none"},
            "scaling_factor": 0.18215,
            "shift_factor": None,
            "latent_channels": 4,
            "downsample_factor": 8,
            "resolution": 256,
            "buckets": [[256, 256]],
            "text_encoder": None,
            "encode_config": {"vae": "synthetic", "resolution": 256},
        },
        stats,
    )
    write_tiny_clip_pipeline(folder / "text")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, cross_attention_dim=32, **UNET)
    unet.save_pretrained(folder / "base" / "unet")


def state_bytes(folder: Path, mode: str) -> dict:
    """Exact bytes of what each mode keeps for training (fp32): weights, gradients, AdamW's two moments, EMA."""
    from diffusers import UNet2DConditionModel

    from latentmill.train.lora import add_lora

    unet = UNet2DConditionModel.from_pretrained(folder / "base" / "unet")
    if mode.startswith("lora"):
        add_lora(unet, int(mode.split("-")[1]), float(mode.split("-")[1]), "attention", 0)
    total = sum(p.numel() for p in unet.parameters()) * 4
    trained = sum(p.numel() for p in unet.parameters() if p.requires_grad) * 4
    if mode.startswith("ti"):  # the token's vectors (32-d tiny text encoder) are all that trains
        trained = int(mode.split("-")[1]) * 32 * 4
    return {"weights": total, "trained": trained, "state": total + trained * 4}  # + grads, 2 moments, EMA


def one(mode: str, folder: Path, steps: int) -> dict:
    """Train in this process; return step time and this process's peak memory."""
    from latentmill.train.config import TrainConfig
    from latentmill.train.loop import train

    times = []

    def progress(metrics):
        times.append(time.perf_counter())

    run = folder / f"run-{mode}"
    args = dict(
        shards=str(folder / "latents"),
        output=str(run),
        model=str(folder / "base"),
        text_encoder=str(folder / "text"),
        batch_size=4,
        steps=steps,
        log_every=1,
        checkpoint_every=steps,
        warmup_steps=1,
        device="cpu",
    )
    if mode.startswith("lora"):
        args["lora_rank"] = int(mode.split("-")[1])
    if mode.startswith("ti"):
        args |= dict(textual_inversion="<bench>", init_word="cat", vectors=int(mode.split("-")[1]))
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    train(TrainConfig(**args), progress=progress)
    per_step = (times[-1] - times[1]) / (len(times) - 2)
    return {"s_per_step": per_step, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(one(args.one, OUT, args.steps)))
        return
    prepare(OUT)
    results = {}
    for mode in MODES:  # each in a fresh process: its own peak memory
        done = subprocess.run(
            [sys.executable, "-m", "bench.bench_lora", "--one", mode, "--steps", str(args.steps)],
            check=True,
            cwd=HERE.parent,
            capture_output=True,
            text=True,
        )
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1]) | state_bytes(OUT, mode)
    full = results["full"]
    print(f"{'mode':<10}{'s/step':>9}{'peak RSS MiB':>14}{'trained params':>16}{'training state MiB':>20}")
    for mode, r in results.items():
        print(
            f"{mode:<10}{r['s_per_step']:>9.3f}{r['peak_rss_mib']:>14.0f}{r['trained'] // 4:>16,}"
            f"{r['state'] / 2**20:>20.1f}"
        )
    lora, ti = results["lora-16"], results["ti-4"]
    print(
        f"LoRA/full: step time x{lora['s_per_step'] / full['s_per_step']:.2f}, peak RSS "
        f"x{lora['peak_rss_mib'] / full['peak_rss_mib']:.2f}, training state x{lora['state'] / full['state']:.2f}"
    )
    print(
        f"textual inversion/LoRA: step time x{ti['s_per_step'] / lora['s_per_step']:.2f}, peak RSS "
        f"x{ti['peak_rss_mib'] / lora['peak_rss_mib']:.2f}"
    )
    (OUT / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
