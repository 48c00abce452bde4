"""`latentmill eval`: how good a model's images are, in numbers two runs (or two curated subsets) can be
compared by.

- `compare_sets(A, B)`: FID (the Fréchet distance of the two sets' features), KID, precision and recall.
- `evaluate_run(RUN_OR_PIPELINE, prompts, reference)`: images for the prompts (prompt i of the list, cycled
  to `count`, its starting noise drawn from seed `seed + i`, so an image does not depend on its batch), their CLIP
  score against their prompts, and FID/KID against the reference set; written to eval.json with the
  settings and the checkpoint's step.
The formulas are in filters/frechet.py, the feature spaces and image sets in filters/imagefeatures.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from latentmill.errors import InputError, warn
from latentmill.filters.clip import DEFAULT_SPEC as CLIP_DEFAULT  # score's model: MODEL:PRETRAINED


def _check_enough(count: int, dim: int, name: str, space: str) -> None:
    if count <= dim:
        raise InputError(
            f"{name}: {count} image(s), not more than the {dim} dimensions of --features {space}: their covariance "
            f"is singular, so FID would mean nothing. Use more images (FID is stable from thousands), a space with "
            f"fewer dimensions, or KID (--kid-only), which is unbiased at any size."
        )


def set_distances(features_a, stats_a, features_b, stats_b, space, names, kid_only: bool = False) -> dict:
    from latentmill.filters.frechet import frechet_distance, kernel_distance, precision_recall

    out: dict = {}
    if not kid_only:
        for stats, name in zip((stats_a, stats_b), names, strict=True):
            _check_enough(stats["count"], space.dim, name, space.spec)
        out["fid"] = frechet_distance(stats_a["mu"], stats_a["sigma"], stats_b["mu"], stats_b["sigma"])
    if features_a is not None and features_b is not None:
        out["kid"], out["kid_std"] = kernel_distance(features_a, features_b)
        out["precision"], out["recall"] = precision_recall(features_a, features_b)
    elif kid_only:
        raise InputError(
            f"--kid-only: {' or '.join(names)} is a statistics file; KID needs the images' features."
        )
    return out


def compare_sets(
    a: str, b: str, features: str = "clip:" + CLIP_DEFAULT, device: str = "cpu", kid_only: bool = False
) -> dict:
    """`latentmill eval fid A B`: {fid, kid, kid_std, precision, recall, features, count_a, count_b}."""
    from latentmill.filters.imagefeatures import feature_space, set_features

    space = feature_space(features, device)
    features_a, stats_a = set_features(str(a), space)
    features_b, stats_b = set_features(str(b), space)
    numbers = set_distances(features_a, stats_a, features_b, stats_b, space, (str(a), str(b)), kid_only)
    return numbers | {"features": features, "count_a": stats_a["count"], "count_b": stats_b["count"]}


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--prompts {path}: no such file (one prompt per line).")
    prompts = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"--prompts {path}: the file holds no prompt (one per line).")
    return prompts


def validation_captions(source: str) -> list[str]:
    """The captions of a run's held-out latents (`encode --validation-share`, beside its first latent
    folder): the prompts of `eval RUN` without --prompts."""
    from latentmill.curate.latentshards import iter_latent_shard, join, read_manifest
    from latentmill.curate.validationsplit import VALIDATION
    from latentmill.train.loader import expand_shards
    from latentmill.train.runs import load_run

    if (Path(source) / "model_index.json").exists():
        raise InputError(f"eval {source}: a pipeline folder has no held-out captions; give --prompts FILE.")
    config = load_run(source).config
    first = config["instance"] or (config["shards"] or [None])[0]
    folder = join(first, VALIDATION) if first else None
    if folder is None or not join(folder, "manifest.json").exists():
        raise InputError(
            f"eval {source}: give --prompts FILE; the run's latents have no validation split to take captions "
            f"from (`encode --validation-share`)."
        )
    manifest = read_manifest(folder)
    captions = [
        s["caption"] for shard in expand_shards(str(folder)) for s in iter_latent_shard(shard, manifest)
    ]
    if not captions:
        raise InputError(f"eval {source}: {folder} holds no samples; give --prompts FILE.")
    return captions


def evaluate_run(
    source: str,
    prompts: list[str],
    reference: str | None,
    count: int,
    clip_model: str = CLIP_DEFAULT,
    features: str | None = None,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 5.0,
    size: tuple[int, int] | None = None,
    device: str = "cpu",
    kid_only: bool = False,
    progress=None,
    batch_size: int = 8,
    text_encoder: str | None = None,
    negative: str = "",
    method: str | None = None,
) -> dict:
    """Generate `count` images of the prompts from a run or pipeline (denoised by `method`, the sampler); their CLIP score, and FID/KID against
    `reference` (a folder of images or image shards, or a .npz of its statistics) in `features` (default:
    CLIP space of `clip_model`)."""
    import torch
    from PIL import Image

    from latentmill.filters.clip import load_clip
    from latentmill.filters.frechet import clip_score, statistics
    from latentmill.filters.imagefeatures import feature_space, set_features
    from latentmill.train.sampling import sampler

    if not prompts:
        raise InputError("eval: no prompts.")
    if size and (size[0] % 8 or size[1] % 8):
        raise InputError(
            f"--width/--height {size[0]}x{size[1]}: the latents are 1/8 of the image: use multiples of 8."
        )
    features = features or f"clip:{clip_model}"
    space = feature_space(features, device) if reference else None
    reference_features, reference_stats = set_features(reference, space) if reference else (None, None)
    skipped = {}
    if reference and not kid_only:  # known before any image is made: FID needs more images than dimensions
        too_few = [
            (n, s)
            for n, s in ((str(reference), reference_stats["count"]), ("--count", count))
            if s <= space.dim
        ]
        if too_few:
            why = (
                f"FID needs more images than the {space.dim} dimensions of --features {space.spec}, and "
                + ", ".join(f"{n} has {s}" for n, s in too_few)
            )
            if reference_features is None:  # statistics alone: nothing else to compare with
                why += f"; {reference} is statistics, so no KID either"
            warn(f"eval: {why}; measuring what can be measured (more images for FID).")
            skipped["fid"] = why
            kid_only = True
    make = sampler(
        source, text_encoder=text_encoder, negative=negative, method=method
    )  # no checkpoint: refused here, first
    jobs = [prompts[i % len(prompts)] for i in range(count)]
    images = []
    for start in range(0, count, batch_size):  # batched, each image from its own seed
        chunk = jobs[start : start + batch_size]
        seeds = [seed + start + i for i in range(len(chunk))]
        images += [Image.fromarray(p) for p in make(chunk, seed, steps, guidance, size, seeds=seeds)]
        if progress:
            progress(len(chunk))
    name, _, pretrained = clip_model.partition(":")
    clip = load_clip(name, pretrained or None, device, option=f"--clip-model {name}:")
    with torch.inference_mode():
        image_embeddings = torch.cat([clip.embed_images(torch.stack([clip.preprocess(im)])) for im in images])
        text_embeddings = clip.embed_texts(jobs)
    result: dict = {"clip_score": clip_score(image_embeddings.numpy(), text_embeddings.numpy())}
    if reference and not (kid_only and reference_features is None):
        generated = space.features(images)
        mu, sigma = statistics(generated)
        stats = {"mu": mu, "sigma": sigma, "count": len(generated)}
        result |= set_distances(
            reference_features,
            reference_stats,
            generated,
            stats,
            space,
            (str(reference), "the generated images"),
            kid_only,
        )
    if skipped:  # what could not be measured: null, with the reason beside
        result |= {name: None for name in skipped} | {f"{name}_refused": why for name, why in skipped.items()}
    result |= {
        "count": count,
        "settings": {
            "source": str(source),
            "prompts": len(prompts),
            "reference": str(reference) if reference else None,
            "clip_model": clip_model,
            "features": features if reference else None,
            "seed": seed,
            "sampler_steps": steps,
            "sampler": method or "default",
            "guidance": guidance,
            "size": list(size) if size else None,
        },
        "step": _step_of(source),
    }
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in result.items()}


def _step_of(source: str) -> int | None:
    """The checkpoint step of a run (None for a pipeline folder)."""
    if (Path(source) / "model_index.json").exists():
        return None
    from latentmill.train.runs import load_run

    return int(load_run(source).state["step"])


class TrainingEval:
    """`train --eval-every N --eval-prompts FILE [--eval-reference IMAGES]`: at each evaluation, one image
    per prompt from the EMA weights at the run's seed (the same noise every time, so the curve shows the
    weights changing), their CLIP score, and KID (and FID, with more images than feature dimensions) against
    the reference. The CLIP model and the reference's features are loaded once."""

    def __init__(self, config):
        from latentmill.filters.clip import load_clip
        from latentmill.filters.imagefeatures import feature_space, set_features

        if not config.eval_every:
            raise InputError("--eval-prompts needs --eval-every N (how often to evaluate).")
        if not config.text_encoder:
            raise InputError(
                "--eval-prompts: generating needs --text-encoder (the shards' stored caption embeddings cannot "
                "encode new prompts)."
            )
        self.prompts = read_prompts(config.eval_prompts)
        kind, _, rest = config.eval_features.partition(":")
        if kind != "clip":
            raise InputError(
                f"--eval-features {config.eval_features}: inside training, use clip:MODEL[:PRETRAINED]."
            )
        name, _, pretrained = (rest or CLIP_DEFAULT).partition(":")
        self.clip = load_clip(name, pretrained or None)
        self.space = feature_space(config.eval_features) if config.eval_reference else None
        self.reference = set_features(config.eval_reference, self.space) if config.eval_reference else None
        if self.reference and self.reference[0] is None and len(self.prompts) <= self.space.dim:
            raise InputError(
                f"--eval-reference {config.eval_reference}: statistics only (no features for KID), and "
                f"{len(self.prompts)} prompt(s) are too few for FID in {self.space.dim} dimensions: give the "
                f"reference images, or more than {self.space.dim} prompts."
            )

    def __call__(self, unet, encode_prompts, manifest: dict, config) -> dict:
        from dataclasses import asdict

        import torch
        from PIL import Image

        from latentmill.filters.frechet import clip_score, statistics
        from latentmill.train.sampling import generate_from_manifest

        states, empty = encode_prompts(self.prompts)
        pixels = generate_from_manifest(
            unet, states, empty, manifest, config.vae, steps=config.sample_steps, seed=config.seed,
            prediction=config.prediction, family=config.family, config=asdict(config),
        )  # fmt: skip
        images = [Image.fromarray(p) for p in pixels]
        with torch.inference_mode():
            embedded = self.clip.embed_images(torch.stack([self.clip.preprocess(im) for im in images]))
            texts = self.clip.embed_texts(self.prompts)
        numbers = {"clip_score": clip_score(embedded.numpy(), texts.numpy())}
        if self.reference:
            features = self.space.features(images)
            mu, sigma = statistics(features)
            stats = {"mu": mu, "sigma": sigma, "count": len(features)}
            enough = min(stats["count"], self.reference[1]["count"]) > self.space.dim
            numbers |= set_distances(
                *self.reference,
                features,
                stats,
                self.space,
                (config.eval_reference, "the generated images"),
                not enough,
            )
            numbers.pop("kid_std", None)
        return numbers


def training_eval(config):
    """The in-training evaluator of a config, or None without --eval-prompts."""
    return TrainingEval(config) if config.eval_prompts else None
