"""`latentmill eval`: the Fréchet distance, KID and CLIP score checked against independent implementations
(pytorch-fid, torchmetrics, a hand computation), the cached reference statistics, a run's evaluation, and
the refusals. Tiny open_clip models with random weights."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentmill.errors import InputError
from latentmill.filters.frechet import clip_score, frechet_distance, kernel_distance, statistics


def _features(seed, n=300, d=16, shift=0.0):
    """n draws of one correlated Gaussian (the same for every seed), shifted."""
    mix = np.random.default_rng(12345).standard_normal((d, d)) * 0.3 + np.eye(d)
    return np.random.default_rng(seed).standard_normal((n, d)) @ mix + shift


def test_the_frechet_distance_equals_pytorch_fids_and_is_zero_for_a_set_and_itself():
    from pytorch_fid.fid_score import calculate_frechet_distance

    a, b = _features(0), _features(1, shift=0.5)
    ours = frechet_distance(*statistics(a), *statistics(b))
    theirs = calculate_frechet_distance(*statistics(a), *statistics(b))
    assert ours > 1 and ours == pytest.approx(theirs, rel=1e-6)
    assert abs(frechet_distance(*statistics(a), *statistics(a))) < 1e-6 * ours
    singular = np.concatenate([a[:, :8], a[:, :8]], axis=1)  # rank-deficient covariances: the eps retry
    assert np.isfinite(frechet_distance(*statistics(singular), *statistics(singular + 0.1)))


def test_kid_is_torchmetrics_unbiased_mmd_and_centred_on_zero_for_one_distribution():
    from torchmetrics.image.kid import poly_mmd

    a, b = _features(0, n=120), _features(1, n=120, shift=0.3)
    ours, spread = kernel_distance(a, b, subsets=1, subset_size=120)  # every row: the order does not matter
    theirs = float(poly_mmd(torch.from_numpy(a), torch.from_numpy(b)))
    assert ours == pytest.approx(theirs, rel=1e-9) and spread == 0
    # unbiased: over pairs of samples of one distribution, its mean is 0 within its error; the biased
    # estimate (diagonals kept) of the same pairs is not
    ours_same, biased = [], []
    for s in range(20):
        x, y = _features(s, n=60), _features(s + 100, n=60)
        ours_same.append(kernel_distance(x, y, subsets=1, subset_size=60)[0])
        k = [(p @ q.T / 16 + 1) ** 3 for p, q in ((x, x), (y, y), (x, y))]
        biased.append(k[0].mean() + k[1].mean() - 2 * k[2].mean())
    error = 3 * np.std(ours_same) / np.sqrt(len(ours_same))
    assert abs(np.mean(ours_same)) < error < np.mean(biased)


def _pictures(folder, count, seed, size=48):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        base = rng.integers(0, 255, 3)
        pixels = np.clip(base + rng.normal(0, 40 + 20 * seed, (size, size + 8 * (i % 3), 3)), 0, 255).astype(
            np.uint8
        )
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return folder


def test_eval_fid_compares_two_folders_caches_their_statistics_and_prints_json(
    tmp_path, run_cli, monkeypatch
):
    monkeypatch.setenv("LATENTMILL_CACHE", str(tmp_path / "cache"))
    a, b = _pictures(tmp_path / "a", 40, 0), _pictures(tmp_path / "b", 40, 1)
    result = run_cli("eval", "fid", a, b, "--features", "clip:tiny", "--json")
    assert result.exit_code == 0, result.output
    numbers = json.loads(result.output.strip().splitlines()[-1])
    assert {"fid", "kid", "kid_std", "precision", "recall"} <= set(numbers) and numbers["fid"] > 0
    cached = sorted((tmp_path / "cache" / "eval-stats").glob("*.npz"))
    assert len(cached) == 2
    again = json.loads(
        run_cli("eval", "fid", a, b, "--features", "clip:tiny", "--json").output.strip().splitlines()[-1]
    )
    assert again == numbers  # the same sets: the same numbers, from the cache
    same = json.loads(
        run_cli("eval", "fid", a, a, "--features", "clip:tiny", "--json").output.strip().splitlines()[-1]
    )
    assert abs(same["fid"]) < 1e-6 * numbers["fid"] and same["precision"] == same["recall"] == 1.0
    with np.load(cached[0]) as stats:  # a stored statistics file stands in for its folder
        assert str(stats["space"]) == "clip:tiny"
    from_file = run_cli("eval", "fid", a, cached[0], "--features", "clip:tiny", "--json")
    assert from_file.exit_code == 0 and json.loads(from_file.output.strip().splitlines()[-1])["fid"] in (
        pytest.approx(numbers["fid"]),
        pytest.approx(0.0, abs=1e-6 * numbers["fid"]),
    )
    small = run_cli("eval", "fid", a, _pictures(tmp_path / "few", 10, 2), "--features", "clip:tiny")
    assert (
        small.exit_code == 2 and "not more than the 32 dimensions" in small.output and "KID" in small.output
    )
    kid = run_cli("eval", "fid", a, tmp_path / "few", "--features", "clip:tiny", "--kid-only", "--json")
    assert kid.exit_code == 0 and "fid" not in json.loads(kid.output.strip().splitlines()[-1])
    other = run_cli("eval", "fid", a, cached[0], "--features", "clip:tiny-rn")
    assert other.exit_code == 2 and "feature space 'clip:tiny'" in other.output
    missing = run_cli("eval", "fid", a, b, "--features", "inception")
    assert missing.exit_code == 2 and "pt_inception-2015-12-05" in missing.output


def test_inception_features_load_from_a_file_in_pytorch_fids_layout(tmp_path):
    from latentmill.filters.imagefeatures import _fid_inception_skeleton, feature_space

    torch.manual_seed(0)
    torch.save(_fid_inception_skeleton().state_dict(), tmp_path / "inception.pth")
    space = feature_space(f"inception:{tmp_path / 'inception.pth'}")
    images = [Image.fromarray(np.full((40, 60, 3), v, np.uint8)) for v in (10, 200)]
    features = space.features(images)
    assert features.shape == (2, 2048) and np.isfinite(features).all()
    assert not np.allclose(features[0], features[1])
    (tmp_path / "bad.pth").write_bytes(b"not weights")
    with pytest.raises(InputError, match="not pytorch-fid's Inception weights"):
        feature_space(f"inception:{tmp_path / 'bad.pth'}")


def test_the_clip_score_is_100_times_the_clipped_cosine():
    from latentmill.filters.clip import load_clip

    clip = load_clip("tiny-rn", None)
    images = [Image.fromarray(np.full((64, 64, 3), v, np.uint8)) for v in (0, 128, 255)]
    prompts = ["a black square", "a grey square", "a white square"]
    with torch.inference_mode():
        img = clip.model.encode_image(torch.stack([clip.preprocess(im) for im in images])).double()
        txt = clip.model.encode_text(clip.tokenizer(prompts)).double()
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=1)
        ours = clip_score(
            clip.embed_images(torch.stack([clip.preprocess(im) for im in images])).numpy(),
            clip.embed_texts(prompts).numpy(),
        )
    assert ours == pytest.approx(float((100 * cos.clamp(min=0)).mean()), rel=1e-4)


@pytest.mark.slow
def test_eval_of_a_run_is_repeatable_and_writes_eval_json(tmp_path, run_cli, monkeypatch):
    from latentmill.curate.encode import EncodeConfig, encode
    from latentmill.train.config import TrainConfig
    from latentmill.train.loop import train
    from tests.conftest import image_entry, make_shard, tiny_clip_text_pipeline

    monkeypatch.setenv("LATENTMILL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "images").mkdir()
    make_shard(tmp_path / "images" / "00000.tar", [image_entry(f"{i:08d}", 64, 64, seed=i) for i in range(8)])
    encode(
        tmp_path / "images",
        tmp_path / "latents",
        EncodeConfig(vae="tiny", resolution=64, bucket_min_side=32, step=32, workers=0),
    )
    tiny_clip_text_pipeline(tmp_path / "text")
    run = tmp_path / "run"
    run.mkdir()  # a run folder without checkpoints yet
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n")
    (tmp_path / "empty.txt").write_text("\n \n")
    args = ["eval", run, "--prompts", tmp_path / "prompts.txt", "--reference", tmp_path / "images", "--count", "6",
            "--sampler-steps", "2", "--kid-only", "--clip-model", "tiny-rn"]  # fmt: skip
    before = run_cli(*args)
    assert before.exit_code == 2 and "no checkpoints" in before.output
    train(TrainConfig(shards=str(tmp_path / "latents"), output=str(run), model="tiny", text_encoder=str(tmp_path / "text"),
                      batch_size=4, steps=2, checkpoint_every=2, warmup_steps=1))  # fmt: skip
    first = run_cli(*args, "-o", tmp_path / "eval.json")
    assert first.exit_code == 0, first.output
    numbers = json.loads((tmp_path / "eval.json").read_text())
    assert numbers["step"] == 2 and numbers["count"] == 6 and 0 <= numbers["clip_score"] <= 100
    assert numbers["settings"]["features"] == "clip:tiny-rn" and np.isfinite(numbers["kid"])
    from latentmill.train.sampling import sampler

    make = sampler(str(run))  # each image from its own seed: the same image alone or in a batch
    both = make(["a red circle", "a blue square"], 0, 2, 5.0, None, seeds=[5, 6])
    alone = make(["a blue square"], 0, 2, 5.0, None, seeds=[6])
    assert np.abs(both[1].astype(int) - alone[0].astype(int)).max() <= 1
    run_cli(*args, "-o", tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == numbers  # fixed seeds: the same numbers
    no_split = run_cli(*[a for a in args if a not in ("--prompts", tmp_path / "prompts.txt")])
    assert no_split.exit_code == 2 and "give --prompts FILE" in no_split.output  # no held-out captions
    empty = run_cli(*[a if a != tmp_path / "prompts.txt" else tmp_path / "empty.txt" for a in args])
    assert empty.exit_code == 2 and "holds no prompt" in empty.output
    odd = run_cli(*args, "--width", "60", "--height", "64")
    assert odd.exit_code == 2 and "multiples of 8" in odd.output
    # 6 images in a 64-d space: no FID, said before any image is made; the rest is measured and kept
    few = run_cli(*[a for a in args if a != "--kid-only"], "-o", tmp_path / "few.json")
    assert few.exit_code == 0, few.output
    kept = json.loads((tmp_path / "few.json").read_text())
    assert kept["fid"] is None and "FID needs more images than the" in kept["fid_refused"]
    assert kept["clip_score"] == numbers["clip_score"] and kept["kid"] == numbers["kid"]


def test_dinov2_features_come_from_a_local_transformers_folder(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from latentmill.filters.imagefeatures import feature_space

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=14
    )
    Dinov2Model(config).save_pretrained(tmp_path / "dinov2")
    space = feature_space(f"dinov2:{tmp_path / 'dinov2'}")
    images = [Image.fromarray(np.full((30, 50, 3), v, np.uint8)) for v in (10, 200, 90)]
    features = space.features(images)
    assert features.shape == (3, 32) and space.dim == 32 and np.isfinite(features).all()
    assert np.array_equal(features, space.features(images))  # the same images, the same features
    with pytest.raises(InputError, match="no DINOv2 model found locally"):
        feature_space(f"dinov2:{tmp_path / 'nothing'}")


def _forged_png(width, height):
    """A PNG header claiming width x height pixels, without the pixels (a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_eval_fid_skips_and_counts_pictures_that_do_not_decode_as_score_does(tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("LATENTMILL_CACHE", str(tmp_path / "cache"))
    clean, b = _pictures(tmp_path / "clean", 12, 0), _pictures(tmp_path / "b", 12, 1)
    dirty = _pictures(tmp_path / "dirty", 12, 0)
    (dirty / "zz-text.png").write_text("not a picture")
    good = (dirty / "0000.png").read_bytes()
    (dirty / "zz-truncated.png").write_bytes(good[: len(good) // 2])
    (dirty / "zz-bomb.png").write_bytes(_forged_png(20_000, 10_000))  # 200 M pixels: past the bound
    args = ("--features", "clip:tiny", "--kid-only", "--json")
    ours = run_cli("eval", "fid", dirty, b, *args)
    assert ours.exit_code == 0, ours.output
    assert (
        "skipped 3 picture(s)" in ours.output and "too_large" in ours.output and "undecodable" in ours.output
    )
    numbers = json.loads(ours.output.strip().splitlines()[-1])
    reference = json.loads(run_cli("eval", "fid", clean, b, *args).output.strip().splitlines()[-1])
    assert numbers["count_a"] == 12 and numbers["kid"] == pytest.approx(reference["kid"])
