"""Textual inversion, text-encoder LoRA and pivotal tuning from latent shards: only the token's vectors (and
the adapters) train, every other weight stays bit-identical, resume is exact, and the exported files load
through diffusers (load_textual_inversion, load_lora_weights with diffusers' and kohya's keys)."""

import json

import numpy as np
import pytest
import torch

from latentmill.curate.encode import EncodeConfig, encode
from latentmill.errors import InputError
from latentmill.train.config import TrainConfig
from latentmill.train.loop import train
from latentmill.train.models import build_unet
from tests.conftest import SMALL_ENCODE, quick_train_config, small_image_shards, tiny_clip_text_pipeline

ENCODE = SMALL_ENCODE
TOKEN = "<my-cat>"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("textual")
    small_image_shards(root / "images")
    encode(root / "images", root / "latents", EncodeConfig(**ENCODE))
    tiny_clip_text_pipeline(root / "text")
    build_unet("tiny", 4, 32, 8, seed=1).save_pretrained(root / "unet")
    return root


def config(root, run, **overrides):
    ti = dict(model=str(root / "unet"), textual_inversion=TOKEN, init_word="cat", learning_rate=5e-2)
    ti["ema_decay"] = 0.0  # the EMA is the last step's weights: exports show what trained
    return quick_train_config(root, run, **(ti | overrides))


def base_pipeline(root):
    """A StableDiffusionPipeline of the base models, without the token."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from latentmill.curate.vae import load_vae
    from latentmill.train.schedule import sampling_scheduler

    pipe = StableDiffusionPipeline(
        vae=load_vae("tiny").model,
        text_encoder=CLIPTextModel.from_pretrained(root / "text" / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(root / "text" / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(root / "unet"),
        scheduler=sampling_scheduler("epsilon"),  # as the exports have it
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt=f"a photo of a {TOKEN}"):
    return pipe(
        prompt,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]


def test_captions_take_the_token_in_place_of_the_placeholder_or_from_templates():
    from latentmill.train.ticaptions import OBJECT_TEMPLATES, STYLE_TEMPLATES, ti_captions

    g = torch.Generator().manual_seed(0)
    placed = ti_captions(
        ["a cat on a mat", "two dogs"],
        TrainConfig(output="r", textual_inversion="<t>", placeholder="cat", vectors=2),
        g,
    )
    assert placed == ["a <t> <t>_1 on a mat", "<t> <t>_1 two dogs"]
    styled = ti_captions(
        ["x"] * 40, TrainConfig(output="r", textual_inversion="<s>", ti_templates="style"), g
    )
    assert {c.replace("<s>", "{}") for c in styled} <= set(STYLE_TEMPLATES) and len(set(styled)) > 5
    default = ti_captions(["x"] * 8, TrainConfig(output="r", textual_inversion="<o>"), g)
    assert {c.replace("<o>", "{}") for c in default} <= set(OBJECT_TEMPLATES)


def test_textual_inversion_trains_only_the_token_and_both_files_load_in_diffusers(data, tmp_path):
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from latentmill.train.export import export_run

    run = tmp_path / "ti"
    train(config(data, run, steps=3, checkpoint_every=3, vectors=2))
    folder = run / "checkpoints" / "step-0000003"
    names = {p.name for p in folder.iterdir()}
    assert {"embeddings.safetensors", "token.json", "frozen_unet.json"} <= names
    assert not names & {"unet.safetensors", "ema.safetensors", "lora.safetensors"}
    assert {k.split(".")[0] for k in load_file(folder / "optimizer.safetensors")} == {
        "0"
    }  # one tensor trains
    token = json.loads((folder / "token.json").read_text())
    learned = load_file(folder / "embeddings.safetensors")[TOKEN]
    base_text = CLIPTextModel.from_pretrained(data / "text" / "text_encoder")
    table = base_text.get_input_embeddings().weight
    init = table[token_ids(data, "cat")[:2]]  # the init word's first two tokens
    assert learned.shape == (2, 32) and not torch.equal(learned, init)  # it trained

    export_run(run, tmp_path / "pipeline", format="pipeline")
    from diffusers import StableDiffusionPipeline

    baked = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    new_ids = baked.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    assert new_ids == token["ids"]
    after = baked.text_encoder.state_dict()
    for key, value in base_text.state_dict().items():
        if key.endswith("token_embedding.weight"):
            kept = [i for i in range(len(value)) if i not in new_ids]
            assert torch.equal(after[key][kept], value[kept])  # every other row bit-identical
            assert torch.equal(after[key][new_ids], learned)
        else:
            assert torch.equal(after[key], value), key
    base_unet = base_pipeline(data).unet.state_dict()
    assert all(torch.equal(baked.unet.state_dict()[k], v) for k, v in base_unet.items())

    files = export_run(run, tmp_path / "embedding")  # auto: the embedding files
    assert files.name == "learned_embeds.safetensors"
    assert set(load_file(files)) == {TOKEN}
    a1111 = tmp_path / "embedding" / "my-cat.safetensors"
    assert set(load_file(a1111)) == {"emb_params"}
    baked.set_progress_bar_config(disable=True)
    expected = generate(baked)
    outputs = []
    for path, token_arg in ((files, None), (a1111, TOKEN)):
        pipe = base_pipeline(data)
        pipe.load_textual_inversion(str(path), token=token_arg)
        outputs.append(generate(pipe))
        np.testing.assert_allclose(outputs[-1], expected, atol=1e-5)
    untrained = base_pipeline(data)
    untrained.load_textual_inversion({TOKEN: init.detach().clone()})
    assert np.abs(generate(untrained) - outputs[0]).max() > 1e-4  # the learned token changes the output


def token_ids(root, text):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(root / "text" / "tokenizer").encode(text, add_special_tokens=False)


@pytest.mark.slow
def test_pivotal_tuning_resumes_exactly_and_its_lora_loads_with_diffusers_and_kohya_keys(data, tmp_path):
    from safetensors.torch import load_file

    from latentmill.train.export import export_run

    pivotal = dict(
        lora_rank=2, lora_text_encoder=True, text_encoder_lr=1e-2, placeholder="picture", vectors=1
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(config(data, straight, steps=4, checkpoint_every=4, **pivotal))
    train(config(data, resumed, steps=2, checkpoint_every=2, **pivotal))
    train(config(data, resumed, steps=4, checkpoint_every=2, resume=True, **pivotal))
    for name in ("lora.safetensors", "text_lora.safetensors", "embeddings.safetensors"):
        a, b = (load_file(r / "checkpoints" / "step-0000004" / name) for r in (straight, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    logs = [
        [json.loads(x)["loss"] for x in (r / "log.jsonl").read_text().splitlines()]
        for r in (straight, resumed)
    ]
    assert logs[0] == logs[1]
    groups = json.loads((straight / "checkpoints" / "step-0000004" / "optimizer.json").read_text())[
        "param_groups"
    ]
    assert [g["base_lr"] for g in groups] == [5e-2, 1e-2]  # the text side at its own rate
    text_lora = load_file(straight / "checkpoints" / "step-0000004" / "text_lora.safetensors")
    assert any(".self_attn.q_proj.lora_B." in k and v.abs().sum() > 0 for k, v in text_lora.items())

    export_run(straight, tmp_path / "baked", format="pipeline")
    from diffusers import StableDiffusionPipeline

    baked = StableDiffusionPipeline.from_pretrained(tmp_path / "baked")
    baked.set_progress_bar_config(disable=True)
    expected = generate(baked)
    from latentmill.train.merge import merge_lora_run

    merge_lora_run(straight, tmp_path / "merged")  # the token and text adapters come along with the U-Net
    export_run(tmp_path / "merged", tmp_path / "merged-pipeline", format="pipeline")
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "merged-pipeline")
    merged.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(generate(merged), expected, atol=1e-5)
    lora_file = export_run(straight, tmp_path / "diffusers", format="diffusers")
    keys = load_file(lora_file)
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A") for k in keys)
    assert any(k.startswith("unet.") for k in keys)
    kohya_file = export_run(straight, tmp_path / "kohya" / "pivotal.safetensors", format="kohya")
    assert any(
        k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down")
        for k in load_file(kohya_file)
    )
    for folder, path in ((tmp_path / "diffusers", lora_file), (tmp_path / "kohya", kohya_file)):
        pipe = base_pipeline(data)
        before = generate(pipe)
        pipe.load_lora_weights(str(path))
        pipe.load_textual_inversion(str(folder / "learned_embeds.safetensors"))
        got = generate(pipe)
        np.testing.assert_allclose(got, expected, atol=2e-4)
        assert np.abs(got - before).max() > 1e-4


def test_bad_textual_inversion_settings_exit_2_with_a_message(data, tmp_path, run_cli):
    with pytest.raises(InputError, match=r"'a' is already in the tokenizer's vocabulary"):
        train(config(data, tmp_path / "a", textual_inversion="a", steps=1))
    with pytest.raises(InputError, match=r"--vectors"):
        config(data, tmp_path / "b", vectors=0).validate()
    for vectors in (100000, 80, 38):  # beside a 77-token context, captions keep room for their words
        with pytest.raises(
            InputError, match=rf"--vectors {vectors}: the text encoder reads 77 tokens.*at most 37"
        ):
            train(config(data, tmp_path / "b", vectors=vectors, steps=1))
    with pytest.raises(InputError, match=r"needs --text-encoder PIPELINE_FOLDER"):
        config(data, tmp_path / "c", text_encoder=None).validate()
    with pytest.raises(InputError, match=r"--lora-text-encoder adds LoRA adapters .*give --lora-rank"):
        config(
            data, tmp_path / "d", textual_inversion=None, init_word=None, lora_text_encoder=True
        ).validate()
    with pytest.raises(InputError, match=r"give --init-word WORD"):
        config(data, tmp_path / "e", init_word=None).validate()
    result = run_cli(
        "train",
        str(data / "latents"),
        "-o",
        str(tmp_path / "f"),
        "--model",
        str(data / "unet"),
        "--text-encoder",
        str(data / "text"),
        "--textual-inversion",
        TOKEN,
        "--init-word",
        "cat",
        "--vectors",
        "0",
    )
    assert result.exit_code == 2 and "--vectors" in result.output
    assert not any((tmp_path / n).exists() for n in "abcdef")


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, overrides, made",
    [
        (
            "textual-inversion-sd15",
            ["train.textual_inversion=<sks>", "train.init_word=cat", "train.vectors=2"],
            "learned_embeds.safetensors",
        ),
        (
            "inpaint-sd15",
            ["urls.source=folder", "pack.caption=a picture", "encode.mask_variants=1"],
            "model_index.json",
        ),
    ],
)
def test_the_textual_inversion_and_inpainting_recipes_run_end_to_end_on_tiny_models(
    data, tmp_path, run_cli, recipe, overrides, made
):
    from tests.test_finetune import _picture_folder

    folder = _picture_folder(tmp_path / "pictures", count=6)
    tiny = [
        "score.clip_model=tiny-rn",
        "score.pretrained=none",
        "score.workers=0",
        "score.batch_size=8",
        "score.device=cpu",
        "select.min_side=64",
        "encode.resolution=64",
        "encode.step=32",
        "encode.vae=tiny",
        "encode.device=cpu",
        f"train.model={data / 'unet'}",
        f"train.text_encoder={data / 'text'}",
        "train.steps=2",
        "train.batch_size=2",
        "train.warmup_steps=1",
        "train.checkpoint_every=2",
        "train.sample_every=0",
        "train.device=cpu",
    ]
    sets = [arg for item in tiny + overrides for arg in ("--set", item)]
    result = run_cli("run", recipe, "--urls", folder, "-w", tmp_path / "work", *sets)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "work" / "export" / made).exists()


def test_the_report_lists_a_learned_tokens_nearest_words(data, tmp_path):
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from latentmill.report import build_report
    from latentmill.train.textexport import nearest_words
    from tests.conftest import report_section

    run = tmp_path / "work" / "runs" / "ti"
    train(config(data, run, steps=2, checkpoint_every=2, vectors=2))
    learned = load_file(run / "checkpoints" / "step-0000002" / "embeddings_ema.safetensors")[TOKEN]
    words = nearest_words(str(data / "text"), learned, count=3)
    table = CLIPTextModel.from_pretrained(data / "text" / "text_encoder").get_input_embeddings().weight
    vocab = {i: w for w, i in json.loads((data / "text" / "tokenizer" / "vocab.json").read_text()).items()}
    for vector, found in zip(learned, words, strict=True):  # by hand: cosine against every vocabulary row
        cosine = torch.nn.functional.cosine_similarity(vector[None], table[sorted(vocab)], dim=1)
        best = sorted(vocab)[int(cosine.argmax())]
        assert found[0] == (vocab[best].replace("</w>", ""), round(float(cosine.max()), 3))
        assert [c for _, c in found] == sorted((c for _, c in found), reverse=True)
    import shutil

    shutil.copytree(data / "images", tmp_path / "work" / "images")  # a work folder: images, runs
    section = report_section(build_report(tmp_path / "work").read_text(), "tokens")
    assert "&lt;my-cat&gt;" in section and section.count("<tr><td>") == 2
    assert f"{words[0][0][0]} ({words[0][0][1]:.2f})" in section


@pytest.mark.slow
def test_textual_inversion_under_torchrun_resumes_to_the_straight_run(data, tmp_path):
    """Two ranks, the U-Net frozen (no DDP wrapper: the token's gradients are averaged by hand)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    def torchrun(run, steps, *more):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
             "latentmill", "train", str(data / "latents"), "--model", str(data / "unet"), "-o", str(run),
             "--text-encoder", str(data / "text"), "--textual-inversion", TOKEN, "--init-word", "cat",
             "--steps", str(steps), "--batch-size", "2", "--checkpoint-every", "2", "--workers", "0",
             "--learning-rate", "0.05", *more],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]

    torchrun(tmp_path / "straight", 4)
    torchrun(tmp_path / "resumed", 2)
    torchrun(tmp_path / "resumed", 4, "--resume")
    a, b = (
        load_file(tmp_path / r / "checkpoints" / "step-0000004" / "embeddings.safetensors")
        for r in ("straight", "resumed")
    )
    assert torch.equal(a[TOKEN], b[TOKEN])
    first = load_file(tmp_path / "resumed" / "checkpoints" / "step-0000002" / "embeddings.safetensors")[TOKEN]
    assert not torch.equal(first, a[TOKEN])


def test_dreambooth_class_images_keep_their_captions_under_textual_inversion():
    from latentmill.train.conditioning import _trained_text

    seen = []

    class Text:
        width = 4

        def encode(self, captions):
            seen.append(captions)
            return torch.zeros(len(captions), 2, 4)

    encode, _, _ = _trained_text(
        TrainConfig(output="r", textual_inversion="<t>", caption_dropout=0.0), Text()
    )
    encode({"captions": ["a dog"]}, torch.Generator().manual_seed(0))
    encode({"captions": ["a dog"], "prior": True}, torch.Generator().manual_seed(0))
    assert "<t>" in seen[0][0] and seen[1] == ["a dog"]
