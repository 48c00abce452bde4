"""open_clip models for scoring: load by name and pretrained tag (or a local checkpoint file), with the
QuickGELU correction for OpenAI weights, and embed images and captions (L2-normalised)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from latentmill.curate.textencoder import model_name, register_model_configs
from latentmill.devices import PRECISIONS, resolve_device_precision, torch_dtype
from latentmill.errors import InputError, warn

# the CLIP model `score` uses by default, and `eval`'s (the LAION heads were fitted on its embeddings)
DEFAULT_MODEL, DEFAULT_PRETRAINED = "ViT-L-14-quickgelu", "openai"
DEFAULT_SPEC = f"{DEFAULT_MODEL}:{DEFAULT_PRETRAINED}"


@dataclass
class ClipModel:
    model: object
    preprocess: object  # the model's own eval transform (PIL image -> tensor)
    tokenizer: object
    name: str
    pretrained: str | None
    embed_dim: int
    image_size: int
    device: str
    dtype: object

    def embed_images(self, pixels):
        """Normalised image embeddings (float32, on CPU) of a preprocessed batch."""
        import torch

        with (
            torch.inference_mode(),
            torch.autocast(self.device.split(":")[0], dtype=self.dtype, enabled=self.dtype != torch.float32),
        ):
            features = self.model.encode_image(pixels.to(self.device))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    def embed_texts(self, captions: list[str]):
        import torch

        tokens = self.tokenizer(captions).to(self.device)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.split(":")[0], dtype=self.dtype, enabled=self.dtype != torch.float32),
        ):
            features = self.model.encode_text(tokens)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


def resolve_model_name(name: str, pretrained: str | None) -> str:
    """OpenAI weights were trained with QuickGELU: plain `ViT-L-14` + `openai` would use nn.GELU and shift
    aesthetic scores by up to a point. Switch to the `-quickgelu` variant where open_clip has one."""
    import open_clip

    if pretrained == "openai" and not name.endswith("-quickgelu"):
        fixed = f"{name}-quickgelu"
        if fixed in open_clip.list_models():
            warn(f"{name} with OpenAI weights needs QuickGELU: using {fixed} (plain {name} shifts scores).")
            return fixed
        raise InputError(
            f"--clip-model {name} with --pretrained openai: OpenAI weights need QuickGELU and open_clip "
            f"has no {fixed}. Use a -quickgelu model name."
        )
    return name


def missing_weights(name: str, pretrained: str) -> str | None:
    """What is missing for open_clip's `name` with the pretrained tag `pretrained` to load without a
    download (None: its file is in the local Hugging Face cache, or open_clip's own cache), with the
    command that fetches it."""
    import open_clip
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    from latentmill.curate.textencoder import register_model_configs

    register_model_configs()
    resolved = resolve_model_name(name, pretrained)
    config = open_clip.get_pretrained_cfg(resolved, pretrained)
    if not config:
        return f"open_clip {resolved}: no pretrained weights tagged {pretrained!r}"
    repo = (config.get("hf_hub") or "").strip("/")
    if repo:
        from huggingface_hub import try_to_load_from_cache

        if any(
            isinstance(try_to_load_from_cache(repo, f), str) for f in (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)
        ):
            return None
        return (
            f"open_clip {resolved}:{pretrained} is not in the local Hugging Face cache: "
            f"`hf download {repo} {HF_WEIGHTS_NAME}` (or give the checkpoint file as pretrained)"
        )
    url = config.get("url") or ""
    if url and (Path.home() / ".cache" / "clip" / Path(url).name).exists():
        return None
    return f"open_clip {resolved}:{pretrained}: its weights are not here: download {url} (or give the file)"


def hub_reachable(url: str = "", timeout: float = 3.0) -> bool:
    """Whether the model hub (HF_ENDPOINT, or the host of `url`) answers a TCP connection within `timeout`
    seconds: offline, a missing model is refused in seconds instead of after the hub client's retries."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    parsed = urlparse(url or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def load_clip(
    name: str, pretrained: str | None, device: str = "cpu", precision: str = "fp32", option: str = ""
) -> ClipModel:
    """An open_clip model ready to embed. `pretrained`: a tag, a local checkpoint file, or None/'none'
    for random weights (tests, speed runs). `option`: how the command that asked spells the weights, for
    messages (default `--pretrained FILE`; eval's is `--clip-model NAME:FILE`)."""
    import open_clip
    import torch

    register_model_configs()
    name = model_name(name)
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    device, precision = resolve_device_precision(device, precision)
    pretrained = None if pretrained in (None, "", "none") else pretrained
    if name not in open_clip.list_models():
        raise InputError(
            f"--clip-model {name!r} is not an open_clip model; e.g. ViT-L-14-quickgelu, ViT-B-32, "
            f"tiny, tiny-rn (all: `python -c 'import open_clip; print(open_clip.list_models())'`)."
        )
    name = resolve_model_name(name, pretrained)
    if (
        pretrained
        and not Path(pretrained).exists()
        and pretrained not in open_clip.list_pretrained_tags_by_model(name)
    ):
        raise InputError(
            f"{option or '--pretrained '}{pretrained!r}: neither a file nor a pretrained tag of {name} "
            f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'})."
        )
    missing = missing_weights(name, pretrained) if pretrained and not Path(pretrained).exists() else None
    url = (open_clip.get_pretrained_cfg(name, pretrained) or {}).get("url", "") if missing else ""
    if missing and not hub_reachable(url):  # local cache first; offline, no minute of hub retries
        raise InputError(
            f"{missing}. The model hub cannot be reached from here, so nothing was downloaded; fetch the weights "
            f"where it can be, or pass the checkpoint file: {option or '--pretrained '}/path/to/open_clip_pytorch_model.bin."
        )
    torch.manual_seed(0)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device
        )
    except (RuntimeError, OSError) as err:
        raise InputError(
            f"CLIP weights {name}/{pretrained} could not be loaded ({str(err).splitlines()[0]}). Offline, "
            f"download the checkpoint elsewhere and pass its path: {option or '--pretrained '}/path/to/open_clip_pytorch_model.bin."
        ) from None
    model.eval().requires_grad_(False)
    dtype = torch_dtype(precision)
    if device == "cpu" and dtype == torch.float16:
        raise InputError("--precision fp16 needs a GPU; use bf16 or fp32 on CPU.")
    embed_dim = (
        int(model.text_projection.shape[1])
        if getattr(model, "text_projection", None) is not None
        else int(model.visual.output_dim)
    )
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    return ClipModel(
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(name),
        name=name,
        pretrained=pretrained,
        embed_dim=embed_dim,
        image_size=image_size,
        device=device,
        dtype=dtype,
    )
