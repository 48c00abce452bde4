"""Shared fixtures: a loopback image server, sample URL tables, and a CLI runner with real exit codes."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from latentmill.cli import cli
from latentmill.curate.imageserver import ImageServer, prerender, sample_rows

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub


# LAION's published predictor files, read from beside the project (never copied into it).
FIXTURES = Path(
    os.environ.get(
        "LATENTMILL_LAION_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "laion"
    )
)
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(),
    reason=f"LAION's published predictor files are not at {FIXTURES}: get sac+logos+ava1-l14-linearMSE.pth from "
    "christophschuhmann/improved-aesthetic-predictor and clip_autokeras_binary_nsfw.zip, "
    "clip_autokeras_nsfw_b32.zip from LAION-AI/CLIP-based-NSFW-Detector (or set LATENTMILL_LAION_FIXTURES)",
)


@pytest.fixture(scope="session")
def server():
    """One image server on 127.0.0.1 for the session, its sample images rendered up front."""
    with ImageServer(slow_s=4) as srv:
        prerender(row["URL"] for row in sample_rows(srv.url("")))
        yield srv


@pytest.fixture
def fresh_server():
    """A server of the test's own, for tests that count requests or hold responses."""
    with ImageServer(slow_s=4) as srv:
        yield srv


@pytest.fixture
def sample_table(server, tmp_path):
    """A LAION-like parquet of the server's sample URLs (good images and every failure route)."""
    rows = sample_rows(server.url(""))
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path, rows


def write_table(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


class Cli:
    """Invoke `latentmill` in-process; returns click's Result (exit_code, output)."""

    def __call__(self, *args: str):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


@pytest.fixture
def run_cli():
    return Cli()


def make_shard(path, entries):
    """A tar in img2dataset's layout: {key}.jpg/.txt/.json per sample; entries are (key, {ext: bytes})."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, files in entries:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def image_entry(key, width, height, seed=0, fmt="jpg", **encode_args):
    """One img2dataset-style sample of a synthetic picture."""
    import json

    from latentmill.curate import samples

    image, caption = samples.synthetic(seed, width, height)
    meta = json.dumps(
        {
            "url": f"https://example.com/{key}.{fmt}",
            "caption": caption,
            "AESTHETIC_SCORE": 5.5,
            "width": width,
            "height": height,
        }
    ).encode()
    return (key, {fmt: samples.encode(image, fmt, **encode_args), "txt": caption.encode(), "json": meta})


@pytest.fixture
def image_shards(tmp_path):
    """Two image shards of pictures at several sizes and aspect ratios."""
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = [(300, 300), (400, 240), (240, 400), (512, 256), (256, 512), (360, 280)]
    for shard in range(2):
        entries = [
            image_entry(f"{shard:05d}{i:04d}", w, h, seed=shard * 10 + i) for i, (w, h) in enumerate(sizes)
        ]
        make_shard(folder / f"{shard:05d}.tar", entries)
    return folder


def kill_when_done(process, marker):
    """SIGKILL `process`'s group as soon as `marker` exists (or the process ends by itself)."""
    import os
    import signal
    import subprocess

    try:
        while process.poll() is None and not marker.exists():
            try:  # wake on exit, or every 10 ms to look for the marker
                process.wait(timeout=0.01)
            except subprocess.TimeoutExpired:
                pass
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended by itself
            pass
        process.wait()


def tiny_clip_text_pipeline(folder):
    """A folder with text_encoder/ (a tiny transformers CLIPTextModel, 32-d) and tokenizer/, as pipelines have:
    the one the demo's `clip-tiny` uses."""
    from latentmill.curate.textencoder import write_tiny_clip_pipeline

    return write_tiny_clip_pipeline(folder)


class FlakyStage:
    """A shard stage for executor tests: writes {shard}.stats.json, and always fails on the shard `fail`."""

    def __init__(self, folder, fail):
        self.folder, self.fail = folder, fail

    def setup(self):
        return None

    def stats_path(self, shard):
        return self.folder / f"{shard.stem}.stats.json"

    def process(self, shard, state):
        import json

        if shard.stem == self.fail:
            raise ValueError(f"shard {shard.stem} is broken")
        stats = {"shard": shard.stem}
        self.stats_path(shard).write_text(json.dumps(stats))
        return stats


def hostile_metadata_entries(prefix="77"):
    """Samples with good images and hostile metadata: (key, files) pairs, the image always decodable."""
    import json

    hostile = [
        b"[1, 2, 3]",
        b'"just a string"',
        b"null",
        b"{not json",
        b"[" * 5000 + b"]" * 5000,
        json.dumps({"caption": ["a", "list"], "url": {"an": "object"}}).encode(),
        json.dumps(
            {"original_width": "wide", "original_height": 10**30, "width": -4, "height": True}
        ).encode(),
        json.dumps({"url": "https://example.com/x.jpg", "extra": "x" * 200_000}).encode(),
    ]
    entries = []
    for i, meta in enumerate(hostile):
        key, files = image_entry(f"{prefix}{i:07d}", 160, 120, seed=i)
        files = {"jpg": files["jpg"], "json": meta}
        if i == 0:
            files["txt"] = b"caption \xff\xfe not utf-8"
        entries.append((key, files))
    return entries


class DyingStage:
    """Wraps a shard stage: the actor processing shard `die_on` kills its own process once (a marker file
    records it), as an out-of-memory kill or a lost node would."""

    def __init__(self, stage, die_on, marker):
        self.stage, self.die_on, self.marker = stage, die_on, marker

    def setup(self):
        return self.stage.setup()

    def stats_path(self, shard):
        return self.stage.stats_path(shard)

    def process(self, shard, state):
        import os

        if shard.stem == self.die_on and not self.marker.exists():
            self.marker.touch()
            os._exit(1)
        return self.stage.process(shard, state)


class S3Server:
    """moto's S3 server on 127.0.0.1 (a real HTTP endpoint reached through s3fs), counting the requests
    that write (PUT, POST, DELETE) so tests can tell a re-run that wrote nothing."""

    def __init__(self):
        import logging

        from moto.moto_server.threaded_moto_server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.writes: list[tuple[str, str]] = []
        server = self

        class Counting(ThreadedMotoServer):
            def _server_entry(self):
                from moto.moto_server.threaded_moto_server import MotoRequestHandler
                from moto.server import DomainDispatcherApplication, create_backend_app
                from werkzeug.serving import make_server

                app = DomainDispatcherApplication(create_backend_app)

                def counting(environ, start_response):
                    if environ["REQUEST_METHOD"] in ("PUT", "POST", "DELETE"):
                        server.writes.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")))
                    return app(environ, start_response)

                self._server = make_server(
                    self._ip_address, self._port, counting, True, request_handler=MotoRequestHandler
                )
                self._server_ready_event.set()
                self._server.serve_forever()

        self._server = Counting(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.endpoint = "http://{}:{}".format(*self._server.get_host_and_port())
        self._buckets = 0

    def bucket(self) -> str:
        """A new empty bucket (moto's state lives as long as the server)."""
        import boto3

        self._buckets += 1
        name = f"lm-test-{self._buckets}"
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return name

    def stop(self):
        self._server.stop()


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server():
    """The loopback S3 server for the session, with the environment a user sets (AWS_ENDPOINT_URL and
    keys) so s3fs, subprocesses and Ray workers started by the tests all reach it."""
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    server = S3Server()
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=server.endpoint)
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def bucket(s3_server):
    """s3://NAME of a fresh bucket on the loopback S3 server."""
    return f"s3://{s3_server.bucket()}"


def report_section(page: str, section: str) -> str:
    """The HTML of one section of a report page (`<section id=...>` to its end)."""
    start = page.index(f'<section id="{section}">')
    return page[start : page.index("</section>", start)]


# small latents for training tests: 64 px pictures, the tiny VAE, buckets of 32 px steps
SMALL_ENCODE = dict(vae="tiny", resolution=64, bucket_min_side=32, bucket_max_side=128, step=32, workers=0)


def small_image_shards(folder, shards=2, per_shard=6):
    """`shards` image shards of 64 px synthetic pictures, keys SSSSSIIII."""
    folder.mkdir(parents=True)
    for shard in range(shards):
        make_shard(
            folder / f"{shard:05d}.tar",
            [image_entry(f"{shard:05d}{i:04d}", 64, 64, seed=i) for i in range(per_shard)],
        )
    return folder


def quick_train_config(root, run, **settings):
    """A TrainConfig of a test: ROOT/latents and the text pipeline ROOT/text, 4 samples a batch, one warm-up
    step, every step logged, checkpoints only where a test asks."""
    from latentmill.train.config import TrainConfig

    base = dict(
        shards=str(root / "latents"),
        output=str(run),
        text_encoder=str(root / "text"),
        batch_size=4,
        learning_rate=1e-3,
        warmup_steps=1,
        checkpoint_every=1000,
        log_every=1,
    )
    return TrainConfig(**(base | settings))
