"""A loopback HTTP server of test images and failure cases, for tests, benchmarks and the demo.

Routes (GET):
  /gen/{seed}/{w}x{h}.{jpg|png|webp}     a seeded synthetic picture
  /photo/{name}/{w}x{h}.{jpg|png|webp}   a scikit-image photograph (see samples.PHOTOS)
      query: mode=RGB|RGBA|L|CMYK, orientation=1..8 (EXIF, JPEG), wm=1 (watermarked), noai=1
      (sends `X-Robots-Tag: noai`), view=K (photos: a seeded zoomed-in crop instead of the centre)
  /fail/404, /fail/500, /fail/slow.jpg (answers after `slow_s`), /fail/truncated.jpg,
  /fail/html.jpg (HTML sent as image/jpeg), /fail/empty.jpg (zero bytes), /fail/bomb.png
  (a PNG declaring 60000x60000 pixels)
  /hold/{image route}    blocks until `release_holds()` (signals `held` on arrival), then the image
  /flaky/{id}/{image route}  answers 503 the first time per id, then the image
  /redirect?to=URL       a 302 redirect to URL (for the private-address guard's tests)
Every request is counted in `requests`.
It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from latentmill.curate import samples

CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_IMAGE_ROUTE = re.compile(r"^/(gen|photo)/([A-Za-z0-9_]+)/(\d+)x(\d+)\.(jpg|png|webp)$")


@lru_cache(maxsize=4096)
def render(
    kind: str,
    name: str,
    width: int,
    height: int,
    fmt: str,
    mode: str,
    orientation: int,
    watermark: bool,
    view: int = 0,
) -> bytes:
    """The bytes served for an image route (cached: the same URL always gets the same bytes)."""
    if kind == "gen":
        image, _ = samples.synthetic(int(name), width, height)
    else:
        image = samples.photo(name, width, height, view)
    if watermark:
        image = samples.add_watermark(image)
    return samples.encode(image, fmt, mode=mode, orientation=orientation or None)


def _image_route(path_and_query: str):
    """(render args, headers) for an image route, or None for anything else."""
    parts = urlsplit(path_and_query)
    match = _IMAGE_ROUTE.match(parts.path)
    if not match:
        return None
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    kind, name, w, h, fmt = match.groups()
    if kind == "photo" and name not in samples.PHOTOS:
        return None
    args = (
        kind,
        name,
        int(w),
        int(h),
        fmt,
        query.get("mode", "RGB"),
        int(query.get("orientation", 0)),
        query.get("wm") == "1",
        int(query.get("view", 0)),
    )
    return args, ({"X-Robots-Tag": "noai"} if query.get("noai") == "1" else {})


def prerender(urls) -> None:
    """Render the images behind `urls` now, so that serving them later is instant (no timeouts in tests)."""
    for url in urls:
        parts = urlsplit(url)
        route = _image_route(parts.path + (f"?{parts.query}" if parts.query else ""))
        if route:
            render(*route[0])


class _Handler(BaseHTTPRequestHandler):
    server_version = "latentmill-test"

    def log_message(self, *args):  # quiet: tests read results, not access logs
        pass

    def _send(self, status: int, body: bytes, content_type: str = "image/jpeg", headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.server.count_request(self.path)
        path = self.path
        if path.startswith("/hold/"):
            self.server.held.set()
            self.server.holds_open.wait()
            path = path[len("/hold") :]
        elif path.startswith("/redirect?"):
            target = parse_qs(urlsplit(path).query).get("to", [""])[0]
            return self._send(302, b"", "text/plain", {"Location": target})
        elif path.startswith("/flaky/"):
            flaky_id, _, rest = path[len("/flaky/") :].partition("/")
            if self.server.first_visit(flaky_id):
                return self._send(503, b"try again later", "text/plain")
            path = "/" + rest
        route = _image_route(path)
        try:
            if route:
                args, headers = route
                return self._send(200, render(*args), CONTENT_TYPES[args[4]], headers)
            return self._failure(urlsplit(self.path).path)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeouts do this): nothing to answer

    def _failure(self, path: str):
        if path == "/fail/500":
            return self._send(500, b"internal error", "text/plain")
        if path == "/fail/slow.jpg":
            self.server.release.wait(self.server.slow_s)
            return self._send(200, render("gen", "1", 64, 64, "jpg", "RGB", 0, False))
        if path == "/fail/truncated.jpg":
            return self._send(200, samples.truncated_jpeg())
        if path == "/fail/html.jpg":
            return self._send(200, b"<!doctype html><html><body>Not found, sorry</body></html>")
        if path == "/fail/empty.jpg":
            return self._send(200, b"")
        if path == "/fail/bomb.png":
            return self._send(200, samples.decompression_bomb(), "image/png")
        return self._send(404, b"not found", "text/plain")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, slow_s: float):
        super().__init__(address, _Handler)
        self.slow_s = slow_s
        self.release = threading.Event()  # set at shutdown: slow responses finish at once
        self.held = threading.Event()  # a /hold/ request has arrived
        self.holds_open = threading.Event()
        self.requests: list[str] = []
        self._visited: set[str] = set()
        self._lock = threading.Lock()

    def count_request(self, path: str) -> None:
        with self._lock:
            self.requests.append(path)

    def first_visit(self, name: str) -> bool:
        with self._lock:
            first = name not in self._visited
            self._visited.add(name)
            return first


class ImageServer:
    """Run the image server on 127.0.0.1 in a background thread: `with ImageServer() as server: server.url(...)`."""

    def __init__(self, port: int = 0, slow_s: float = 5.0):
        self._httpd = _Server(("127.0.0.1", port), slow_s)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="image-server", daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def requests(self) -> list[str]:
        """Paths requested so far, in arrival order."""
        return list(self._httpd.requests)

    @property
    def held(self) -> threading.Event:
        return self._httpd.held

    def release_holds(self) -> None:
        self._httpd.holds_open.set()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> ImageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.release.set()
        self._httpd.holds_open.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# A LAION-like URL table over the server's routes, with the outcome each row should have.

FAILURES = {  # path -> the reason latentmill's download summary gives it
    "/fail/404": "http_404",
    "/fail/500": "http_500",
    "/fail/slow.jpg": "timeout",
    "/fail/html.jpg": "undecodable",
    "/fail/empty.jpg": "undecodable",
    "/fail/bomb.png": "too_large",
    "/fail/truncated.jpg": "undecodable",
}


def sample_rows(
    base_url: str, n_synthetic: int = 24, seed: int = 0, failures: bool = True, photo_views: int = 1
) -> list[dict]:
    """Rows of a LAION-like URL table served by an ImageServer at `base_url`.

    Columns: URL, TEXT, WIDTH, HEIGHT, pwatermark, punsafe, similarity, AESTHETIC_SCORE, plus
    `expect` ("ok" or the reason the row should fail) and `variant` (what the URL exercises).
    `photo_views` > 1 adds zoomed-in crops of each photograph (`view=K`) for a larger labelled sample.
    Photographs get higher aesthetic scores than synthetic pictures; watermarked variants get high
    pwatermark, so that metadata filters and the demo's heads have something real to find.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    rows: list[dict] = []

    def add(path, caption, w, h, expect="ok", variant="plain", watermark=False, aesthetic=5.0):
        rows.append(
            {
                "URL": base_url + path,
                "TEXT": caption,
                "WIDTH": w,
                "HEIGHT": h,
                "pwatermark": float(rng.uniform(0.8, 0.99) if watermark else rng.uniform(0.01, 0.2)),
                "punsafe": float(rng.uniform(0.0, 0.05)),
                "similarity": float(rng.uniform(0.28, 0.4)),
                "AESTHETIC_SCORE": float(aesthetic + rng.normal(0, 0.3)),
                "expect": expect,
                "variant": variant,
            }
        )

    sizes = [(512, 512), (640, 448), (448, 640), (768, 384), (384, 768), (576, 512), (320, 320), (704, 320)]
    variants = [
        ("jpg", "", "plain"),
        ("png", "mode=RGBA", "png_alpha"),
        ("jpg", "mode=L", "grayscale"),
        ("jpg", "mode=CMYK", "cmyk"),
        ("webp", "", "webp"),
        ("jpg", "orientation=6", "exif_rotated"),
    ]
    photos = [
        (view, name, caption) for view in range(photo_views) for name, caption in samples.PHOTOS.items()
    ]
    for i, (view, name, caption) in enumerate(photos):
        w, h = sizes[i % len(sizes)]
        fmt, query, variant = variants[i % len(variants)]
        watermark = i % 4 == 3
        q = "&".join(x for x in (query, "wm=1" if watermark else "", f"view={view}" if view else "") if x)
        add(
            f"/photo/{name}/{w}x{h}.{fmt}" + (f"?{q}" if q else ""),
            caption,
            w,
            h,
            variant=variant,
            watermark=watermark,
            aesthetic=6.3,
        )
    for i in range(n_synthetic):
        w, h = sizes[(i + 3) % len(sizes)]
        fmt, query, variant = variants[i % len(variants)]
        watermark = i % 5 == 4
        _, caption = samples.synthetic(1000 + i, 8, 8)
        q = "&".join(x for x in (query, "wm=1" if watermark else "") if x)
        add(
            f"/gen/{1000 + i}/{w}x{h}.{fmt}" + (f"?{q}" if q else ""),
            caption,
            w,
            h,
            variant=variant,
            watermark=watermark,
            aesthetic=4.6,
        )
    if failures:
        add(
            "/gen/7/96x96.jpg",
            "a tiny thumbnail that is too small",
            96,
            96,
            expect="too_small",
            variant="small",
        )
        add(
            "/gen/8/512x512.jpg?noai=1",
            "an image whose server opts out of AI training",
            512,
            512,
            expect="opted_out",
            variant="noai",
        )
        for path, reason in FAILURES.items():
            add(path, f"a broken link ({reason})", 512, 512, expect=reason, variant=path.rsplit("/", 1)[-1])
    return rows
