"""The model families the trainer trains, one module each, behind one small interface the loop, the
objective's callers, validation and sampling reach the model through (no family branches anywhere else):

    conditioning(config, manifest, folder, device, precision, text) -> (encode_text(batch, generator),
        text_width, encode_prompts(prompts)): the captions as the denoiser takes them, with caption dropout
    build(config, manifest, text_width) -> the denoiser (a named tiny config, or a pretrained folder or
        model id from the local cache: never a download); from_config(saved) -> the one a checkpoint holds
    objective(config, device) -> the training objective: loss(...), error(...) at given noise and noise
        levels, fixed_levels(...) for the validation loss, step_loss(...) (DreamBooth's prior term)
    generate(model, text_states, empty_state, vae, scaling_factor, shift_factor, size, ...) -> images
    patch_size: latent pixels per token side (buckets are multiples of the VAE factor x this)

A run records its family (`train.family`, in state.json and the run's lineage); `sample`, `export` and
`eval` take it from there.
"""

from __future__ import annotations

import json
from pathlib import Path

from latentmill.errors import InputError
from latentmill.train.families.flux import Flux
from latentmill.train.families.sd3 import Sd3
from latentmill.train.families.sdunet import SdUnet
from latentmill.train.families.sdxl import Sdxl

FAMILIES = {family.name: family for family in (SdUnet(), Sdxl(), Sd3(), Flux())}
DEFAULT = "sd-unet"
# a pipeline folder's class (model_index.json) -> its family
BY_PIPELINE = {
    "StableDiffusionPipeline": "sd-unet",
    "StableDiffusionInpaintPipeline": "sd-unet",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
# else its denoiser's class (model_index.json, or a denoiser folder's config.json)
BY_CLASS = {
    "UNet2DConditionModel": "sd-unet",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
}


def family_of(name: str | None):
    """The family `name` (None: the default, what runs made before families were recorded trained)."""
    name = name or DEFAULT
    if name not in FAMILIES:
        raise InputError(f"family {name!r}: not one latentmill trains ({', '.join(FAMILIES)}).")
    return FAMILIES[name]


def fresh_models() -> set[str]:
    """Every --model name that is a new denoiser with random weights (not something to fine-tune)."""
    from latentmill.train.models import UNET_CONFIGS

    return set(UNET_CONFIGS) | {name for f in FAMILIES.values() for name in getattr(f, "tiny_configs", {})}


def infer_family(model: str | None) -> str:
    """The family of --model: a tiny config's, or a local pipeline (or denoiser) folder's by the class its
    model_index.json (or config.json) names; anything else (a model id, a U-Net config name) is the default."""
    for family in FAMILIES.values():
        if model in getattr(family, "tiny_configs", {}):
            return family.name
    path = Path(str(model or ""))
    index = path / "model_index.json"
    if not path.exists() and str(model or "").count("/") == 1:  # a model id: its files in the local cache
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(model), "model_index.json")
        index = Path(cached) if isinstance(cached, str) else index
    for record, key in ((index, "transformer"), (index, "unet"), (path / "config.json", None)):
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if key and data.get("_class_name") in BY_PIPELINE:
            return BY_PIPELINE[data["_class_name"]]
        name = (data.get(key) or [None, None])[1] if key else data.get("_class_name")
        if name in BY_CLASS:
            return BY_CLASS[name]
    return DEFAULT
