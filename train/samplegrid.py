"""The sample grids a run writes every `--sample-every` steps, from the EMA weights at fixed seeds: the
sample prompts, each image's prompt and seed under it; for an inpainting run, the first training samples' masked images (red: to fill in) above
what the model fills in, prompted by their captions."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from latentmill.train.config import SAMPLE_PROMPTS, TrainConfig
from latentmill.train.ticaptions import ti_prompts


def sample_grid(
    run: Path, step: int, ema, encode_prompts, manifest: dict, config: TrainConfig, examples: dict | None
) -> Path:
    """samples/step-NNNNNNN.png; `examples`: an inpainting run's (train/inpainting.py `grid_examples`)."""
    from latentmill.curate.vae import load_vae
    from latentmill.train.inpainting import conditioning, masked_inputs
    from latentmill.train.sampling import generate_from_manifest, save_grid

    options = dict(
        steps=config.sample_steps,
        seed=config.seed,
        seeds=None,
        sampler=config.sample_sampler,
        prediction=config.prediction,
        family=config.family,
        config=asdict(config),
    )
    target = run / "samples" / f"step-{step:07d}.png"
    if examples is None:
        prompts = config.sample_prompts
        if config.textual_inversion and prompts == SAMPLE_PROMPTS:  # the defaults know nothing of the token
            prompts = ti_prompts(config)
        states, empty = _encoded(encode_prompts, prompts, config.sample_negative_prompt)
        seeds = [
            config.seed + i for i in range(len(prompts))
        ]  # each image from its own: step to step comparable
        images = generate_from_manifest(
            ema, states, empty, manifest, config.vae, **options | {"seeds": seeds}
        )
        captions = [{"prompt": p, "seed": s} for p, s in zip(prompts, seeds, strict=True)]
        return save_grid(images, target, captions=captions)
    states, empty = _encoded(encode_prompts, examples["captions"], config.sample_negative_prompt)
    scale, shift = manifest["scaling_factor"], manifest.get("shift_factor") or 0.0
    inpaint = conditioning(examples["mask"], examples["masked_latent"], scale, shift)
    results = generate_from_manifest(
        ema, states, empty, manifest, config.vae, examples["size"], inpaint=inpaint, **options
    )
    vae = load_vae(config.vae or manifest["encode_config"]["vae"]).model
    inputs = masked_inputs(examples, vae)
    return save_grid(np.concatenate([inputs, results]), target, columns=len(results))


def _encoded(encode_prompts, prompts: list[str], negative: str):
    """The prompts' states, and the caption guidance steers away from: --sample-negative-prompt, or the
    empty one."""
    states, empty = encode_prompts(prompts)
    return states, (encode_prompts([negative])[0][0] if negative else empty)
