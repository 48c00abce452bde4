"""LoRA in kohya's SDXL and Flux layouts (train/kohyalayouts.py), read back by diffusers' own loaders
(`lora_state_dict`, what `load_lora_weights` calls): every module's update B @ A survives the round trip, at
the real models' layouts (SDXL's three-level U-Net, Flux's 3072-wide blocks; only the adapters are made, at
rank 2, not the models)."""

import pytest
import torch
from safetensors.torch import save_file

from latentmill.errors import InputError
from latentmill.train.lora import to_diffusers

ALPHA = 3.0


def _adapters(shapes: dict[str, tuple[int, int]], rank=2, seed=0) -> dict[str, torch.Tensor]:
    """peft-named adapters: module -> (in, out) features."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for module, (width, out) in shapes.items():
        lora[f"{module}.lora_A.weight"] = torch.randn(rank, width, generator=g)
        lora[f"{module}.lora_B.weight"] = torch.randn(out, rank, generator=g)
    return lora


def _updates(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    """module -> B @ A of a diffusers-named LoRA state dict (alpha folded in, as both sides write it)."""
    modules = {k[len(prefix) : -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")}
    return {m: state[f"{prefix}{m}.lora_B.weight"] @ state[f"{prefix}{m}.lora_A.weight"] for m in modules}


def _same_updates(ours: dict, read: dict) -> None:
    assert set(read) >= set(ours), set(ours) - set(read)
    for module, delta in ours.items():
        torch.testing.assert_close(read[module], delta, rtol=1e-5, atol=1e-6, msg=module)
    for module in set(read) - set(ours):  # a fused layer's parts without an adapter read back as zero
        assert not read[module].any(), module


def test_flux_adapters_in_kohyas_layout_read_back_by_diffusers_as_the_same_updates(tmp_path):
    from diffusers import FluxPipeline

    from latentmill.train.kohyalayouts import flux_kohya

    d = 3072  # FLUX.1's width: diffusers' reader of fused single-block layers assumes it
    shapes = {
        f"transformer_blocks.0.{m}": (d, d)
        for m in (
            "attn.to_q",
            "attn.to_k",
            "attn.to_v",
            "attn.to_out.0",
            "attn.add_q_proj",
            "attn.add_k_proj",
            "attn.add_v_proj",
            "attn.to_add_out",
        )  # fmt: skip
    }
    shapes |= {
        "transformer_blocks.0.ff.net.0.proj": (d, 4 * d),
        "transformer_blocks.0.norm1.linear": (d, 6 * d),
    }
    shapes |= {f"single_transformer_blocks.1.attn.{m}": (d, d) for m in ("to_q", "to_k", "to_v")}
    shapes |= {"single_transformer_blocks.1.proj_out": (5 * d, d), "x_embedder": (64, d)}
    shapes |= {"norm_out.linear": (d, 2 * d), "time_text_embed.guidance_embedder.linear_1": (256, d)}
    lora = _adapters(shapes)
    kohya = flux_kohya(lora, ALPHA)
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (6, d)
    assert kohya["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (7 * d, 8)  # q, k, v, mlp
    assert "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight" in kohya
    save_file(kohya, str(tmp_path / "flux_kohya.safetensors"))
    read = FluxPipeline.lora_state_dict(str(tmp_path / "flux_kohya.safetensors"))
    read = read[0] if isinstance(read, tuple) else read
    # diffusers' reader gives the blocks' modules under transformer. and the top-level ones (embedders, the
    # final layer) without it, which its load_lora_weights then skips: a limit of that reader, not of the file
    assert all(k.startswith("transformer.") for k in read if "blocks" in k)
    read = {k.removeprefix("transformer."): v for k, v in read.items()}
    _same_updates(_updates(to_diffusers(lora, ALPHA, "transformer"), "transformer."), _updates(read, ""))


def test_a_flux_module_kohya_has_no_name_for_is_refused_by_name():
    from latentmill.train.kohyalayouts import flux_kohya

    with pytest.raises(InputError, match=r"transformer_blocks\.0\.attn\.norm_q.*--format diffusers"):
        flux_kohya(_adapters({"transformer_blocks.0.attn.norm_q": (8, 8)}), ALPHA)


SDXL_LIKE = dict(  # SDXL's layout (three levels, two layers each, attention in the lower two), narrow
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    attention_head_dim=(2, 4, 4),
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 2),
    use_linear_projection=True,
    cross_attention_dim=32,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
)


def test_sdxl_adapters_in_kohyas_ldm_names_read_back_by_diffusers_as_the_same_updates(tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from latentmill.train.kohyalayouts import sdxl_kohya
    from latentmill.train.lora import target_modules

    unet = UNet2DConditionModel(**SDXL_LIKE)
    modules = dict(unet.named_modules())
    names = target_modules(unet, "attention+ff")
    lora = _adapters({n: (modules[n].in_features, modules[n].out_features) for n in names})
    kohya = sdxl_kohya(lora, ALPHA, dict(unet.config))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert "lora_unet_output_blocks_0_1_transformer_blocks_1_ff_net_2.lora_up.weight" in kohya
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k.alpha" in kohya
    save_file(kohya, str(tmp_path / "sdxl_kohya.safetensors"))
    read, alphas = StableDiffusionXLPipeline.lora_state_dict(
        str(tmp_path / "sdxl_kohya.safetensors"), unet_config=unet.config
    )
    ours = _updates(to_diffusers(lora, ALPHA, "unet"), "unet.")
    assert len(ours) == len(names)
    _same_updates(ours, _old_format_updates(read, alphas))


PROCESSOR = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}


def _old_format_updates(state: dict, alphas: dict) -> dict[str, torch.Tensor]:
    """module -> alpha / rank x up @ down of the attention-processor layout diffusers' kohya reader gives
    (`...attn1.processor.to_q_lora.down.weight`, `...ff.net.2.lora.down.weight`; alphas beside)."""
    updates = {}
    for key, down in state.items():
        if not key.endswith(".down.weight"):
            continue
        stem = key.removeprefix("unet.").removesuffix(".down.weight")
        if ".processor." in stem:
            block, lora = stem.split(".processor.")
            module = f"{block}.{PROCESSOR[lora]}"
        else:
            module = stem.removesuffix(".lora")
        up = state[key.replace(".down.weight", ".up.weight")]
        alpha = alphas.get(key + ".alpha", alphas.get(f"unet.{module.removesuffix('.0')}.alpha"))
        updates[module] = up @ down * (alpha / down.shape[0])
    return updates
