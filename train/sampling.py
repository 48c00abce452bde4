"""Images from a run or a pipeline folder, through the run's model family (train/families: each owns its
sampler), decoded by the VAE the latents were made with. Used for the periodic sample grid during training,
by `eval` and by `latentmill sample`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from latentmill.errors import InputError


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


def save_grid(images: np.ndarray, path: str | Path, columns: int = 4) -> Path:
    """Tile images into one PNG."""
    from PIL import Image

    n, h, w, _ = images.shape
    columns = min(columns, n)
    rows = (n + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(Image.fromarray(image), ((i % columns) * w, (i // columns) * h))
    from latentmill.curate.storage import atomic_path, location

    path = location(path)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path


def sampler(source: str | Path, use_ema: bool = True, text_encoder: str | None = None, negative: str = ""):
    """make(prompts, seed, steps, guidance, size) -> (N, H, W, 3) uint8 images, from a run's last checkpoint
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
) -> Path:
    """One image per prompt from a run (or a pipeline folder), as one grid PNG."""
    make = sampler(run, use_ema, text_encoder, negative)
    return save_grid(make(prompts, seed, steps, guidance, size), output)


SAMPLE_INDEX = ".latentmill-samples.json"


def sample_to_folder(
    source: str | Path,
    prompts: list[str],
    folder: str | Path,
    count: int = 1,
    steps: int = 20,
    guidance: float = 5.0,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    batch_size: int = 4,
    progress=None,
    text_encoder: str | None = None,
    negative: str = "",
) -> tuple[int, int]:
    """`count` images of each prompt as folder/NNNNNN.png with the prompt in NNNNNN.txt, what
    `latentmill images pack` reads (DreamBooth's class images); returns (images in the folder for these
    prompts and settings, images made by this call). Batch b is drawn with seed + b and files are written
    atomically; an index beside them (.latentmill-samples.json) records what made each file, so a stopped
    call, run again, keeps what it made and makes the rest, and another prompt or setting makes anew.
    Files this command did not write are never taken as its own, nor overwritten."""
    import hashlib
    import json

    from PIL import Image

    from latentmill.curate.lineage import model_fingerprint
    from latentmill.curate.records import read_optional
    from latentmill.curate.storage import atomic_path, write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / SAMPLE_INDEX
    fix = f"delete {index_path} and the images beside it, or give another --to-folder"
    index = read_optional(index_path, fix=fix) or {}
    jobs = [prompt for prompt in prompts for _ in range(count)]
    settings = [model_fingerprint(str(source)), steps, guidance, seed, list(size or []), batch_size]
    settings += [negative] if negative else []  # (so folders made before --negative-prompt keep their keys)
    make, made = None, 0
    for batch, start in enumerate(range(0, len(jobs), batch_size)):
        chunk = jobs[start : start + batch_size]
        names = [f"{start + i:06d}" for i in range(len(chunk))]
        keys = [
            hashlib.sha256(json.dumps([*settings, batch, i, prompt]).encode()).hexdigest()[:16]
            for i, prompt in enumerate(chunk)
        ]
        foreign = [n for n in names if (folder / f"{n}.png").exists() and n not in index]
        if foreign:
            raise InputError(
                f"{folder}: {foreign[0]}.png was not written by `latentmill sample`; give an empty folder "
                f"(or one this command filled) to --to-folder."
            )
        done = all(
            index.get(n) == k and (folder / f"{n}.png").exists() for n, k in zip(names, keys, strict=True)
        )
        if not done:
            make = make or sampler(source, text_encoder=text_encoder, negative=negative)
            for name, key, prompt, image in zip(
                names, keys, chunk, make(chunk, seed + batch, steps, guidance, size), strict=True
            ):
                (folder / f"{name}.txt").write_text(prompt + "\n")
                with atomic_path(folder / f"{name}.png") as tmp:
                    Image.fromarray(image).save(tmp, format="PNG")
                index[name] = key
                made += 1
            write_json(index_path, index)
        if progress:
            progress(len(chunk))
    return len(jobs), made
