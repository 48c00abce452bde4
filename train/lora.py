"""LoRA adapters on the U-Net through peft: which layers get one, the adapter's tensors, merging it into the
base weights, and the two file formats other tools load.

For each target Linear layer W, LoRA trains A (rank x in) and B (out x rank) and uses
W' = W + (alpha / rank) * B @ A. B starts at zero, so step 0 is exactly the base model. Our checkpoints
hold peft's names (`<module>.lora_A.weight`, `<module>.lora_B.weight`) and the scale lives in adapter.json.

Export formats:
- diffusers: `pytorch_lora_weights.safetensors` with `unet.<module>.lora_A/B.weight`, what
  `StableDiffusionPipeline.load_lora_weights` reads. alpha / rank is folded into B, so the file means the
  same to every diffusers version (a file without alpha metadata is read with alpha = rank).
- kohya (sd-scripts, also read by ComfyUI and A1111): per module `lora_unet_<module path, dots as
  underscores>.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha` (a scalar); the scale is
  alpha / rank, and the network's settings go in the `ss_*` metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentmill.errors import InputError

# the image stream's projections, and the text stream's of the joint (MMDiT) attention of SD3 and Flux
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
LORA_TARGETS = ("attention", "attention+ff", "all-linear")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


def target_modules(unet, targets: str) -> list[str]:
    """The full names of the U-Net's Linear layers that get an adapter."""
    if targets not in LORA_TARGETS:
        raise InputError(f"--lora-targets {targets!r}: use one of {', '.join(LORA_TARGETS)}.")
    suffixes = {"attention": ATTENTION, "attention+ff": ATTENTION + FEED_FORWARD}.get(targets)
    names = [
        name
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear)
        and (suffixes is None or any(name == s or name.endswith("." + s) for s in suffixes))
    ]
    if not names:
        raise InputError(f"--lora-targets {targets}: this U-Net has no such layers.")
    return names


def add_lora(unet, rank: int, alpha: float, targets: str, seed: int) -> list[str]:
    """Freeze `unet` and give its target layers LoRA adapters (A drawn from a generator seeded by `seed`,
    B zero); return the adapted module names."""
    from peft import LoraConfig

    names = target_modules(unet, targets)
    modules = dict(unet.named_modules())
    smallest = min(names, key=lambda n: min(modules[n].in_features, modules[n].out_features))
    limit = min(modules[smallest].in_features, modules[smallest].out_features)
    if rank > limit:
        raise InputError(
            f"--lora-rank {rank} is above the smallest dimension of the layers it adapts ({limit}, "
            f"{smallest}): a rank above it adds parameters but no capacity. Use --lora-rank {limit} or less "
            f"(or other --lora-targets)."
        )
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # peft draws A from the global generator: seed it, then restore
        torch.manual_seed(seed)
        unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=names)
        )
    return names


def adapter_names(unet) -> list[str]:
    """The trainable adapter parameters' names as checkpoints store them (peft's, without the adapter name)."""
    return [name.replace(".default.", ".") for name, p in unet.named_parameters() if p.requires_grad]


def base_state(unet) -> dict[str, torch.Tensor]:
    """The frozen base weights of an adapted U-Net under their plain names (as in the base model's file)."""
    return {
        name.replace(".base_layer.", "."): tensor
        for name, tensor in unet.state_dict().items()
        if ".lora_" not in name
    }


def modules_of(lora: dict[str, torch.Tensor]) -> list[str]:
    return sorted({key.rsplit(".lora_A.", 1)[0] for key in lora if ".lora_A." in key})


def merge_lora(base: dict, lora: dict, alpha: float, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Base weights with the adapter baked in: W + scale * (alpha / rank) * B @ A for every adapted layer."""
    merged = dict(base)
    for module in modules_of(lora):
        a, b = lora[f"{module}.lora_A.weight"], lora[f"{module}.lora_B.weight"]
        key = f"{module}.weight"
        if key not in base or tuple(base[key].shape) != (b.shape[0], a.shape[1]):
            raise InputError(
                f"the adapter's layer {module} has no {b.shape[0]}x{a.shape[1]} weight in the base U-Net: "
                f"the adapter was trained on another architecture."
            )
        delta = (b.double() @ a.double()) * (scale * alpha / a.shape[0])
        merged[key] = (base[key].double() + delta).to(base[key].dtype).contiguous()
    return merged


def to_diffusers(lora: dict, alpha: float, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """peft names -> diffusers' LoRA file names (`unet.<module>.lora_A.weight`; the text encoder's under
    `text_encoder.`), alpha / rank folded into B."""
    out = {}
    for module in modules_of(lora):
        a, b = lora[f"{module}.lora_A.weight"], lora[f"{module}.lora_B.weight"]
        out[f"{prefix}.{module}.lora_A.weight"] = a.float().contiguous()
        out[f"{prefix}.{module}.lora_B.weight"] = (b.float() * (alpha / a.shape[0])).contiguous()
    return out


def kohya_name(module: str, prefix: str = "lora_unet_") -> str:
    """`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0` ->
    `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0` (the text encoder's:
    `lora_te_text_model_encoder_layers_0_self_attn_q_proj`)."""
    return prefix + module.replace(".", "_")


def to_kohya(lora: dict, alpha: float, prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
    """peft names -> kohya's: lora_down (A), lora_up (B) and alpha per module."""
    out = {}
    for module in modules_of(lora):
        name = kohya_name(module, prefix)
        out[f"{name}.lora_down.weight"] = lora[f"{module}.lora_A.weight"].float().contiguous()
        out[f"{name}.lora_up.weight"] = lora[f"{module}.lora_B.weight"].float().contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def kohya_metadata(rank: int, alpha: float, base: str) -> dict[str, str]:
    """The `ss_*` keys sd-scripts writes and A1111/ComfyUI show: network module, dim, alpha."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_sd_model_name": Path(base).name,
        "ss_training_comment": "trained with latentmill",
    }
