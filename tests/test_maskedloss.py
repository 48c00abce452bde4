"""Masked loss (kohya's alpha_mask): the alpha channel, or a packed NAME.mask.png, stored at latent size by
`encode --alpha-mask`, and `train --masked-loss` weighting each sample's error by it."""

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from latentmill.curate.encode import EncodeConfig, encode
from latentmill.curate.latentshards import iter_latent_shard, read_manifest
from latentmill.errors import InputError
from latentmill.train.loop import train
from tests.conftest import quick_train_config, report_section, tiny_clip_text_pipeline

ENCODE = dict(vae="tiny", resolution=128, bucket_min_side=64, bucket_max_side=256, step=32, workers=0)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _picture(width, height, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    """A folder of 12 pictures: cut-outs on a transparent background (alpha: a centred disc), plain JPEGs,
    and JPEGs with a NAME.mask.png beside them (white: the top half); packed, then encoded with masks."""
    from latentmill.curate.pack import PackConfig, pack_images

    root = tmp_path_factory.mktemp("masked")
    folder = root / "pictures"
    folder.mkdir()
    yy, xx = np.mgrid[0:192, 0:256]
    disc = (((xx - 128) ** 2 + (yy - 96) ** 2) < 70**2).astype(np.uint8) * 255
    for i in range(4):
        rgba = np.dstack([_picture(256, 192, i), disc])
        (folder / f"cut{i}.png").write_bytes(_png(rgba))
        (folder / f"plain{i}.jpg").write_bytes(_jpg(_picture(256, 192, 10 + i)))
        (folder / f"masked{i}.jpg").write_bytes(_jpg(_picture(256, 192, 20 + i)))
        top = np.zeros((192, 256), np.uint8)
        top[:96] = 255
        (folder / f"masked{i}.mask.png").write_bytes(_png(top))
    totals = pack_images(folder, root / "images", PackConfig(caption="a picture", shard_size=6))
    encode(root / "images", root / "latents", EncodeConfig(alpha_mask=True, flip=True, **ENCODE))
    encode(root / "images", root / "unmasked", EncodeConfig(**ENCODE))
    tiny_clip_text_pipeline(root / "text")
    return root, totals, {"cut": disc, "masked": top}


def _expected(mask: np.ndarray, meta: dict) -> np.ndarray:
    """The reference: the full-size mask resized and cropped as the sample's metadata says, then each 8 x 8
    block averaged."""
    width, height = meta["bucket"]
    top, left = meta["crop"]
    resized = Image.fromarray(mask).resize(
        tuple(meta["resized_size"]), Image.Resampling.LANCZOS, reducing_gap=3.0
    )
    pixels = np.asarray(resized.crop((left, top, left + width, top + height)), np.float32) / 255
    return pixels.reshape(height // 8, 8, width // 8, 8).mean(axis=(1, 3))[None]


def test_alpha_channels_and_packed_masks_are_stored_at_latent_size(masked):
    root, totals, masks = masked
    assert totals["packed"] == 12  # the .mask.png files are masks, not pictures
    manifest = read_manifest(root / "latents")
    assert manifest["has_mask"] is True
    seen = set()
    for shard in sorted((root / "latents").glob("*.tar")):
        for sample in iter_latent_shard(shard, manifest, verify=True):
            kind = re.match(r"[a-z]+", sample["meta"]["url"]).group()  # cut, plain or masked
            expected = _expected(masks[kind], sample["meta"]) if kind in masks else None
            w, h = sample["meta"]["bucket"]
            assert sample["mask"].shape == (1, h // 8, w // 8)
            if expected is None:  # no alpha, no mask file: every pixel learned
                assert (sample["mask"] == 1).all()
            else:
                np.testing.assert_allclose(sample["mask"], expected, atol=1e-3)  # float16 storage
                assert 0 < sample["mask"].mean() < 1
            seen.add(kind)
    assert seen == {"cut", "plain", "masked"}
    unmasked = read_manifest(root / "unmasked")
    assert not unmasked["has_mask"]
    sample = next(iter_latent_shard(next((root / "unmasked").glob("*.tar")), unmasked))
    assert "mask" not in sample


class _HalfOfInput(torch.nn.Module):
    """A stand-in U-Net whose prediction is half its input (the loss arithmetic is what is under test)."""

    def forward(self, noisy, timesteps, encoder_hidden_states=None):
        return type("Out", (), {"sample": noisy * 0.5})()


def test_the_masked_loss_is_the_squared_error_weighted_by_the_mask_over_its_mean():
    from latentmill.train.objective import Objective
    from latentmill.train.schedule import training_scheduler

    objective = Objective(training_scheduler("epsilon"))
    latents = torch.randn(3, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(3, 1, 8, 6, generator=torch.Generator().manual_seed(2))
    mask[2] = 0.0
    mask[2, :, :4] = 1.0  # one sample: its top half only
    got = objective.loss(_HalfOfInput(), latents, None, [{}] * 3, mask, torch.Generator().manual_seed(7))
    # by hand, with the same draws in the same order: noise, then timesteps
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (3,), generator=generator)
    alphas = objective.schedule.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = alphas.sqrt() * latents + (1 - alphas).sqrt() * noise
    error = (noisy * 0.5 - noise) ** 2
    per_sample = [(error[i] * mask[i]).sum() / (mask[i].sum() * 4) for i in range(3)]
    assert torch.allclose(got, torch.stack(per_sample).mean(), rtol=1e-5)
    ones = objective.loss(
        _HalfOfInput(), latents, None, [{}] * 3, torch.ones(3, 1, 8, 6), torch.Generator().manual_seed(7)
    )
    plain = objective.loss(_HalfOfInput(), latents, None, [{}] * 3, None, torch.Generator().manual_seed(7))
    assert torch.allclose(ones, plain, rtol=1e-6)  # images without alpha are unaffected


def _config(root, run, **overrides):
    return quick_train_config(root, run, **({"model": "tiny", "masked_loss": True} | overrides))


def test_masked_training_resumes_exactly_and_needs_masks(masked, tmp_path):
    from safetensors.torch import load_file

    root, _, _ = masked
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_config(root, straight, steps=4, checkpoint_every=4))
    train(_config(root, resumed, steps=2, checkpoint_every=2))
    train(_config(root, resumed, steps=4, checkpoint_every=2, resume=True))
    a, b = (load_file(r / "checkpoints" / "step-0000004" / "unet.safetensors") for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [
        [json.loads(line)["loss"] for line in (r / "log.jsonl").read_text().splitlines()]
        for r in (straight, resumed)
    ]
    assert logs[0] == logs[1]
    unmasked = tmp_path / "unmasked-run"
    train(_config(root, unmasked, steps=4, checkpoint_every=4, masked_loss=False))
    plain_log = [json.loads(line)["loss"] for line in (unmasked / "log.jsonl").read_text().splitlines()]
    assert plain_log != logs[0]  # the masks change what is learned
    with pytest.raises(
        InputError,
        match=r"--masked-loss: .*unmasked hold\(s\) no loss masks; encode with `latentmill encode --alpha-mask`",
    ):
        train(_config(root, tmp_path / "x", shards=str(root / "unmasked"), steps=1))


def test_the_report_shows_the_stored_loss_masks(masked, tmp_path):
    import shutil

    from latentmill.report import build_report

    root, _, _ = masked
    work = tmp_path / "work"
    shutil.copytree(root / "images", work / "images")
    shutil.copytree(root / "latents", work / "latents-128")
    page = build_report(work).read_text()
    section = report_section(page, "masks")
    assert "latents-128: white is learned" in section
    assert section.count('alt="mask"') == 6 and section.count(": loss mask") == 6  # the first 6 samples
    shutil.rmtree(work / "latents-128")
    shutil.copytree(root / "unmasked", work / "latents-128")
    assert '<section id="masks">' not in build_report(work).read_text()  # no masks, no section
