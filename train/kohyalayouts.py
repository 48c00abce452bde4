"""LoRA in kohya's layouts beyond SD 1.x/2.x: SDXL's (ldm module names) and Flux's (Black Forest Labs'
module names, with q, k, v fused), the files sd-scripts writes and ComfyUI, Forge and diffusers'
`load_lora_weights` read.

- SDXL: sd-scripts trains its own (ldm-named) U-Net, so a module is `lora_unet_<ldm path>`, e.g.
  `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` for diffusers'
  `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` (train/singlefile.py `unet_names`).
- Flux: `lora_unet_double_blocks_<i>_img_attn_qkv` is one Linear where diffusers has to_q, to_k and to_v.
  Separate rank-r adapters are one rank-3r adapter of the fused layer, exactly: lora_down stacks the three
  A's, lora_up is block-diagonal in the three B's (the "sparse" layout diffusers' converter splits back).
  A single block's `linear1` fuses q, k, v and the MLP's input projection (out: d, d, d, 4d); a part with
  no adapter gets zero blocks.

The scale alpha / rank is folded into lora_up and each module's alpha is its rank, so every reader,
whatever it does with alpha, computes the same update.
"""

from __future__ import annotations

import re

import torch

from latentmill.errors import InputError
from latentmill.train.lora import modules_of

# diffusers' Flux module -> (BFL module, part of the fused layer, parts); parts > 1 means fused
FLUX_DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0, 3),
    "attn.to_k": ("img_attn_qkv", 1, 3),
    "attn.to_v": ("img_attn_qkv", 2, 3),
    "attn.to_out.0": ("img_attn_proj", 0, 1),
    "attn.add_q_proj": ("txt_attn_qkv", 0, 3),
    "attn.add_k_proj": ("txt_attn_qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn_qkv", 2, 3),
    "attn.to_add_out": ("txt_attn_proj", 0, 1),
    "ff.net.0.proj": ("img_mlp_0", 0, 1),
    "ff.net.2": ("img_mlp_2", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp_0", 0, 1),
    "ff_context.net.2": ("txt_mlp_2", 0, 1),
    "norm1.linear": ("img_mod_lin", 0, 1),
    "norm1_context.linear": ("txt_mod_lin", 0, 1),
}
FLUX_SINGLE = {
    "attn.to_q": ("linear1", 0, 4),
    "attn.to_k": ("linear1", 1, 4),
    "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4),
    "proj_out": ("linear2", 0, 1),
    "norm.linear": ("modulation_lin", 0, 1),
}
FLUX_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "proj_out": "final_layer_linear",
    "norm_out.linear": "final_layer_adaLN_modulation_1",
}
MLP_RATIO = 4  # Flux's single blocks: proj_mlp's width is 4 x the attention's


def _scaled(lora: dict, module: str, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = lora[f"{module}.lora_A.weight"].float(), lora[f"{module}.lora_B.weight"].float()
    return a, b * (alpha / a.shape[0])


def _write(out: dict, name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    out[f"{name}.lora_down.weight"] = down.contiguous()
    out[f"{name}.lora_up.weight"] = up.contiguous()
    out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))  # the scale is folded into lora_up


def sdxl_kohya(lora: dict, alpha: float, unet_config: dict) -> dict[str, torch.Tensor]:
    """peft-named U-Net adapters -> kohya's SDXL keys (ldm module names)."""
    from latentmill.train.singlefile import unet_names

    names = sorted(unet_names(unet_config).items(), key=lambda item: -len(item[0]))
    out = {}
    for module in modules_of(lora):
        prefix = next((d for d, _ in names if module == d or module.startswith(d + ".")), None)
        if prefix is None:
            raise InputError(
                f"LoRA module {module}: kohya's SDXL layout has no name for it; export with --format diffusers."
            )
        ldm = dict(names)[prefix] + module[len(prefix) :]
        _write(out, "lora_unet_" + ldm.replace(".", "_"), *_scaled(lora, module, alpha))
    return out


def _flux_place(module: str) -> tuple[str, int, int]:
    """diffusers' Flux module -> (kohya module, part, parts)."""
    if match := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module):
        block, rest, table, kind = match[1], match[2], FLUX_DOUBLE, "double_blocks"
    elif match := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module):
        block, rest, table, kind = match[1], match[2], FLUX_SINGLE, "single_blocks"
    else:
        if module not in FLUX_TOP:
            raise InputError(
                f"LoRA module {module}: kohya's Flux layout has no name for it; export with --format diffusers."
            )
        return f"lora_unet_{FLUX_TOP[module]}", 0, 1
    if rest not in table:
        raise InputError(
            f"LoRA module {module}: kohya's Flux layout has no name for it; export with --format diffusers."
        )
    name, part, parts = table[rest]
    return f"lora_unet_{kind}_{block}_{name}", part, parts


def flux_kohya(lora: dict, alpha: float) -> dict[str, torch.Tensor]:
    """peft-named Flux transformer adapters -> kohya's (and ComfyUI's) Flux keys, q/k/v fused."""
    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    parts_of: dict[str, int] = {}
    for module in modules_of(lora):
        name, part, parts = _flux_place(module)
        down, up = _scaled(lora, module, alpha)
        if name.endswith("final_layer_adaLN_modulation_1"):
            up = torch.cat(up.chunk(2, dim=0)[::-1])  # BFL's (shift, scale) is diffusers' (scale, shift)
        fused.setdefault(name, {})[part] = (down, up)
        parts_of[name] = parts
    out = {}
    for name, given in fused.items():
        parts = parts_of[name]
        if parts == 1:
            _write(out, name, *given[0])
            continue
        first = min(given)
        rank, width = given[first][0].shape
        inner = given[first][1].shape[0] // (MLP_RATIO if first == 3 else 1)
        if any(down.shape[0] != rank for down, _ in given.values()):
            raise InputError(f"LoRA {name}: its parts have different ranks; export with --format diffusers.")
        outs = [inner] * parts if parts == 3 else [inner] * 3 + [MLP_RATIO * inner]
        down = torch.zeros(parts * rank, width)
        up = torch.zeros(sum(outs), parts * rank)
        row = 0
        for part in range(parts):
            if part in given:
                down[part * rank : (part + 1) * rank] = given[part][0]
                up[row : row + outs[part], part * rank : (part + 1) * rank] = given[part][1]
            row += outs[part]
        _write(out, name, down, up)
    return out
