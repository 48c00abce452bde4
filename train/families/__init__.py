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

from latentmill.errors import InputError
from latentmill.train.families.sdunet import SdUnet

FAMILIES = {family.name: family for family in (SdUnet(),)}
DEFAULT = "sd-unet"


def family_of(name: str | None):
    """The family `name` (None: the default, what runs made before families were recorded trained)."""
    name = name or DEFAULT
    if name not in FAMILIES:
        raise InputError(f"family {name!r}: not one latentmill trains ({', '.join(FAMILIES)}).")
    return FAMILIES[name]
