"""Aspect buckets follow the kohya-ss / NovelAI scheme; assignment and crop bookkeeping are exact."""

import math

import numpy as np
import pytest
from PIL import Image

from latentmill.curate.buckets import assign_bucket, make_buckets, needed_upscale, place, resize_and_crop


def scheme(resolution, min_side, max_side, step):
    """The scheme written out independently: every (w, h) on the step grid it includes."""
    area = resolution * resolution
    expected = {(resolution, resolution)}
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, area // w // step * step)
        if h >= min_side:
            expected |= {(w, h), (h, w)}
    return expected


@pytest.mark.parametrize("resolution, lo, hi", [(512, 256, 1024), (1024, 512, 2048)])
def test_bucket_lists_follow_the_scheme(resolution, lo, hi):
    buckets = make_buckets(resolution, lo, hi, 64)
    assert set(buckets) == scheme(resolution, lo, hi, 64) and len(buckets) == len(set(buckets))
    assert (resolution, resolution) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= resolution**2
        assert lo <= min(w, h) and max(w, h) <= hi
        assert (h, w) in buckets
    # every bucket is as tall as the area allows: one more step would break the area or the side limit
    for w, h in buckets:
        assert (
            w * (h + 64) > resolution**2
            or h + 64 > hi
            or (w, h) == (resolution, resolution)
            or (h, w) in buckets
        )


def test_512_buckets_match_the_published_list():
    buckets = make_buckets(512)
    assert buckets[0] == (256, 1024) and buckets[-1] == (1024, 256)
    assert {(512, 512), (576, 448), (448, 576), (640, 384), (768, 320), (832, 256)} <= set(buckets)


@pytest.mark.parametrize(
    "size, bucket",
    [
        ((1000, 1000), (512, 512)),
        ((1600, 900), (640, 384)),
        ((900, 1600), (384, 640)),
        ((3000, 700), (1024, 256)),
        ((640, 480), (576, 448)),
        ((4000, 1000), (1024, 256)),
    ],
)
def test_assignment_is_nearest_in_log_aspect(size, bucket):
    buckets = make_buckets(512)
    assert assign_bucket(*size, buckets, "log") == bucket
    ratios = np.log([w / h for w, h in buckets])
    assert abs(np.log(bucket[0] / bucket[1]) - np.log(size[0] / size[1])) == pytest.approx(
        np.min(np.abs(ratios - np.log(size[0] / size[1])))
    )


def test_crop_bookkeeping_maps_back_to_source_pixels():
    rng = np.random.default_rng(0)
    block = 50  # a source of flat 50-px blocks: away from block edges, resampling keeps the colour
    colors = rng.integers(0, 255, (300 // block, 500 // block, 3), dtype=np.uint8)
    source = np.repeat(np.repeat(colors, block, axis=0), block, axis=1)  # h=300, w=500
    image = Image.fromarray(source)
    for placement in (place(500, 300, (256, 256)), place(500, 300, (384, 192), rng=np.random.default_rng(3))):
        out = np.asarray(resize_and_crop(image, placement)).astype(int)
        bw, bh = placement.bucket
        assert out.shape == (bh, bw, 3) and placement.original_size == (500, 300)
        top, left = placement.crop
        checked = 0
        for y in range(0, bh, 7):
            for x in range(0, bw, 7):
                sx, sy = (x + left + 0.5) / placement.scale, (y + top + 0.5) / placement.scale
                if min(sx % block, block - sx % block, sy % block, block - sy % block) < 8:
                    continue
                assert np.abs(out[y, x] - source[int(sy), int(sx)]).max() <= 3
                checked += 1
        assert checked > 100
    centred = place(500, 300, (256, 256))
    assert centred.resized_size == (427, 256) and centred.crop == (0, 85)


def test_random_crops_repeat_with_the_same_seed_and_vary_across_seeds():
    a = [place(800, 300, (512, 512), rng=np.random.default_rng(s)).crop for s in range(5)]
    b = [place(800, 300, (512, 512), rng=np.random.default_rng(s)).crop for s in range(5)]
    assert a == b and len(set(a)) > 1


def test_upscale_needed_is_reported_for_small_images():
    assert needed_upscale(256, 256, (512, 512)) == 2.0
    assert needed_upscale(1024, 1024, (512, 512)) == 0.5


def kohya_bucket_resolutions(max_area: int, min_size: int, max_size: int, divisible: int) -> list:
    """kohya-ss sd-scripts' make_bucket_resolutions, from its description: the square of the largest multiple of
    `divisible` within sqrt(area), and for each width from min to max size in steps the largest height
    (a multiple of `divisible`, at most max size) within the area, with its transpose; sorted."""
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos |= {(width, height), (height, width)}
    return sorted(resos)


def kohya_select(width: int, height: int, resos: list) -> tuple:
    """kohya's BucketManager.select_bucket, from its description: the image's own size if it is a bucket, else
    argmin of |bucket w/h - image w/h| over the sorted buckets (numpy argmin: the first of ties); the scale
    fits the side that binds and both sides are rounded to the nearest pixel."""
    if (width, height) in set(resos):
        reso = (width, height)
    else:
        ratios = np.array([w / h for w, h in resos])
        reso = resos[int(np.abs(ratios - width / height).argmin())]
    if width / height > reso[0] / reso[1]:
        scale = reso[1] / height
    else:
        scale = reso[0] / width
    return reso, (int(width * scale + 0.5), int(height * scale + 0.5))


@pytest.mark.parametrize("resolution, step", [(512, 64), (768, 64), (1024, 64), (256, 32)])
def test_kohya_rule_matches_kohyas_bucket_manager_on_random_sizes(resolution, step):
    rng = np.random.default_rng(resolution)
    buckets = make_buckets(resolution, step=step)
    resos = kohya_bucket_resolutions(resolution * resolution, resolution // 2, resolution * 2, step)
    assert sorted(buckets) == resos
    sizes = [(int(w), int(h)) for w, h in rng.integers(64, 4096, (3000, 2))]
    sizes += [b for b in buckets]  # exact bucket sizes take their own bucket
    differ = 0
    for w, h in sizes:
        expected_bucket, expected_resized = kohya_select(w, h, resos)
        bucket = assign_bucket(w, h, buckets, "kohya")
        assert bucket == expected_bucket, (w, h)
        placement = place(w, h, bucket, rule="kohya")
        assert placement.resized_size == (
            max(bucket[0], expected_resized[0]),
            max(bucket[1], expected_resized[1]),
        ), (w, h)
        differ += assign_bucket(w, h, buckets, "log") != bucket
    assert 0 < differ / len(sizes) < 0.1  # the two rules disagree near bucket boundaries only


def test_unknown_bucket_rule_is_refused(tmp_path, run_cli):
    with pytest.raises(ValueError, match="kohya or log"):
        assign_bucket(100, 100, make_buckets(512), "nearest")
    assert run_cli("buckets", "--bucket-assign", "nearest").exit_code == 2
