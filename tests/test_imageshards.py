"""Reading image shards: samples with captions and metadata, damaged tars, images that do not decode."""

import io
import json

import pytest
from PIL import Image

from latentmill.curate import samples
from latentmill.curate.imageshards import (
    ShardReadStats,
    decode_image,
    inspect_image_shards,
    iter_image_shard,
)
from tests.conftest import make_shard


def good_entry(i):
    image, caption = samples.synthetic(i, 64, 48)
    meta = json.dumps({"url": f"https://x/{i}.jpg", "caption": caption}).encode()
    return (f"{i:09d}", {"jpg": samples.encode(image, "jpg"), "txt": caption.encode(), "json": meta})


def test_samples_carry_key_caption_meta_and_decode(tmp_path):
    shard = make_shard(tmp_path / "00000.tar", [good_entry(i) for i in range(5)])
    stats = ShardReadStats()
    got = list(iter_image_shard(shard, stats))
    assert [s.key for s in got] == [f"{i:09d}" for i in range(5)]
    assert got[2].caption == samples.synthetic(2, 64, 48)[1] and got[2].meta["url"] == "https://x/2.jpg"
    assert got[0].image().size == (64, 48)
    assert stats.as_dict() == {
        "samples": 5,
        "incomplete": 0,
        "duplicate_key": 0,
        "bad_metadata": 0,
        "damaged": False,
        "damage": "",
    }


def test_a_truncated_tar_yields_the_readable_samples_and_counts_the_rest(tmp_path):
    shard = make_shard(tmp_path / "00000.tar", [good_entry(i) for i in range(6)])
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * 0.6)])
    stats = ShardReadStats()
    got = list(iter_image_shard(shard, stats))
    assert 1 <= len(got) < 6
    assert stats.damaged and stats.incomplete == 1
    assert all(s.image().size == (64, 48) for s in got)


def test_key_order_reads_a_completion_ordered_shard_sorted_by_key(tmp_path):
    order = [3, 0, 5, 1, 4, 2]  # img2dataset writes in download-completion order
    shard = make_shard(tmp_path / "00000.tar", [good_entry(i) for i in order])
    assert [s.key for s in iter_image_shard(shard)] == [f"{i:09d}" for i in order]
    stats = ShardReadStats()
    got = list(iter_image_shard(shard, stats, key_order=True))
    assert [s.key for s in got] == [f"{i:09d}" for i in range(6)]
    assert got[4].caption == samples.synthetic(4, 64, 48)[1] and stats.samples == 6 and not stats.damaged

    data = shard.read_bytes()  # cut off: the stream reads what it can, in key order too, the damage counted
    shard.write_bytes(data[: int(len(data) * 0.6)])
    ordered, streamed = ShardReadStats(), ShardReadStats()
    assert [s.key for s in iter_image_shard(shard, ordered, key_order=True)] == sorted(
        s.key for s in iter_image_shard(shard, streamed)
    )
    assert ordered == streamed and 1 <= ordered.samples < 6


def test_a_sample_without_image_is_counted_as_incomplete(tmp_path):
    shard = make_shard(
        tmp_path / "00000.tar", [good_entry(0), ("000000001", {"txt": b"orphan caption"}), good_entry(2)]
    )
    report = inspect_image_shards(tmp_path)
    assert report["samples"] == 2 and report["incomplete"] == 1 and not report["damaged_shards"]
    assert shard.exists()


def test_undecodable_images_are_reported_by_key_and_reason(tmp_path):
    make_shard(
        tmp_path / "00000.tar",
        [
            good_entry(0),
            ("000000001", {"jpg": samples.truncated_jpeg()}),
            ("000000002", {"jpg": b"<html>not an image</html>"}),
            ("000000003", {"jpg": b""}),
            ("000000004", {"png": samples.decompression_bomb()}),
        ],
    )
    report = inspect_image_shards(tmp_path, decode=True)
    assert report["decode_errors"] == {
        "truncated": ["000000001"],
        "undecodable": ["000000002"],
        "empty": ["000000003"],
        "too_large": ["000000004"],
    }


@pytest.mark.parametrize("mode", ["RGBA", "L", "CMYK"])
def test_decode_converts_every_mode_to_rgb(mode):
    image = decode_image(
        samples.encode(samples.photo("astronaut", 80, 60), "png" if mode == "RGBA" else "jpg", mode=mode)
    )
    assert image.mode == "RGB" and image.size == (80, 60)


def test_alpha_is_composited_on_white():
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    buffer = io.BytesIO()
    transparent.save(buffer, "PNG")
    assert decode_image(buffer.getvalue()).getpixel((3, 3)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    data = samples.encode(samples.photo("astronaut", 120, 60), "jpg", orientation=6)
    assert Image.open(io.BytesIO(data)).size == (120, 60)
    assert decode_image(data).size == (60, 120)


def test_jpeg_draft_decodes_fewer_pixels_but_at_least_the_size_asked():
    data = samples.encode(samples.photo("retina", 1024, 1024), "jpg")
    image = decode_image(data, draft_size=(224, 224))
    assert 224 <= image.width < 1024


def test_images_inspect_command(tmp_path, run_cli):
    make_shard(tmp_path / "00000.tar", [good_entry(0), ("000000001", {"jpg": b"junk"})])
    result = run_cli("images", "inspect", tmp_path, "--decode")
    assert result.exit_code == 0
    assert "total: 2 samples" in result.output and "not decodable (undecodable): 1" in result.output
    assert run_cli("images", "inspect", tmp_path / "nothing").exit_code == 2


def test_a_16_bit_png_is_scaled_not_clipped():
    import io

    import numpy as np
    from PIL import Image

    from latentmill.curate.imageshards import decode_image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    data = io.BytesIO()
    Image.fromarray(ramp).save(data, "PNG")
    pixels = np.asarray(decode_image(data.getvalue()))
    assert pixels.shape == (64, 64, 3) and (pixels == 255).mean() < 0.01
    np.testing.assert_allclose(pixels[..., 0], ramp / 257.0, atol=0.51)
