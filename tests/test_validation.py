"""The held-out validation split (`encode --validation-share`) and the validation loss during training
(`train --eval-every`): deterministic, never trained on, logged with the raw and EMA weights, kept on resume."""

import json

import numpy as np
import pytest
import torch

from latentmill.curate.encode import EncodeConfig, encode
from latentmill.curate.latentshards import iter_latent_shard, read_manifest
from latentmill.curate.validationsplit import held_out
from latentmill.errors import InputError
from latentmill.train.loop import train
from tests.conftest import SMALL_ENCODE, image_entry, make_shard, quick_train_config, tiny_clip_text_pipeline

ENCODE = SMALL_ENCODE
SHARE = 0.3


def _images(folder, per_shard):
    folder.mkdir(parents=True)
    keys = [f"{i:08d}" for i in range(16)]
    for s, start in enumerate(range(0, len(keys), per_shard)):
        make_shard(
            folder / f"{s:05d}.tar",
            [
                image_entry(k, 64, 64 if int(k) % 3 else 96, seed=int(k))
                for k in keys[start : start + per_shard]
            ],
        )
    return keys


def _keys(folder):
    manifest = read_manifest(folder)
    return sorted(
        s["key"] for shard in sorted(folder.glob("*.tar")) for s in iter_latent_shard(shard, manifest)
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    keys = _images(root / "images", per_shard=8)
    encode(root / "images", root / "latents", EncodeConfig(validation_share=SHARE, **ENCODE))
    tiny_clip_text_pipeline(root / "text")
    return root, keys


def test_the_split_is_a_pure_function_of_the_key_and_never_overlaps(data, tmp_path):
    from latentmill.curate.latentverify import verify_latents

    root, keys = data
    train_keys, held = _keys(root / "latents"), _keys(root / "latents" / "validation")
    assert held == sorted(k for k in keys if held_out(k, SHARE)) and held
    assert not set(train_keys) & set(held) and sorted(train_keys + held) == keys
    manifest, val_manifest = read_manifest(root / "latents"), read_manifest(root / "latents" / "validation")
    assert manifest["validation"] == {"share": SHARE, "folder": "validation"} and "split" not in manifest
    assert val_manifest["split"] == "validation" and val_manifest["samples"] == len(held)
    assert manifest["samples"] == len(train_keys)
    stats = [json.loads(p.read_text()) for p in sorted((root / "latents").glob("*.stats.json"))]
    assert sum(s["held_out"] for s in stats) == len(held)
    for folder in (root / "latents", root / "latents" / "validation"):
        assert not verify_latents(folder)["problems"], folder
    # other shard boundaries (3 shards instead of 2), the same held-out keys
    _images(tmp_path / "images", per_shard=6)
    encode(tmp_path / "images", tmp_path / "latents", EncodeConfig(validation_share=SHARE, **ENCODE))
    assert _keys(tmp_path / "latents" / "validation") == held
    share = [held_out(f"key-{i}", 0.01) for i in range(20000)]
    assert 0.007 < sum(share) / len(share) < 0.013


def config(root, run, **overrides):
    return quick_train_config(root, run, **({"model": "tiny", "eval_every": 2} | overrides))


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_validation_loss_and_clip_score_are_logged_repeatable_and_resume_without_gaps_or_repeats(
    data, tmp_path, monkeypatch
):
    import shutil

    from latentmill.evaluation import training_eval
    from latentmill.report import build_report
    from tests.conftest import report_section

    monkeypatch.setenv("LATENTMILL_CACHE", str(tmp_path / "cache"))
    root, _ = data
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\na green field\n")
    scored = dict(eval_prompts=str(tmp_path / "prompts.txt"), eval_reference=str(root / "images"),
                  eval_features="clip:tiny", sample_steps=2)  # fmt: skip
    runs = tmp_path / "work" / "runs"
    straight, resumed, again = runs / "straight", runs / "resumed", runs / "again"

    def run(folder, **more):
        c = config(root, folder, **(scored | more))
        train(c, evaluate=training_eval(c))

    run(straight, steps=4, checkpoint_every=4)
    run(again, steps=4, checkpoint_every=4)
    run(resumed, steps=2, checkpoint_every=2)
    run(resumed, steps=4, checkpoint_every=2, resume=True)
    keys = ("step", "val_loss", "val_loss_ema", "clip_score", "kid")
    evals = [
        [tuple(e[k] for k in keys) for e in _log(r) if "val_loss" in e] for r in (straight, again, resumed)
    ]
    assert [e[0] for e in evals[0]] == [2, 4]
    assert evals[0] == evals[1] == evals[2]  # the same weights, the same numbers; resume keeps the curve
    assert all(np.isfinite(e[1:]).all() and 0 <= e[3] <= 100 for e in evals[0])
    assert evals[0][0][1] != evals[0][0][2]  # raw and EMA weights differ after 2 steps
    shutil.copytree(root / "images", tmp_path / "work" / "images")
    page = build_report(tmp_path / "work").read_text()
    assert 'alt="evaluation straight"' in report_section(page, "evals")


def test_the_validation_loss_equals_a_hand_computation(data):
    from diffusers import UNet2DConditionModel

    from latentmill.curate.textencoder import load_text_encoder
    from latentmill.train.latentspace import to_unet_space
    from latentmill.train.objective import VALIDATION_TIMESTEPS as TIMESTEPS
    from latentmill.train.objective import Objective
    from latentmill.train.schedule import training_scheduler
    from latentmill.train.validation import ValidationSet

    root, _ = data
    manifest = read_manifest(root / "latents")
    validation = ValidationSet(str(root / "latents" / "validation"), manifest, 3, "cpu")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=32, block_out_channels=(32, 64),
        layers_per_block=1, attention_head_dim=8, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()  # fmt: skip
    encoder = load_text_encoder(str(root / "text"))
    objective = Objective(training_scheduler("epsilon"))
    got = validation.loss(
        unet, objective, lambda texts: (torch.from_numpy(encoder.encode(texts)), None), False
    )
    assert (
        validation.loss(unet, objective, lambda t: (torch.from_numpy(encoder.encode(t)), None), False) == got
    )
    alphas = objective.schedule.alphas_cumprod
    terms = []
    with torch.no_grad():
        for sample in sorted((s for b in validation.batches for s in b), key=lambda s: s["key"]):
            x0 = to_unet_space(
                torch.from_numpy(sample["latent"].astype(np.float32)), manifest["scaling_factor"]
            )[None]
            noise = ValidationSet.noise(sample)[None]
            text = torch.from_numpy(encoder.encode([sample["caption"]]))
            for t in TIMESTEPS:
                noisy = alphas[t].sqrt() * x0 + (1 - alphas[t]).sqrt() * noise
                terms.append(float(((unet(noisy, t, encoder_hidden_states=text).sample - noise) ** 2).mean()))
    assert len(terms) == 3 * 8
    assert got == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_a_validation_folder_never_trains_and_eval_needs_held_out_latents(data, tmp_path):
    root, keys = data
    with pytest.raises(InputError, match=r"a held-out validation split .* it never trains"):
        train(
            config(root, tmp_path / "a", shards=str(root / "latents" / "validation"), eval_every=0, steps=1)
        )
    encode(root / "images", tmp_path / "plain", EncodeConfig(**ENCODE))
    with pytest.raises(
        InputError, match=r"--eval-every 2: .*plain has no held-out latents beside it .*--validation-share"
    ):
        train(config(root, tmp_path / "b", shards=str(tmp_path / "plain"), steps=1))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_held_out_latents_of_another_resolution_are_refused_and_prompts_alone_need_no_split(data, tmp_path):
    from latentmill.train.validation import validation_set

    root, _ = data
    encode(
        root / "images",
        tmp_path / "at128",
        EncodeConfig(**(ENCODE | {"resolution": 128, "bucket_max_side": 256, "max_upscale": 3.0})),
    )
    with pytest.raises(InputError, match=r"resolution is 128, the training folder's is 64"):
        train(config(root, tmp_path / "a", eval_shards=str(tmp_path / "at128"), steps=1))
    assert not (tmp_path / "a").exists()
    encode(root / "images", tmp_path / "plain", EncodeConfig(**ENCODE))
    sets = [(str(tmp_path / "plain"), [])]
    with_prompts = config(root, tmp_path / "b", shards=str(tmp_path / "plain"), eval_prompts="prompts.txt")
    assert validation_set(with_prompts, sets, read_manifest(tmp_path / "plain"), "cpu", 0) is None
