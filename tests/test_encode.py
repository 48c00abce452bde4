"""Latent encoding with a tiny diffusers AutoencoderKL built from a config (no hub)."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from latentmill.curate.buckets import place, resize_and_crop
from latentmill.curate.encode import EncodeConfig, encode, encode_batch
from latentmill.curate.errors import InputError
from latentmill.curate.imageshards import iter_image_shard
from latentmill.curate.latentshards import check_vae, iter_latent_shard, read_manifest
from latentmill.curate.vae import load_vae
from tests.conftest import image_entry, kill_when_done, make_shard, tiny_clip_text_pipeline

SMALL = dict(resolution=256, batch_size=4)


def latents_by_key(folder):
    manifest = read_manifest(folder)
    return {s["key"]: s for shard in manifest["shards"] for s in iter_latent_shard(folder / f"{shard}.tar", manifest)}


def test_latent_shapes_follow_the_buckets_and_the_manifest_counts_match(image_shards, tmp_path):
    out = tmp_path / "latents"
    manifest = encode(image_shards, out, EncodeConfig(**SMALL))
    samples = latents_by_key(out)
    assert len(samples) == manifest["samples"] == 12
    for sample in samples.values():
        w, h = sample["meta"]["bucket"]
        assert sample["latent"].shape == (4, h // 8, w // 8) and sample["latent"].dtype == np.float16
        assert sample["caption"] and sample["meta"]["AESTHETIC_SCORE"] == 5.5
    per_bucket = {}
    for sample in samples.values():
        key = "{}x{}".format(*sample["meta"]["bucket"])
        per_bucket[key] = per_bucket.get(key, 0) + 1
    assert manifest["per_bucket"] == per_bucket
    assert {k: v["samples"] for k, v in manifest["shards"].items()} == {"00000": 6, "00001": 6}
    assert manifest["scaling_factor"] == pytest.approx(0.18215) and manifest["resolution"] == 256
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["per_bucket"] == manifest["per_bucket"]


def test_plain_webdataset_reads_the_shards(image_shards, tmp_path):
    import webdataset as wds

    out = tmp_path / "latents"
    encode(image_shards, out, EncodeConfig(**SMALL, flip=True, std=True))
    dataset = wds.WebDataset([str(out / "00000.tar"), str(out / "00001.tar")], shardshuffle=False).decode()
    samples = list(dataset)
    assert len(samples) == 12
    first = samples[0]
    assert {"latent.npy", "latent_std.npy", "latent_flip.npy", "txt", "json"} <= set(first)
    w, h = first["json"]["bucket"]
    assert first["latent.npy"].shape == (4, h // 8, w // 8)
    assert (first["latent_std.npy"] > 0).all()


def test_the_flipped_latent_is_the_encoding_of_the_flipped_image(image_shards, tmp_path):
    from PIL import ImageOps

    out = tmp_path / "latents"
    encode(image_shards, out, EncodeConfig(**SMALL, flip=True))
    stored = latents_by_key(out)
    vae = load_vae("tiny")
    sample = next(iter_image_shard(image_shards / "00000.tar"))
    meta = stored[sample.key]["meta"]
    image = sample.image()
    placement = place(image.width, image.height, tuple(meta["bucket"]))
    assert list(placement.crop) == meta["crop"] and list(placement.original_size) == meta["original_size"]
    pixels = resize_and_crop(image, placement)
    flipped, _ = encode_batch(vae, [ImageOps.mirror(pixels)], "cpu", False)
    plain, _ = encode_batch(vae, [pixels], "cpu", False)
    np.testing.assert_allclose(stored[sample.key]["latent_flip"], flipped[0].astype(np.float16), atol=2e-3)
    np.testing.assert_allclose(stored[sample.key]["latent"], plain[0].astype(np.float16), atol=2e-3)
    assert not np.allclose(flipped[0], plain[0], atol=1e-2)


def test_the_same_images_encode_at_256_and_512(image_shards, tmp_path):
    low = encode(image_shards, tmp_path / "latents-256", EncodeConfig(resolution=256))
    high = encode(image_shards, tmp_path / "latents-512", EncodeConfig(resolution=512, max_upscale=2.0))
    a, b = latents_by_key(tmp_path / "latents-256"), latents_by_key(tmp_path / "latents-512")
    assert set(a) == set(b) and len(a) == 12
    assert low["resolution"] == 256 and high["resolution"] == 512
    for key in a:
        assert a[key]["latent"].shape[1] * a[key]["latent"].shape[2] <= 32 * 32
        assert b[key]["latent"].shape[1] * b[key]["latent"].shape[2] > 32 * 32


def test_selection_and_too_small_policy(image_shards, tmp_path):
    selection = tmp_path / "selection"
    selection.mkdir()
    for shard in ("00000", "00001"):
        keys = [f"{shard}{i:04d}" for i in range(6)]
        pq.write_table(pa.table({"key": keys, "keep": [i != 2 for i in range(6)], "reason": ["" if i != 2 else "min_aesthetic" for i in range(6)]}),
                       selection / f"{shard}.parquet")
    strict = encode(image_shards, tmp_path / "a", EncodeConfig(resolution=512), selection=selection)
    # every selected picture (at most 512x256) must be enlarged 1.375x to 1.71x to cover its 512-bucket
    assert strict["dropped"] == {"not_selected": 2, "too_small": 10}
    assert strict["samples"] == 0
    relaxed = encode(image_shards, tmp_path / "b", EncodeConfig(resolution=512, max_upscale=2.0), selection=selection)
    assert relaxed["dropped"] == {"not_selected": 2} and relaxed["samples"] == 10


def test_undecodable_images_and_nonfinite_latents_are_dropped_with_a_reason(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    make_shard(images / "00000.tar", [image_entry("a", 256, 256), ("b", {"jpg": b"<html>", "txt": b"x"})])
    stats = encode(images, tmp_path / "ok", EncodeConfig(resolution=256))
    assert stats["dropped"] == {"undecodable": 1} and stats["samples"] == 1

    broken = load_vae("tiny", seed=3).model
    with torch.no_grad():
        broken.encoder.conv_in.weight[0, 0, 0, 0] = float("nan")
    broken.save_pretrained(tmp_path / "nan-vae")
    stats = encode(images, tmp_path / "nan", EncodeConfig(resolution=256, vae=str(tmp_path / "nan-vae")))
    assert stats["dropped"] == {"nonfinite_latent": 1, "undecodable": 1} and stats["samples"] == 0


def test_latents_from_another_vae_are_refused(image_shards, tmp_path, run_cli):
    out = tmp_path / "latents"
    encode(image_shards, out, EncodeConfig(**SMALL))
    other = load_vae("tiny", seed=1)
    other.model.save_pretrained(tmp_path / "other-vae")
    with pytest.raises(InputError, match="made with VAE"):
        check_vae(read_manifest(out), other.fingerprint, out)
    check_vae(read_manifest(out), load_vae("tiny").fingerprint, out)  # the same VAE passes
    result = run_cli("encode", image_shards, "-o", out, "--resolution", "256", "--vae", tmp_path / "other-vae")
    assert result.exit_code == 2 and "other settings (changed: vae)" in result.output


def test_a_missing_vae_says_what_to_provide(image_shards, tmp_path, run_cli):
    result = run_cli("encode", image_shards, "-o", tmp_path / "x", "--vae", "nobody/no-such-vae")
    assert result.exit_code == 2
    assert "nobody/no-such-vae" in result.output and "local diffusers folder" in result.output


def _encode_cmd(images, out):
    return [sys.executable, "-m", "latentmill", "encode", str(images), "-o", str(out), "--resolution", "256",
            "--batch-size", "1", "--flip", "--std"]


def test_an_encode_killed_midway_resumes_to_identical_bytes(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for shard in range(6):
        make_shard(images / f"{shard:05d}.tar",
                   [image_entry(f"{shard:05d}{i:04d}", 320, 256 + 16 * i, seed=shard * 10 + i) for i in range(6)])
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    process = subprocess.Popen(_encode_cmd(images, killed), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "00000.stats.json"
    kill_when_done(process, marker)
    assert marker.exists() and not (killed / "manifest.json").exists(), "the encode was not stopped mid-way"
    subprocess.run(_encode_cmd(images, killed), check=True, capture_output=True)
    subprocess.run(_encode_cmd(images, reference), check=True, capture_output=True)
    for shard in range(6):
        name = f"{shard:05d}.tar"
        assert (killed / name).read_bytes() == (reference / name).read_bytes()
    assert not list(killed.glob(".*tmp*"))
    assert read_manifest(killed)["shards"] == read_manifest(reference)["shards"]


def test_buckets_command(image_shards, tmp_path, run_cli):
    from latentmill.curate.buckets import make_buckets

    result = run_cli("buckets", "--resolution", "1024", "--json")
    assert result.exit_code == 0 and json.loads(result.output) == [list(b) for b in make_buckets(1024, 512, 2048)]
    table = run_cli("buckets", "--resolution", "512")
    assert "17 buckets" in table.output and "512    512" in table.output
    chart = tmp_path / "chart.png"
    result = run_cli("buckets", "--resolution", "256", "--images", image_shards, "--plot", chart)
    assert result.exit_code == 0 and "12 images" in result.output
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dist = json.loads(run_cli("buckets", "--resolution", "256", "--images", image_shards, "--json").output)
    assert dist["images"] == 12 and sum(r["count"] for r in dist["buckets"]) == 12
    assert run_cli("buckets", "--resolution", "500").exit_code == 2


def test_caption_embeddings_are_precomputed_with_a_text_encoder(image_shards, tmp_path):
    from latentmill.curate.textencoder import load_text_encoder

    out = tmp_path / "latents"
    manifest = encode(image_shards, out, EncodeConfig(**SMALL, text_encoder="openclip:latentmill-tiny"))
    assert manifest["text_encoder"]["shape"] == [77, 32]
    encoder = load_text_encoder("openclip:latentmill-tiny")
    samples = latents_by_key(out)
    key, sample = sorted(samples.items())[0]
    assert sample["text_emb"].shape == (77, 32) and sample["text_emb"].dtype == np.float16
    expected = encoder.encode([sample["caption"]])[0]
    np.testing.assert_allclose(sample["text_emb"], expected.astype(np.float16), atol=2e-3)
    other = sorted(samples.items())[1][1]
    assert other["caption"] != sample["caption"] and not np.allclose(other["text_emb"], sample["text_emb"])


def test_a_pipeline_text_encoder_folder_is_loaded(tmp_path):
    from latentmill.curate.textencoder import load_text_encoder

    folder = tiny_clip_text_pipeline(tmp_path / "pipeline")
    encoder = load_text_encoder(str(folder))
    assert encoder.encode(["a cat", "cat"]).shape == (2, encoder.context_length, 32)
    with pytest.raises(InputError, match="openclip:NAME"):
        load_text_encoder("no/such/folder")


def test_bf16_encoding_stays_close_to_fp32(image_shards, tmp_path):
    encode(image_shards, tmp_path / "fp32", EncodeConfig(**SMALL))
    encode(image_shards, tmp_path / "bf16", EncodeConfig(**SMALL, precision="bf16"))
    a, b = latents_by_key(tmp_path / "fp32"), latents_by_key(tmp_path / "bf16")
    for key in a:
        diff = np.abs(a[key]["latent"].astype(np.float32) - b[key]["latent"].astype(np.float32)).max()
        assert diff < 0.1 * (np.abs(a[key]["latent"]).max() + 1e-3)
