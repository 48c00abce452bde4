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
from latentmill.curate.encode import EncodeConfig, encode
from latentmill.curate.imageshards import iter_image_shard
from latentmill.curate.latentshards import check_vae, iter_latent_shard, read_manifest
from latentmill.curate.shardencoder import sample_meta
from latentmill.curate.vae import encode_batch, load_vae
from latentmill.errors import InputError, NothingLeft
from tests.conftest import image_entry, kill_when_done, make_shard, tiny_clip_text_pipeline

SMALL = dict(resolution=256, batch_size=4, vae="tiny")


def latents_by_key(folder):
    manifest = read_manifest(folder)
    return {
        s["key"]: s
        for shard in manifest["shards"]
        for s in iter_latent_shard(folder / f"{shard}.tar", manifest)
    }


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


def test_a_stored_latent_becomes_what_diffusers_scripts_feed_the_unet(image_shards, tmp_path):
    """float16 -> float32, + std * noise where the std was stored, minus shift, times the scaling factor:
    diffusers' `vae.encode(x).latent_dist.sample() * scaling_factor`, from the shards."""
    import webdataset as wds

    from latentmill.train.latentspace import from_unet_space, unet_input

    out = tmp_path / "latents"
    encode(image_shards, out, EncodeConfig(**SMALL, std=True))
    manifest = read_manifest(out) | {"shift_factor": 0.0609}  # an SD3-style shift, to see it applied
    scale = manifest["scaling_factor"]
    sample = next(iter(wds.WebDataset(str(out / "00000.tar"), shardshuffle=False).decode()))
    stored = {"latent": sample["latent.npy"], "latent_std": sample["latent_std.npy"]}
    image = next(
        s for s in iter_image_shard(image_shards / "00000.tar") if s.key == sample["__key__"]
    ).image()
    meta = sample["json"]
    pixels = resize_and_crop(image, place(image.width, image.height, tuple(meta["bucket"]), rule="kohya"))
    vae = load_vae("tiny")
    with torch.inference_mode():
        batch = torch.from_numpy(np.asarray(pixels)).permute(2, 0, 1)[None].float() / 127.5 - 1
        dist = vae.model.encode(batch).latent_dist
    mean = unet_input({"latent": stored["latent"]}, manifest)
    assert mean.dtype == np.float32
    np.testing.assert_allclose(mean, (dist.mean[0].numpy() - 0.0609) * scale, atol=3e-3 * scale)
    draws = np.stack([unet_input(stored, manifest, np.random.default_rng(i)) for i in range(200)])
    z = (draws - mean) / (stored["latent_std"].astype(np.float32) * scale)  # the posterior's noise, recovered
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
    np.testing.assert_allclose(
        from_unet_space(mean, scale, 0.0609), stored["latent"].astype(np.float32), atol=1e-5
    )


def test_the_flipped_latent_is_the_encoding_of_the_flipped_image(image_shards, tmp_path):
    from PIL import ImageOps

    out = tmp_path / "latents"
    encode(image_shards, out, EncodeConfig(**SMALL, flip=True))
    stored = latents_by_key(out)
    vae = load_vae("tiny")
    sample = next(iter_image_shard(image_shards / "00000.tar"))
    meta = stored[sample.key]["meta"]
    image = sample.image()
    placement = place(image.width, image.height, tuple(meta["bucket"]), rule="kohya")
    assert list(placement.crop) == meta["crop"] and list(placement.original_size) == meta["original_size"]
    pixels = resize_and_crop(image, placement)
    flipped, _, _ = encode_batch(vae, [ImageOps.mirror(pixels)], "cpu", False)
    plain, _, on_device = encode_batch(vae, [pixels], "cpu", False, with_flip=True)
    assert np.array_equal(
        on_device, flipped
    )  # mirroring the batch on the device = encoding the mirrored image
    np.testing.assert_allclose(stored[sample.key]["latent_flip"], flipped[0].astype(np.float16), atol=2e-3)
    np.testing.assert_allclose(stored[sample.key]["latent"], plain[0].astype(np.float16), atol=2e-3)
    assert not np.allclose(flipped[0], plain[0], atol=1e-2)


def test_the_same_images_encode_at_256_and_512(image_shards, tmp_path):
    low = encode(image_shards, tmp_path / "latents-256", EncodeConfig(vae="tiny", resolution=256))
    high = encode(
        image_shards, tmp_path / "latents-512", EncodeConfig(vae="tiny", resolution=512, max_upscale=2.0)
    )
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
        pq.write_table(
            pa.table(
                {
                    "key": keys,
                    "keep": [i != 2 for i in range(6)],
                    "reason": ["" if i != 2 else "min_aesthetic" for i in range(6)],
                }
            ),
            selection / f"{shard}.parquet",
        )
    # every selected picture (at most 512x256) must be enlarged 1.375x to 1.71x to cover its 512-bucket:
    # nothing left, which is not a success (exit 3 on the command line), but the manifest says so
    with pytest.raises(NothingLeft, match=r"none of 12 left: too_small 10; not_selected 2"):
        encode(image_shards, tmp_path / "a", EncodeConfig(vae="tiny", resolution=512), selection=selection)
    assert read_manifest(tmp_path / "a")["samples"] == 0
    relaxed = encode(
        image_shards,
        tmp_path / "b",
        EncodeConfig(vae="tiny", resolution=512, max_upscale=2.0),
        selection=selection,
    )
    assert relaxed["dropped"] == {"not_selected": 2} and relaxed["samples"] == 10


def test_undecodable_images_and_nonfinite_latents_are_dropped_with_a_reason(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    make_shard(images / "00000.tar", [image_entry("a", 256, 256), ("b", {"jpg": b"<html>", "txt": b"x"})])
    stats = encode(images, tmp_path / "ok", EncodeConfig(vae="tiny", resolution=256))
    assert stats["dropped"] == {"undecodable": 1} and stats["samples"] == 1

    broken = load_vae("tiny", seed=3).model
    with torch.no_grad():
        broken.encoder.conv_in.weight[0, 0, 0, 0] = float("nan")
    broken.save_pretrained(tmp_path / "nan-vae")
    with pytest.raises(
        NothingLeft,
        match=r"none of 2 left: (undecodable 1; nonfinite_latent 1|nonfinite_latent 1; undecodable 1)",
    ):
        encode(images, tmp_path / "nan", EncodeConfig(resolution=256, vae=str(tmp_path / "nan-vae")))
    stats = json.loads((tmp_path / "nan" / "00000.stats.json").read_text())
    assert stats["dropped"] == {"nonfinite_latent": 1, "undecodable": 1} and stats["written"] == 0


def test_hostile_sample_metadata_still_encodes(tmp_path):
    import webdataset as wds

    from tests.conftest import hostile_metadata_entries

    (tmp_path / "images").mkdir()
    entries = hostile_metadata_entries()
    make_shard(tmp_path / "images" / "00000.tar", entries)
    encode(
        tmp_path / "images",
        tmp_path / "latents",
        EncodeConfig(
            vae="tiny", resolution=128, bucket_min_side=64, bucket_max_side=256, step=32, max_upscale=2.0
        ),
    )
    stats = json.loads((tmp_path / "latents" / "00000.stats.json").read_text())
    assert stats["written"] == len(entries) and stats["bad_metadata"] == 7
    samples = list(wds.WebDataset(str(tmp_path / "latents" / "00000.tar"), shardshuffle=False).decode())
    assert len(samples) == len(entries) and all(isinstance(s["json"], dict) for s in samples)


def test_latents_verify_checks_every_shard_against_the_manifest(image_shards, tmp_path, run_cli):
    import shutil

    out = tmp_path / "latents"
    encode(image_shards, out, EncodeConfig(**SMALL))
    result = run_cli("latents", "verify", out)
    assert result.exit_code == 0 and "2 shard(s), 12 samples: all match" in result.output, result.output
    data = bytearray((out / "00000.tar").read_bytes())
    data[600] ^= 0xFF  # one flipped byte inside the first sample's latent
    (out / "00000.tar").write_bytes(bytes(data))
    shutil.copy(out / "00001.tar", out / "00002.tar")
    (out / "00001.tar").unlink()
    result = run_cli("latents", "verify", out)
    assert result.exit_code == 2, result.output
    assert "00000.tar: sha256" in result.output and "00001.tar: missing" in result.output
    assert "00002.tar: not in the manifest" in result.output and "6 problem(s)" in result.output
    assert "00000.tar: xxh3_128" in result.output  # the digest training checks as it reads
    assert (
        "00000.tar: 1 bad_sample" in result.output
        and "00000.tar: 5 readable samples, the manifest records 6" in result.output
    )
    fresh = tmp_path / "fresh"
    encode(image_shards, fresh, EncodeConfig(**SMALL))
    manifest = json.loads((fresh / "manifest.json").read_text())
    (fresh / "manifest.json").write_text(json.dumps(manifest | {"samples": 13}))  # the totals edited
    result = run_cli("latents", "verify", fresh)
    assert result.exit_code == 2 and "'samples' is 13, but its shards add up to 12" in result.output
    bucket = next(iter(manifest["per_bucket"]))
    manifest["per_bucket"][bucket] += 5
    (fresh / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("latents", "verify", fresh)
    assert result.exit_code == 2 and "'per_bucket' adds up to 17, its shards to 12" in result.output


def test_latents_from_another_vae_are_refused(image_shards, tmp_path, run_cli):
    out = tmp_path / "latents"
    encode(image_shards, out, EncodeConfig(**SMALL))
    other = load_vae("tiny", seed=1)
    other.model.save_pretrained(tmp_path / "other-vae")
    with pytest.raises(InputError, match="made with VAE"):
        check_vae(read_manifest(out), other.fingerprint, out)
    check_vae(read_manifest(out), load_vae("tiny").fingerprint, out)  # the same VAE passes
    result = run_cli(
        "encode", image_shards, "-o", out, "--resolution", "256", "--vae", tmp_path / "other-vae"
    )
    assert result.exit_code == 2 and "made with other settings or inputs" in result.output
    assert "settings.vae: " in result.output and "-> a file or folder (" in result.output
    assert "--overwrite" in result.output
    # with --overwrite: encoded again with the other VAE, every shard and the manifest
    again = run_cli(
        "encode",
        image_shards,
        "-o",
        out,
        "--resolution",
        "256",
        "--vae",
        tmp_path / "other-vae",
        "--overwrite",
    )
    assert again.exit_code == 0, again.output
    check_vae(read_manifest(out), other.fingerprint, out)


def test_a_missing_vae_says_what_to_provide(image_shards, tmp_path, run_cli):
    result = run_cli("encode", image_shards, "-o", tmp_path / "x", "--vae", "nobody/no-such-vae")
    assert result.exit_code == 2
    assert "nobody/no-such-vae" in result.output and "local diffusers folder" in result.output


def _encode_cmd(images, out):
    return [
        sys.executable,
        "-m",
        "latentmill",
        "encode",
        str(images),
        "-o",
        str(out),
        "--resolution",
        "256",
        "--batch-size",
        "1",
        "--flip",
        "--std",
        "--vae",
        "tiny",
    ]


@pytest.mark.slow  # kills and restarts a subprocess
def test_an_encode_killed_midway_resumes_to_identical_bytes(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for shard in range(6):
        make_shard(
            images / f"{shard:05d}.tar",
            [image_entry(f"{shard:05d}{i:04d}", 320, 256 + 16 * i, seed=shard * 10 + i) for i in range(6)],
        )
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    process = subprocess.Popen(
        _encode_cmd(images, killed),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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
    assert result.exit_code == 0 and json.loads(result.output) == [
        list(b) for b in make_buckets(1024, 512, 2048)
    ]
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


def reference_encode_shard(image_shard, output, config, vae, text_encoder=None):
    """The encoder as it was before it streamed, kept here as the specification of the bytes:
    decode the whole shard, sort by key, batch each bucket in key order, mirror with PIL for a second VAE
    pass, write a ustar tar in key order."""
    import io
    import tarfile
    import zlib

    from PIL import ImageOps

    from latentmill.curate.buckets import assign_bucket, make_buckets, needed_upscale
    from latentmill.curate.latentshards import npy_bytes

    buckets = make_buckets(config.resolution, config.bucket_min_side, config.bucket_max_side, config.step)
    prepared, order = {}, []
    for sample in iter_image_shard(image_shard):
        try:
            image = sample.image()
        except Exception:
            continue
        bucket = assign_bucket(image.width, image.height, buckets, config.bucket_assign)
        if needed_upscale(image.width, image.height, bucket) > config.max_upscale + 1e-9:
            continue
        rng = None
        if config.crop == "random":
            rng = np.random.default_rng(
                [config.seed, zlib.crc32(f"{image_shard.stem}/{sample.key}".encode())]
            )
        placement = place(image.width, image.height, bucket, rng, config.bucket_assign)
        prepared.setdefault(bucket, []).append((sample, placement, resize_and_crop(image, placement)))
        order.append(sample.key)
    order.sort()
    results = {}
    for items in prepared.values():
        items.sort(key=lambda item: item[0].key)
        for start in range(0, len(items), config.batch_size):
            batch = items[start : start + config.batch_size]
            images = [pixels for _, _, pixels in batch]
            mean, std, _ = encode_batch(vae, images, "cpu", config.std)
            flipped = (
                encode_batch(vae, [ImageOps.mirror(im) for im in images], "cpu", False)[0]
                if config.flip
                else None
            )
            for i, (sample, placement, _) in enumerate(batch):
                results[sample.key] = (
                    sample,
                    placement,
                    mean[i],
                    None if std is None else std[i],
                    None if flipped is None else flipped[i],
                )
    text = {}
    if text_encoder is not None:
        for start in range(0, len(order), config.batch_size):
            keys = order[start : start + config.batch_size]
            text.update(
                zip(keys, text_encoder.encode([results[k][0].caption or "" for k in keys]), strict=True)
            )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key in order:
            sample, placement, mean, std, flipped = results[key]
            meta = sample_meta(sample.meta, placement)  # what the JSON holds is not what this pins
            files = {"latent.npy": npy_bytes(mean.astype(np.float16))}
            if std is not None:
                files["latent_std.npy"] = npy_bytes(std.astype(np.float16))
            if flipped is not None:
                files["latent_flip.npy"] = npy_bytes(flipped.astype(np.float16))
            if key in text:
                files["text_emb.npy"] = npy_bytes(text[key].astype(np.float16))
            files["txt"] = (sample.caption or "").encode()
            files["json"] = json.dumps(meta, sort_keys=True).encode()
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def mixed_shards(tmp_path):
    """Two shards of 20 pictures over five aspect ratios, written in a shuffled (download-completion) order."""
    import random

    folder = tmp_path / "mixed"
    folder.mkdir()
    sizes = [(300, 300), (420, 240), (240, 420), (512, 256), (330, 280)]
    for shard in range(2):
        entries = [image_entry(f"{shard:05d}{i:04d}", *sizes[i % 5], seed=shard * 100 + i) for i in range(20)]
        random.Random(shard).shuffle(entries)
        make_shard(folder / f"{shard:05d}.tar", entries)
    return folder


def test_streamed_encode_is_byte_identical_across_workers_and_to_the_in_memory_encoder(
    mixed_shards, tmp_path
):
    from latentmill.curate.textencoder import load_text_encoder

    settings = dict(
        vae="tiny",
        resolution=256,
        batch_size=3,
        flip=True,
        std=True,
        crop="random",
        seed=5,
        text_encoder="openclip:latentmill-tiny",
        bucket_assign="log",
    )  # "log": the rule before kohya's
    outputs = {}
    for workers in (0, 1, 2):
        out = tmp_path / f"w{workers}"
        manifest = encode(mixed_shards, out, EncodeConfig(**settings, workers=workers))
        outputs[workers] = {name: (out / f"{name}.tar").read_bytes() for name in manifest["shards"]}
        assert manifest["samples"] == 40 and len(manifest["per_bucket"]) == 3
    assert outputs[0] == outputs[1] == outputs[2]
    vae, text_encoder = load_vae("tiny"), load_text_encoder("openclip:latentmill-tiny")
    for name, data in outputs[0].items():
        expected = reference_encode_shard(
            mixed_shards / f"{name}.tar", None, EncodeConfig(**settings), vae, text_encoder
        )
        assert data == expected, f"shard {name} differs from the in-memory encoder's bytes"


def test_a_key_longer_than_a_ustar_name_and_a_repeated_key_are_handled(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    long_key = "k" * 150
    make_shard(
        images / "00000.tar",
        [
            image_entry(long_key, 256, 256),
            image_entry("a", 256, 256, seed=1),
            image_entry("b", 256, 256, seed=2),
            image_entry("a", 256, 256, seed=3),
        ],
    )
    manifest = encode(images, tmp_path / "out", EncodeConfig(vae="tiny", resolution=256, workers=0))
    assert manifest["samples"] == 3 and manifest["dropped"] == {"duplicate_key": 1}
    assert manifest["per_bucket"] == {"256x256": 3}
    samples = latents_by_key(tmp_path / "out")
    assert set(samples) == {long_key, "a", "b"}
