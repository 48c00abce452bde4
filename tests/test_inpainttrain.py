"""Inpainting training (`train --inpainting`) from latents encoded with --mask-variants: the widened
U-Net's step-0 equivalence, one variant per sample and step, exact resume, sample grids, the export in
StableDiffusionInpaintPipeline, LoRA on an inpainting U-Net, and the refusals."""

import json

import numpy as np
import pytest
import torch

from latentmill.curate.encode import EncodeConfig, encode
from latentmill.errors import InputError
from latentmill.train.loop import train
from latentmill.train.models import build_unet
from tests.conftest import SMALL_ENCODE, quick_train_config, small_image_shards, tiny_clip_text_pipeline

ENCODE = SMALL_ENCODE


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Latents with 2 mask variants and without, a tiny CLIP text pipeline, and "pretrained" tiny U-Nets:
    a 4-channel one and a 9-channel inpainting one (diffusers U-Net folders)."""
    root = tmp_path_factory.mktemp("inpaint-train")
    small_image_shards(root / "images")
    encode(root / "images", root / "latents", EncodeConfig(mask_variants=2, seed=3, **ENCODE))
    encode(root / "images", root / "plain", EncodeConfig(**ENCODE))
    tiny_clip_text_pipeline(root / "text")
    build_unet("tiny", 4, 32, 8, seed=1).save_pretrained(root / "base4")
    build_unet("tiny", 4, 32, 8, seed=2, inpainting=True).save_pretrained(root / "base9")
    return root


def config(root, run, **overrides):
    return quick_train_config(root, run, **({"model": str(root / "base4"), "inpainting": True} | overrides))


def test_a_widened_unet_predicts_what_its_base_does_at_step_0_for_any_mask(data):
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(data / "base4").eval()
    widened = build_unet(str(data / "base4"), 4, 32, 8, inpainting=True).eval()
    assert widened.config.in_channels == 9 and widened.config.out_channels == 4
    assert torch.equal(widened.conv_in.weight[:, :4], base.conv_in.weight)
    assert not widened.conv_in.weight[:, 4:].any()
    g = torch.Generator().manual_seed(0)
    noisy, text = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 77, 32, generator=g)
    with torch.no_grad():
        expected = base(noisy, 500, encoder_hidden_states=text).sample
        for mask in (
            torch.zeros(3, 1, 8, 8),
            torch.ones(3, 1, 8, 8),
            (torch.rand(3, 1, 8, 8, generator=g) > 0.5),
        ):
            masked = torch.randn(3, 4, 8, 8, generator=g) * 3
            got = widened(torch.cat([noisy, mask.float(), masked], 1), 500, encoder_hidden_states=text).sample
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    kept = build_unet(str(data / "base9"), 4, 32, 8, inpainting=True)  # an inpainting model as it is
    stored = UNet2DConditionModel.from_pretrained(data / "base9").state_dict()
    assert all(torch.equal(kept.state_dict()[k], v) for k, v in stored.items())


def test_each_batch_carries_one_stored_variant_per_sample_drawn_per_step(data):
    from latentmill.curate.latentshards import iter_latent_shard, read_manifest
    from latentmill.train.loader import LatentLoader, expand_shards

    manifest = read_manifest(data / "latents")
    stored = {
        s["key"]: s
        for shard in expand_shards(str(data / "latents"))
        for s in iter_latent_shard(shard, manifest)
    }
    loader = LatentLoader(expand_shards(str(data / "latents")), batch_size=4, mode="resampled", flip=False)
    picked = []
    for _, batch in zip(range(12), loader, strict=False):
        for i, key in enumerate(batch["keys"]):
            variants = stored[key]
            k = [
                j
                for j in range(2)
                if np.array_equal(
                    batch["inpaint_mask"][i].numpy(), variants["inpaint_mask"][j].astype(np.float32)
                )
                and np.array_equal(
                    batch["masked_latent"][i].numpy(), variants["masked_latent"][j].astype(np.float32)
                )
            ]
            assert k, key
            picked.append(k[0])
    assert set(picked) == {0, 1}


@pytest.mark.slow
def test_inpainting_training_resumes_exactly_draws_grids_and_exports_an_inpaint_pipeline(data, tmp_path):
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image
    from safetensors.torch import load_file

    from latentmill.train.export import export_run

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(config(data, straight, steps=4, checkpoint_every=4, sample_every=4, sample_steps=2))
    train(config(data, resumed, steps=2, checkpoint_every=2))
    train(config(data, resumed, steps=4, checkpoint_every=2, resume=True))
    a, b = (load_file(r / "checkpoints" / "step-0000004" / "unet.safetensors") for r in (straight, resumed))
    assert a["conv_in.weight"].shape[1] == 9 and a["conv_in.weight"][:, 4:].abs().sum() > 0  # it learned
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [
        [json.loads(x)["loss"] for x in (r / "log.jsonl").read_text().splitlines()]
        for r in (straight, resumed)
    ]
    assert logs[0] == logs[1]
    grid = Image.open(straight / "samples" / "step-0000004.png")
    assert grid.size[1] == 2 * 64  # masked inputs above the results
    top = np.asarray(grid)[:64].astype(int)
    assert ((top[..., 0] - top[..., 1]) > 60).any()  # the part to fill in, tinted red

    from latentmill.train.sampling import grid_captions, sample_run

    plain = sample_run(straight, ["a red circle"], tmp_path / "plain.png", steps=2)
    # text-to-image from an inpainting run (everything masked): one 64 px image, its prompt under it
    assert Image.open(plain).size[0] == 64 and grid_captions(plain) == [{"prompt": "a red circle", "seed": 0}]
    export_run(straight, tmp_path / "pipeline")
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipe.unet.config.in_channels == 9
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16))
    out = pipe(
        "a red circle",
        image=image,
        mask_image=mask,
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert out.shape == (64, 64, 3) and np.isfinite(out).all()


@pytest.mark.slow
def test_lora_trains_on_an_inpainting_unet_and_loads_in_the_inpaint_pipeline(data, tmp_path):
    from PIL import Image
    from safetensors.torch import load_file

    run = tmp_path / "lora"
    train(config(data, run, model=str(data / "base9"), lora_rank=2, steps=2, checkpoint_every=2))
    adapter = load_file(run / "checkpoints" / "step-0000002" / "lora.safetensors")
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in adapter.items())
    from latentmill.train.runs import load_run

    assert load_run(run).unet().config.in_channels == 9
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from latentmill.curate.vae import load_vae
    from latentmill.train.export import export_run
    from latentmill.train.schedule import sampling_scheduler

    pipe = StableDiffusionInpaintPipeline(
        vae=load_vae("tiny").model,
        text_encoder=CLIPTextModel.from_pretrained(data / "text" / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(data / "text" / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(data / "base9"),
        scheduler=sampling_scheduler("epsilon"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16))

    def fill():
        return pipe(
            "a red circle", image=image, mask_image=mask, height=64, width=64, num_inference_steps=2,
            generator=torch.Generator().manual_seed(0), output_type="np",
        ).images[0]  # fmt: skip

    before = fill()
    pipe.load_lora_weights(str(export_run(run, tmp_path / "lora-file")))
    assert np.abs(fill() - before).max() > 1e-5  # the adapter loads into the inpainting pipeline and acts
    with pytest.raises(InputError, match="LoRA leaves its new mask channels at zero"):
        train(config(data, tmp_path / "x", lora_rank=2, steps=1))


def test_inpainting_refuses_latents_without_variants_and_a_9_channel_model_needs_it(data, tmp_path):
    with pytest.raises(
        InputError, match=r"--inpainting: .*plain hold\(s\) no inpainting masks; encode with "
    ):
        train(config(data, tmp_path / "a", shards=str(data / "plain"), steps=1))
    with pytest.raises(
        InputError, match=r"is an inpainting U-Net \(9 input channels\): train it with --inpainting"
    ):
        train(config(data, tmp_path / "b", model=str(data / "base9"), inpainting=False, steps=1))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
