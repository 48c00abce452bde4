"""The rules between `latentmill train`'s settings that no one setting's type and bounds express: which
options go together, which exclude each other, and the places that must be folders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from latentmill.errors import InputError
from latentmill.train.models import UNET_CONFIGS

if TYPE_CHECKING:
    from latentmill.train.config import TrainConfig


def check_rules(config: TrainConfig) -> None:
    """The rules between training settings (each setting alone is checked by the schema)."""
    from latentmill.train.shardcache import parse_size

    parse_size(config.cache_limit)
    if config.cache_dir:
        _check_folder(config.cache_dir, config.name("cache_dir"))
    if config.launcher == "ray" and config.ray_address not in (None, "local"):
        from latentmill.curate.raycluster import checked_address

        checked_address(config.ray_address, "--ray-address", config.ray_timeout)
    if config.repeats and config.mix:
        raise InputError(
            "train: give --repeats or --mix, not both (repeats weigh folders by size x repeats)."
        )
    if (config.shuffle_tags or config.tag_dropout) and not config.text_encoder:
        raise InputError(
            "train: --shuffle-tags and --tag-dropout change caption text, which needs --text-encoder (captions "
            "encoded as they train); latents encoded with --text-encoder hold fixed caption embeddings."
        )
    if not config.model:
        raise InputError(
            f"train: give --model: {', '.join(UNET_CONFIGS)}, tiny-sd3, tiny-flux (a new denoiser of that "
            f"architecture, random weights: `tiny` for a first look on a CPU), or a pretrained diffusers "
            f"pipeline, U-Net or transformer folder or model id (fine-tuning)."
        )
    if config.instance and config.shards:
        raise InputError(
            f"{config.name('instance')} and SHARDS both given: give the subject's latents once, "
            f"as SHARDS or as --instance."
        )
    if not config.sources():
        raise InputError(
            "no latents to train on: give a latent folder (SHARDS), or --instance for DreamBooth."
        )
    if config.instance and not config.class_data:
        raise InputError(
            f"{config.name('instance')} is DreamBooth's subject and needs {config.name('class_data')} "
            f"(the class images' latents); to fine-tune on the folder alone, give it as SHARDS."
        )
    if config.instance and config.class_data and _same_place(config.instance, config.class_data):
        raise InputError(
            f"{config.name('class_data')} {config.class_data} is the {config.name('instance')} folder: prior "
            f"preservation needs latents of other images of the class (make them with `latentmill "
            f"sample --to-folder`, then pack and encode them)."
        )
    # one weight per folder is checked where shard files are grouped into folders (train/data.py)
    if config.mix is not None and (any(w < 0 for w in config.mix) or sum(config.mix) <= 0):
        raise InputError(f"{config.name('mix')} {config.mix}: weights are >= 0 and not all 0.")
    if config.lora_rank == 0 and config.lora_alpha is not None:
        raise InputError(
            f"{config.name('lora_alpha')} is set but LoRA is off: give {config.name('lora_rank')} too."
        )
    from latentmill.train.families import fresh_models

    if config.lora_rank and config.model in fresh_models() and not config.init_from:
        raise InputError(
            f"{config.name('lora_rank')} {config.lora_rank}: LoRA adapts a trained model, and --model "
            f"{config.model} is a fresh one. Give --model PIPELINE_FOLDER (e.g. Stable Diffusion 1.5) or "
            f"--init-from RUN."
        )
    from latentmill.train.modes import check_modes

    check_modes(config)


def _check_folder(path: str, name: str) -> None:
    """A local folder that is (or can be made) a folder: not a file, nor inside one."""
    from latentmill.curate.storage import is_remote

    if is_remote(path):
        raise InputError(
            f"{name} {path}: the shard cache is a local folder (the shards it holds come from the store)."
        )
    for place in (Path(path), *Path(path).parents):
        if place.exists() and not place.is_dir():
            raise InputError(
                f"{name} {path}: {place} is a file, not a folder; give a folder for the shard cache."
            )
        if place.exists():
            return


def _same_place(a: str, b: str) -> bool:
    """Two folders given as paths or URLs name the same place (links and trailing slashes aside)."""
    from pathlib import Path

    from latentmill.curate.storage import is_remote

    if is_remote(a) or is_remote(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()
