"""Images from a run or a pipeline folder, through the run's model family (train/families: each owns its
sampler), decoded by the VAE the latents were made with. Used for the periodic sample grid during training,
by `eval` and by `latentmill sample`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from latentmill.errors import InputError
from latentmill.train.gridcaptions import GRID_TEXT_KEY, grid_captions  # noqa: F401 (read back here too)


def generate_from_manifest(
    unet,
    text_states,
    empty_state,
    manifest: dict,
    vae: str | None = None,
    size: tuple[int, int] | None = None,
    family: str | None = None,
    **options,
) -> np.ndarray:
    """The family's sampler (train/families) with what the latents' manifest records: their VAE (or
    `vae`), scaling and shift factors, and resolution (or `size`)."""
    from latentmill.curate.vae import load_vae
    from latentmill.train.families import family_of

    decoder = load_vae(vae or manifest["encode_config"]["vae"]).model.to(next(unet.parameters()).device)
    size = size or (manifest["resolution"], manifest["resolution"])
    return family_of(family).generate(
        unet,
        text_states,
        empty_state,
        decoder,
        manifest["scaling_factor"],
        manifest.get("shift_factor") or 0.0,
        size,
        **options,
    )


def save_grid(
    images: np.ndarray, path: str | Path, columns: int = 4, captions: list[dict] | None = None
) -> Path:
    """Tile images into one PNG; with `captions` (one {"prompt", "seed"} per image) each image's prompt
    and seed are written under it and kept in the PNG's text (GRID_TEXT_KEY) for the report."""
    import json

    from PIL import Image, PngImagePlugin

    n, h, w, _ = images.shape
    columns = min(columns, n)
    rows = (n + columns - 1) // columns
    band = _caption_height(captions, w)
    grid = Image.new("RGB", (columns * w, rows * (h + band)), "white")
    for i, image in enumerate(images):
        x, y = (i % columns) * w, (i // columns) * (h + band)
        grid.paste(Image.fromarray(image), (x, y))
        if captions:
            _draw_caption(grid, captions[i], (x, y + h), w)
    info = PngImagePlugin.PngInfo()
    if captions:
        info.add_text(GRID_TEXT_KEY, json.dumps(captions))
    from latentmill.curate.storage import atomic_path, location

    path = location(path)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG", pnginfo=info)
    return path


_LINE = 11  # px per caption line (PIL's default bitmap font)


def _caption_lines(caption: dict, width: int) -> list[str]:
    import textwrap

    text = f"{caption.get('prompt', '')} · seed {caption.get('seed')}"
    lines = textwrap.wrap(text, max(8, width // 6)) or [""]
    return lines[:3] if len(lines) <= 3 else lines[:2] + [lines[2][:-1] + "…"]


def _caption_height(captions: list[dict] | None, width: int) -> int:
    if not captions:
        return 0
    return 4 + _LINE * max(len(_caption_lines(c, width)) for c in captions)


def _draw_caption(grid, caption: dict, at: tuple[int, int], width: int) -> None:
    from PIL import ImageDraw, ImageFont

    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for k, line in enumerate(_caption_lines(caption, width)):
        draw.text((at[0] + 2, at[1] + 2 + k * _LINE), line, fill="black", font=font)


def sampler(
    source: str | Path,
    use_ema: bool = True,
    text_encoder: str | None = None,
    negative: str = "",
    method: str | None = None,
):
    """make(prompts, seed, steps, guidance, size) -> (N, H, W, 3) uint8 images, denoised by `method`
    (train/schedule.py: ddim, euler, euler-a, dpm++2m-karras, unipc; the flow families' euler; default: the
    family's, as its pipeline has it), from a run's last checkpoint
    (its text encoder, the latents' VAE) or from a diffusers pipeline folder (e.g. the base model whose
    class images DreamBooth preserves). `negative`: the caption guidance steers away from (default: the
    empty one). `text_encoder`: for a run trained on caption states stored in its shards, the encoder
    that made them (default: the one the latents' manifest names)."""

    if (Path(source) / "model_index.json").exists():
        import json

        from diffusers import DiffusionPipeline

        index = json.loads((Path(source) / "model_index.json").read_text())
        extra = {"safety_checker": None} if "safety_checker" in index else {}
        # its family's pipeline class (StableDiffusionPipeline, StableDiffusion3Pipeline, FluxPipeline)
        pipe = DiffusionPipeline.from_pretrained(source, local_files_only=True, **extra)
        pipe.set_progress_bar_config(disable=True)
        if type(pipe.scheduler).__name__.startswith("FlowMatch"):
            from latentmill.train.families.flowfamily import check_flow_sampler

            check_flow_sampler(method, type(pipe).__name__)
        elif method is not None:
            from latentmill.train.schedule import with_sampler

            pipe.scheduler = with_sampler(pipe.scheduler, method, type(pipe).__name__)

        def from_pipeline(prompts, seed, steps, guidance, size, seeds=None):
            width, height = size or (None, None)
            generator = torch.Generator().manual_seed(seed)
            if seeds is not None:  # one generator per image: diffusers draws each image's noise from its own
                generator = [torch.Generator().manual_seed(s) for s in seeds]
            images = pipe(
                list(prompts),
                negative_prompt=[negative] * len(prompts) if negative else None,
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width,
                height=height,
                generator=generator,
                output_type="np",
            ).images
            return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)

        return from_pipeline
    from latentmill.train.runs import load_run

    loaded = load_run(source, use_ema)
    config = loaded.config
    manifest = loaded.manifest()
    unet = loaded.unet()
    if loaded.text_file("token.json") or loaded.text_file("text_adapter.json"):
        from latentmill.train.textexport import prompt_encoder

        encode = prompt_encoder(loaded)  # the run's trained text encoder
    else:
        from latentmill.train.families import family_of

        encode = family_of(config.get("family")).prompt_encoder(source, config, manifest, text_encoder)

    empty = encode([negative])[0]

    def from_run(prompts, seed, steps, guidance, size, seeds=None):
        return generate_from_manifest(
            unet,
            encode(list(prompts)),
            empty,
            manifest,
            config.get("vae"),
            size,
            config.get("family"),  # runs from before families were recorded: the default (sd-unet)
            steps=steps,
            guidance=guidance,
            seed=seed,
            prediction=config["prediction"],
            seeds=seeds,
            config=config,
            sampler=method,
        )

    return from_run


def text_encoder_of(source, config: dict, manifest: dict, given: str | None):
    """The text encoder prompts are encoded with: the run's own (it encoded captions as it trained), else
    for a run trained on caption states stored in the shards the one given, or the one that stored them
    (the manifest names it); one whose fingerprint differs from the stored states' is refused."""
    from latentmill.curate.textencoder import load_text_encoder

    stored = manifest.get("text_encoder") or {}
    if config.get("text_encoder"):
        return load_text_encoder(given or config["text_encoder"])
    spec = given or stored.get("name")
    if not spec:
        raise InputError(
            f"{source} was trained on stored caption embeddings and its latents do not name the text encoder "
            f"that made them: give --text-encoder (the one `encode --text-encoder` used)."
        )
    encoder = load_text_encoder(spec)
    if stored.get("fingerprint") and encoder.fingerprint != stored["fingerprint"]:
        raise InputError(
            f"--text-encoder {spec}: not the text encoder that made the caption states {source} trained on "
            f"(its latents record {stored.get('name')}, fingerprint {stored['fingerprint'][:12]}); give that one."
        )
    return encoder


def sample_run(
    run: str | Path,
    prompts: list[str],
    output: str | Path,
    steps: int = 20,
    guidance: float = 5.0,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    use_ema: bool = True,
    text_encoder: str | None = None,
    negative: str = "",
    count: int = 1,
    seeds: list[int] | None = None,
    method: str | None = None,
) -> Path:
    """`count` images per prompt from a run (or a pipeline folder) as one grid PNG, a row per prompt, each
    image's prompt and seed under it. Image j of prompt i is drawn from seed `seeds[i] + j` (default: every
    prompt from `seed`): a prompt's row is the same whatever other prompts are beside it."""
    starts = list(seeds) if seeds else [seed] * len(prompts)
    if len(starts) != len(prompts):
        raise InputError(
            f"sample: {len(starts)} seed(s) for {len(prompts)} prompt(s): give one per --prompt."
        )
    jobs = [(prompt, start + j) for prompt, start in zip(prompts, starts, strict=True) for j in range(count)]
    make = sampler(run, use_ema, text_encoder, negative, method)
    images = make([p for p, _ in jobs], seed, steps, guidance, size, seeds=[s for _, s in jobs])
    captions = [{"prompt": p, "seed": s} for p, s in jobs]
    return save_grid(images, output, columns=count if len(prompts) > 1 else min(count, 4), captions=captions)
