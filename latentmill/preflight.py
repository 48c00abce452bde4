"""Pre-flight: before `latentmill run` starts any stage, every file, folder and model its recipe names is
looked for (local paths exist; model hub ids and open_clip weights are in the local cache), and every
problem is reported at once, each with what to give or the exact command that downloads it. A recipe
that would fail at its fifth stage fails before its first."""

from __future__ import annotations

from pathlib import Path

from latentmill.curate.storage import location
from latentmill.errors import InputError
from latentmill.stages import PLACEHOLDERS, Stage, section


def preflight(recipe: dict, stages: list[Stage], urls: str | None = None) -> None:
    """Raise one InputError listing every file or model the recipe's `stages` need and cannot find."""
    names = {stage.name for stage in stages if stage.applies(recipe)}
    problems: list[str] = []
    source = (recipe.get("urls") or {}).get("source", "file")
    if names & {"prefilter", "download"} and source != "sample-server":
        path = urls or (recipe.get("urls") or {}).get("path")
        what = "image folder" if source == "folder" else "URL table"
        if not path:
            problems.append(f"urls: this recipe reads a {what}: give --urls, or set urls.path")
        elif not location(path).exists():
            problems.append(f"urls: the {what} {path} does not exist")
    if "score" in names:
        score = section(recipe, "score")
        problems += _clip(score.clip_model, score.pretrained)
        for key in ("aesthetic_head", "unsafe_head", "watermark_head"):
            from latentmill.filters.heads import where_from

            path = getattr(score, key)
            problems += [f"{p}. {where_from(Path(path).name)}" for p in _file(f"score.{key}", path)]
        for head in score.heads:
            problems += _file("score.heads", head)
    if "encode" in names:
        encode = section(recipe, "encode")
        problems += _vae("encode.vae", encode.vae)
        problems += _text_encoder("encode.text_encoder", encode.text_encoder)
    if "train" in names:
        train = section(recipe, "train", **PLACEHOLDERS["train"])
        problems += _unet("train.model", train.model)
        problems += _text_encoder("train.text_encoder", train.text_encoder)
        problems += _vae("train.vae", train.vae)
    if "export" in names:
        problems += _vae("export.vae", section(recipe, "export").vae)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise InputError(f"the recipe names {len(problems)} thing(s) that are not here:\n{listed}")


def _file(key: str, path: str | None) -> list[str]:
    return [f"{key}: {path} does not exist"] if path and not location(path).exists() else []


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith((".safetensors", ".pt", ".pth", ".bin", ".zip"))


def _hub(key: str, spec: str, files: tuple[str, ...]) -> list[str]:
    """A model hub id: fine when one of `files` is in the local Hugging Face cache."""
    if _looks_like_path(spec) or spec.count("/") != 1:
        return [f"{key}: {spec} does not exist (a local folder, or a model hub id such as org/name)"]
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(spec, name), str) for name in files):
        return []
    return [
        f"{key}: {spec} is not in the local Hugging Face cache: `hf download {spec}` (or give a local folder)"
    ]


def _vae(key: str, spec: str | None) -> list[str]:
    from latentmill.curate.vae import ARCHITECTURES

    if not spec or spec in ARCHITECTURES or Path(spec).exists():
        return []
    return _hub(key, spec, ("config.json", "vae/config.json"))


def _unet(key: str, spec: str) -> list[str]:
    """The denoiser: a fresh config, a local folder, or a model id whose U-Net or transformer is cached."""
    from latentmill.train.families import fresh_models

    if spec in fresh_models() or Path(spec).exists():
        return []
    return _hub(key, spec, ("unet/config.json", "transformer/config.json", "config.json"))


def _text_encoder(key: str, spec: str | None) -> list[str]:
    from latentmill.curate.textencoder import TINY_CLIP
    from latentmill.train.pipelinetext import TINY

    if not spec or spec == TINY_CLIP or spec in TINY or Path(spec).exists():
        return []
    if spec.startswith("openclip:"):
        name, _, pretrained = spec[len("openclip:") :].partition(":")
        return [f"{key}: {p}" for p in _clip(name, pretrained or None)]
    return _hub(key, spec, ("text_encoder/config.json", "config.json"))


def _clip(name: str, pretrained: str | None) -> list[str]:
    """open_clip weights: none (random), a local file, or a pretrained tag whose file is in the cache."""
    if pretrained in (None, "", "none") or Path(pretrained).exists():
        return []
    if _looks_like_path(pretrained):
        return [f"score.pretrained: {pretrained} does not exist"]
    from latentmill.curate.textencoder import model_name
    from latentmill.filters.clip import missing_weights

    problem = missing_weights(model_name(name), pretrained)
    return [problem] if problem else []
