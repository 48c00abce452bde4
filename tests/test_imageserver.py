"""The loopback image server serves what its routes promise."""

import io
import urllib.error
import urllib.request

import pytest
from PIL import Image


def fetch(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.headers, response.read()


@pytest.mark.parametrize(
    "path, fmt, mode, size",
    [
        ("/gen/1/320x200.jpg", "JPEG", "RGB", (320, 200)),
        ("/photo/astronaut/200x320.png?mode=RGBA", "PNG", "RGBA", (200, 320)),
        ("/photo/coffee/256x256.jpg?mode=L", "JPEG", "L", (256, 256)),
        ("/photo/chelsea/256x192.jpg?mode=CMYK", "JPEG", "CMYK", (256, 192)),
        ("/gen/2/300x300.webp", "WEBP", "RGB", (300, 300)),
    ],
)
def test_image_routes(server, path, fmt, mode, size):
    _, body = fetch(server.url(path))
    image = Image.open(io.BytesIO(body))
    assert (image.format, image.mode, image.size) == (fmt, mode, size)


def test_exif_rotated_and_noai_routes(server):
    _, body = fetch(server.url("/gen/3/300x200.jpg?orientation=6"))
    assert Image.open(io.BytesIO(body)).getexif()[0x0112] == 6
    headers, _ = fetch(server.url("/gen/3/300x200.jpg?noai=1"))
    assert headers["X-Robots-Tag"] == "noai"


def test_photo_views_are_distinct_crops_and_sample_rows_use_them(server):
    import numpy as np

    from latentmill.curate.imageserver import sample_rows

    def pixels(path):
        return np.asarray(Image.open(io.BytesIO(fetch(server.url(path))[1])).convert("RGB"), dtype=float)

    centre, view1, view1_again, view2 = (
        pixels(f"/photo/coffee/256x256.png{q}") for q in ("", "?view=1", "?view=1", "?view=2")
    )
    assert view1.shape == centre.shape == (256, 256, 3)
    assert np.array_equal(view1, view1_again)  # seeded: the same URL, the same bytes
    assert np.abs(view1 - centre).mean() > 5 and np.abs(view1 - view2).mean() > 5
    rows = sample_rows(server.url(""), n_synthetic=4, failures=False, photo_views=3)
    photos = [r["URL"] for r in rows if "/photo/" in r["URL"]]
    assert len(photos) == 36 and len(set(photos)) == 36 and sum("view=2" in u for u in photos) == 12


def test_failure_routes(server):
    for path, code in (("/fail/404", 404), ("/fail/500", 500), ("/photo/nope/10x10.jpg", 404)):
        with pytest.raises(urllib.error.HTTPError) as err:
            fetch(server.url(path))
        assert err.value.code == code
    headers, body = fetch(server.url("/fail/html.jpg"))
    assert headers["Content-Type"] == "image/jpeg" and body.startswith(b"<!doctype html>")
    assert fetch(server.url("/fail/empty.jpg"))[1] == b""
    bomb = fetch(server.url("/fail/bomb.png"))[1]
    assert len(bomb) < 10_000 and int.from_bytes(bomb[16:20], "big") == 60_000  # IHDR width
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb))
    with pytest.raises(TimeoutError):
        fetch(server.url("/fail/slow.jpg"), timeout=0.5)


def test_server_listens_on_loopback_only(server):
    assert server.url("/").startswith("http://127.0.0.1:")
