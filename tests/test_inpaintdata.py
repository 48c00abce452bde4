"""Inpainting data made at encode time (`encode --mask-variants K`): seeded masks of the published kinds and
the latents of the masked images, computed as Stable Diffusion's inpainting recipe does."""

import json

import numpy as np
import pytest
import torch

from latentmill.curate.buckets import Placement, resize_and_crop
from latentmill.curate.encode import EncodeConfig, encode
from latentmill.curate.imageshards import decode_image, iter_image_shard
from latentmill.curate.inpaintmasks import DEFAULT_MIX, draw_mask, latent_size_mask, parse_mix, variant_mask
from latentmill.curate.latentshards import iter_latent_shard, read_manifest
from latentmill.curate.vae import load_vae
from latentmill.errors import InputError
from tests.conftest import image_entry, make_shard, report_section

ENCODE = dict(vae="tiny", resolution=128, bucket_min_side=64, bucket_max_side=256, step=32, workers=0)


@pytest.fixture(scope="module")
def inpaint(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint")
    (root / "images").mkdir()
    for shard in range(2):
        make_shard(
            root / "images" / f"{shard:05d}.tar",
            [image_entry(f"{shard:05d}{i:04d}", 256, 192 if i % 2 else 256, seed=i) for i in range(5)],
        )
    encode(root / "images", root / "latents", EncodeConfig(mask_variants=2, seed=3, **ENCODE))
    return root


def test_masked_image_latents_equal_the_vae_on_the_masked_pixels(inpaint):
    manifest = read_manifest(inpaint / "latents")
    assert manifest["inpainting"] == {"variants": 2, "mix": parse_mix(DEFAULT_MIX)}
    vae = load_vae("tiny")
    images = {
        s.key: s.image_bytes
        for shard in sorted((inpaint / "images").glob("*.tar"))
        for s in iter_image_shard(shard)
    }
    checked = 0
    for shard in sorted((inpaint / "latents").glob("*.tar")):
        for sample in iter_latent_shard(shard, manifest, verify=True):
            meta = sample["meta"]
            w, h = meta["bucket"]
            assert sample["masked_latent"].shape == (2, 4, h // 8, w // 8)
            assert sample["inpaint_mask"].shape == (2, 1, h // 8, w // 8)
            placement = Placement(
                tuple(meta["bucket"]),
                tuple(meta["original_size"]),
                tuple(meta["resized_size"]),
                tuple(meta["crop"]),
            )
            pixels = np.asarray(resize_and_crop(decode_image(images[sample["key"]]), placement), np.float32)
            for k in range(2):
                _, mask = variant_mask(3, shard.stem, sample["key"], k, h, w, manifest["inpainting"]["mix"])
                x = torch.from_numpy(pixels).permute(2, 0, 1)[None] / 127.5 - 1  # the recipe, by hand
                x = x * torch.from_numpy(~mask)[None, None].float()
                with torch.no_grad():
                    reference = vae.model.encode(x).latent_dist.mean[0].numpy()
                np.testing.assert_allclose(sample["masked_latent"][k], reference, atol=2e-3, rtol=1e-2)
                small = torch.nn.functional.interpolate(
                    torch.from_numpy(mask.astype(np.float32))[None, None], (h // 8, w // 8)
                )
                assert np.array_equal(sample["inpaint_mask"][k], small[0].numpy())
                checked += 1
    assert checked == 20


def test_mask_kinds_follow_the_mix_and_are_seeded():
    only = {kind: parse_mix(f"{kind}=1") for kind in ("rectangles", "ellipses", "strokes", "full")}
    for kind, mix in only.items():
        drawn = [variant_mask(0, "00000", f"k{i}", 0, 64, 96, mix) for i in range(20)]
        assert {k for k, _ in drawn} == {kind}
        cover = [m.mean() for _, m in drawn]
        if kind == "full":
            assert all(c == 1 for c in cover)
        else:
            assert all(0 < c < 1 for c in cover), (kind, cover)
    mix = parse_mix(DEFAULT_MIX)
    kinds = [variant_mask(1, "00000", f"k{i}", v, 32, 32, mix)[0] for i in range(200) for v in range(2)]
    assert 60 < kinds.count("full") < 140  # a quarter of 400
    a = variant_mask(5, "00001", "key", 1, 64, 64, mix)
    assert a[0] == variant_mask(5, "00001", "key", 1, 64, 64, mix)[0]
    assert np.array_equal(a[1], variant_mask(5, "00001", "key", 1, 64, 64, mix)[1])
    strokes = draw_mask("strokes", 64, 64, np.random.default_rng(0))
    assert strokes.dtype == bool and strokes.shape == (64, 64)
    assert latent_size_mask(np.ones((64, 32), bool), 8).shape == (1, 8, 4)


@pytest.mark.parametrize(
    "text", ["rectangles=1,circles=1", "full=-1", "full=nan", "strokes", "full=0", "full=1,full=1"]
)
def test_a_bad_mask_mix_names_the_option(text):
    with pytest.raises(InputError, match="--mask-mix"):
        parse_mix(text)


def test_inpainting_data_is_refused_with_flip_and_checked_by_verify(inpaint, tmp_path, run_cli):
    import shutil

    with pytest.raises(InputError, match="--mask-variants with --flip"):
        EncodeConfig(mask_variants=2, flip=True, **ENCODE).validate()
    result = run_cli("latents", "verify", inpaint / "latents")
    assert result.exit_code == 0, result.output
    tampered = tmp_path / "latents"
    shutil.copytree(inpaint / "latents", tampered)
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["inpainting"]["variants"] = 3  # the shards hold 2
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("latents", "verify", tampered)
    assert result.exit_code == 2, result.output
    assert "00000.tar: 5 bad_sample" in result.output and "00001.tar: 5 bad_sample" in result.output


def test_the_report_shows_each_samples_inpainting_masks(inpaint, tmp_path):
    import shutil

    from latentmill.report import build_report

    work = tmp_path / "work"
    shutil.copytree(inpaint / "images", work / "images")
    shutil.copytree(inpaint / "latents", work / "latents-128")
    page = build_report(work).read_text()
    section = report_section(page, "masks")
    assert (
        section.count(": inpainting mask 0") == 5 and section.count(": inpainting mask 1") == 5
    )  # a shard: 5
