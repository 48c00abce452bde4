"""Aspect buckets follow the kohya-ss / NovelAI scheme; assignment and crop bookkeeping are exact."""

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
        assert w * (h + 64) > resolution**2 or h + 64 > hi or (w, h) == (resolution, resolution) or (h, w) in buckets


def test_512_buckets_match_the_published_list():
    buckets = make_buckets(512)
    assert buckets[0] == (256, 1024) and buckets[-1] == (1024, 256)
    assert {(512, 512), (576, 448), (448, 576), (640, 384), (768, 320), (832, 256)} <= set(buckets)


@pytest.mark.parametrize("size, bucket", [
    ((1000, 1000), (512, 512)), ((1600, 900), (640, 384)), ((900, 1600), (384, 640)),
    ((3000, 700), (1024, 256)), ((640, 480), (576, 448)), ((4000, 1000), (1024, 256)),
])
def test_assignment_is_nearest_in_log_aspect(size, bucket):
    buckets = make_buckets(512)
    assert assign_bucket(*size, buckets) == bucket
    ratios = np.log([w / h for w, h in buckets])
    assert abs(np.log(bucket[0] / bucket[1]) - np.log(size[0] / size[1])) == pytest.approx(np.min(np.abs(ratios - np.log(size[0] / size[1]))))


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
