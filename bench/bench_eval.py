"""What evaluation costs: the validation loss inside training as a share of training time, and `latentmill
eval`'s image generation against calling the diffusers pipeline directly.

    python -m bench.bench_eval --steps 12

1. Overhead: bench_lora's SD-shaped U-Net (17.6 M parameters, random weights) trained from synthetic 256 px
   latents at the default batch size (16) on the CPU, seconds per step over steps 2-12; then the default
   validation loss (128 held-out samples, the default, x 8 timesteps, raw and EMA weights) of the same U-Net,
   timed alone.
   The share at `--eval-every 1000` is eval / (1000 x step + eval).
2. Generation: the same U-Net in a StableDiffusionPipeline folder (tiny VAE and CLIP text model), 8 images
   of 64 px, 10 DDIM steps: `eval`'s generator (a batch of 8, image i's noise from its own seed + i, so it
   does not depend on the batch) against one call of the pipeline with the 8 prompts (the baseline).
Results go to bench/out/eval/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.bench_lora import OUT as LORA_OUT
from bench.bench_lora import UNET, prepare

OUT = Path(__file__).parent / "out" / "eval"


def validation_folder(folder: Path, count: int = 256) -> None:
    from latentmill.curate.latentshards import LatentShardWriter, read_manifest, write_manifest

    if (folder / "manifest.json").exists():
        return
    header = {
        k: v
        for k, v in read_manifest(LORA_OUT / "latents").items()
        if k not in ("samples", "per_bucket", "shards")
    }
    writer = LatentShardWriter(folder, "00000")
    rng = np.random.default_rng(1)
    for i in range(count):
        writer.add(f"v{i:05d}", rng.standard_normal((4, 32, 32)), f"caption {i}", {"bucket": [256, 256]})
    stats = {"00000": {"written": count, "per_bucket": {"256x256": count}} | writer.close()}
    write_manifest(folder, header | {"split": "validation"}, stats)


def overhead(steps: int) -> dict:
    import torch

    from latentmill.curate.latentshards import read_manifest
    from latentmill.train.config import TrainConfig
    from latentmill.train.loop import train
    from latentmill.train.models import build_unet
    from latentmill.train.objective import Objective
    from latentmill.train.schedule import training_scheduler
    from latentmill.train.validation import ValidationSet
    from latentmill.train.weights import FullWeights

    times = []
    run = OUT / "run"
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    train(
        TrainConfig(
            shards=str(LORA_OUT / "latents"), output=str(run), model=str(LORA_OUT / "base"),
            text_encoder=str(LORA_OUT / "text"), steps=steps, log_every=1, checkpoint_every=steps,
            warmup_steps=1, device="cpu",
        ),
        progress=lambda m: times.append(time.perf_counter()),
    )  # fmt: skip
    step = (times[-1] - times[1]) / (len(times) - 2)
    validation_folder(OUT / "validation")
    validation = ValidationSet(str(OUT / "validation"), read_manifest(LORA_OUT / "latents"), 128, "cpu")
    unet = build_unet(str(LORA_OUT / "base"), 4, 32, 32)
    text = torch.zeros(1, 77, 32)
    start = time.perf_counter()
    validation.measure(
        FullWeights(unet),
        Objective(training_scheduler("epsilon")),
        lambda c: (text.expand(len(c), -1, -1), None),
        False,
    )
    seconds = time.perf_counter() - start
    return {
        "s_per_step": step,
        "eval_s": seconds,
        "share_at_1000": seconds / (1000 * step + seconds),
    }


def generation(count: int = 8, steps: int = 10) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from latentmill.curate.vae import load_vae
    from latentmill.train.sampling import sampler
    from latentmill.train.schedule import sampling_scheduler

    folder = OUT / "pipeline"
    if not (folder / "model_index.json").exists():
        torch.manual_seed(0)
        StableDiffusionPipeline(
            vae=load_vae("tiny").model,
            text_encoder=CLIPTextModel.from_pretrained(LORA_OUT / "text" / "text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(LORA_OUT / "text" / "tokenizer"),
            unet=UNet2DConditionModel(
                sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=32, **UNET
            ),
            scheduler=sampling_scheduler("epsilon"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ).save_pretrained(folder)
    prompts = [f"prompt {i}" for i in range(count)]
    make = sampler(folder)
    make(prompts[:1], 0, 2, 5.0, (64, 64))  # warm
    start = time.perf_counter()
    make(prompts, 0, steps, 5.0, (64, 64), seeds=list(range(count)))  # eval's call: a seed per image
    ours = count / (time.perf_counter() - start)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    pipe(
        prompts,
        num_inference_steps=steps,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    direct = count / (time.perf_counter() - start)
    return {"eval_images_per_s": ours, "pipeline_images_per_s": direct, "ratio": ours / direct}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--only", choices=("overhead", "generation"), help="Run one part (the other's last figures kept)."
    )
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    prepare(LORA_OUT)
    results = json.loads((OUT / "results.json").read_text()) if (OUT / "results.json").exists() else {}
    if args.only != "generation":
        results["overhead"] = overhead(args.steps)
    if args.only != "overhead":
        results["generation"] = generation()
    o, g = results["overhead"], results["generation"]
    print(
        f"training step {o['s_per_step']:.3f} s; validation loss (128 samples x 8 timesteps, raw + EMA) {o['eval_s']:.2f} s"
    )
    print(f"share of training time at --eval-every 1000: {100 * o['share_at_1000']:.2f}%")
    print(
        f"generation: eval {g['eval_images_per_s']:.2f} img/s, the pipeline batched {g['pipeline_images_per_s']:.2f} "
        f"img/s: x{g['ratio']:.2f}"
    )
    (OUT / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
