"""A whole Stable Diffusion model in one `.safetensors` file, in the original (CompVis/ldm) layout that
AUTOMATIC1111, ComfyUI and `diffusers`' `from_single_file` load: the U-Net under `model.diffusion_model.`,
the VAE under `first_stage_model.`, the CLIP text model under `cond_stage_model.transformer.` (SDXL's two
under `conditioner.embedders.0.transformer.` and, in open_clip's layout, `conditioner.embedders.1.model.`).

The names are made from the diffusers model configs (block counts, layers per block, which blocks have
attention), the inverse of diffusers' own `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`.
"""

from __future__ import annotations

import torch

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
SDXL_TEXT, SDXL_TEXT_2 = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
RESNET = {  # diffusers ResnetBlock2D -> ldm ResBlock
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # the VAE's ldm resnets keep the other names
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_names(config: dict) -> dict[str, str]:
    """diffusers module prefix -> ldm module prefix, for a UNet2DConditionModel config."""
    per = config["layers_per_block"]
    per = per if isinstance(per, int) else per[0]
    down, up = config["down_block_types"], config["up_block_types"]
    names = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
        "add_embedding.linear_1": "label_emb.0.0",  # SDXL's micro-conditioning embedding
        "add_embedding.linear_2": "label_emb.0.2",
    }
    for b, kind in enumerate(down):
        for layer in range(per):
            index = 1 + b * (per + 1) + layer
            names[f"down_blocks.{b}.resnets.{layer}"] = f"input_blocks.{index}.0"
            if "CrossAttn" in kind:
                names[f"down_blocks.{b}.attentions.{layer}"] = f"input_blocks.{index}.1"
        if b < len(down) - 1:
            names[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{(b + 1) * (per + 1)}.0.op"
    for b, kind in enumerate(up):
        attention = "CrossAttn" in kind
        for layer in range(per + 1):
            index = b * (per + 1) + layer
            names[f"up_blocks.{b}.resnets.{layer}"] = f"output_blocks.{index}.0"
            if attention:
                names[f"up_blocks.{b}.attentions.{layer}"] = f"output_blocks.{index}.1"
        if b < len(up) - 1:
            last = b * (per + 1) + per
            names[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{last}.{2 if attention else 1}.conv"
    return names


def vae_names(config: dict) -> dict[str, str]:
    """diffusers module prefix -> ldm module prefix, for an AutoencoderKL config."""
    blocks, per = len(config["block_out_channels"]), config["layers_per_block"]
    names = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for side in ("encoder", "decoder"):
        names[f"{side}.mid_block.resnets.0"] = f"{side}.mid.block_1"
        names[f"{side}.mid_block.attentions.0"] = f"{side}.mid.attn_1"
        names[f"{side}.mid_block.resnets.1"] = f"{side}.mid.block_2"
    for i in range(blocks):
        for j in range(per):
            names[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        if i < blocks - 1:
            names[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        for j in range(per + 1):  # the decoder's up blocks are numbered from the bottom in ldm
            names[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{blocks - 1 - i}.block.{j}"
        if i < blocks - 1:
            names[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{blocks - 1 - i}.upsample.conv"
    return names


def _rename(key: str, names: dict[str, str], inner: dict[str, str]) -> str:
    """The ldm name of a diffusers parameter: its longest known module prefix replaced, then the names
    inside that module (a resnet's norm1 -> in_layers.0)."""
    for prefix in sorted(names, key=len, reverse=True):
        if key == prefix or key.startswith(prefix + "."):
            rest = key[len(prefix) + 1 :]
            for old in sorted(inner, key=len, reverse=True):
                if rest.startswith(old + "."):
                    rest = inner[old] + rest[len(old) :]
                    break
            return f"{names[prefix]}.{rest}" if rest else names[prefix]
    return key


def to_single_file(unet, vae, text_encoder, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """The models' weights under their ldm names, ready for `safetensors.torch.save_file`. With
    `text_encoder_2` (SDXL's CLIP-G), the text encoders go where SDXL's file keeps them: CLIP-L under
    `conditioner.embedders.0.transformer.`, CLIP-G in open_clip's layout under `conditioner.embedders.1.model.`."""
    out: dict[str, torch.Tensor] = {}
    unet_map = unet_names(dict(unet.config))
    for key, tensor in unet.state_dict().items():
        inner = RESNET if ".resnets." in key else {}
        out[UNET + _rename(key, unet_map, inner)] = tensor
    vae_map = vae_names(dict(vae.config))
    for key, tensor in vae.state_dict().items():
        inner = VAE_RESNET if ".resnets." in key else VAE_ATTENTION if ".attentions." in key else {}
        name = _rename(key, vae_map, inner)
        if ".attn_1." in name and name.rsplit(".", 1)[-1] == "weight" and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # ldm's attention projections are 1x1 convolutions
        out[VAE + name] = tensor
    text = SDXL_TEXT if text_encoder_2 is not None else TEXT
    for key, tensor in text_encoder.state_dict().items():
        # the original layout has transformers' older names (text_model.*), which newer versions flatten
        out[text + (key if key.startswith("text_model.") else "text_model." + key)] = tensor
    if text_encoder_2 is not None:
        out |= {SDXL_TEXT_2 + key: tensor for key, tensor in open_clip_names(text_encoder_2).items()}
    return {k: v.detach().contiguous() for k, v in out.items()}


def open_clip_names(model) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection in open_clip's layout (SDXL's CLIP-G as its file holds it):
    q, k, v as one `in_proj`, `text_projection` as open_clip applies it (x @ P, so the Linear's weight
    transposed); the inverse of diffusers' `convert_open_clip_checkpoint`."""
    state = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    out = {
        "token_embedding.weight": state["embeddings.token_embedding.weight"],
        "positional_embedding": state["embeddings.position_embedding.weight"],
        "ln_final.weight": state["final_layer_norm.weight"],
        "ln_final.bias": state["final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].T,
    }
    for i in range(model.config.num_hidden_layers):
        hf, oc = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{hf}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            )
            for ours, theirs in (
                ("self_attn.out_proj", "attn.out_proj"),
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ):
                out[f"{oc}{theirs}.{kind}"] = state[f"{hf}{ours}.{kind}"]
    return out
