"""A store that stops answering ends the command within its bound (exit 2 naming the endpoint), and a
re-run once it answers again resumes and ends identical. The store is moto's server on 127.0.0.1 behind a
loopback proxy that can go silent: it keeps accepting connections and never answers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

from latentmill.curate import storage
from tests.test_storage import _digests, _encode_cmd, _images, _S3Marker, _upload

# the bound shortened through the option users change it with (the default's two minutes are checked above)
FAST = [
    "--storage-option",
    'config_kwargs={"read_timeout": 2, "connect_timeout": 2, "retries": {"max_attempts": 1}}',
]
BOUND_S = 2 * 1 * (2 + 2) + 30  # tries x attempts x (connect + read), plus start-up and backoff


class SilentProxy:
    """127.0.0.1:PORT forwarding to `upstream` until `silence()`; then it accepts and never answers."""

    def __init__(self, upstream: tuple[str, int] | None):
        self.upstream, self.silent = upstream, upstream is None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def silence(self) -> None:
        self.silent = True

    def speak(self) -> None:
        self.silent = False

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            if self.silent:
                self.held.append(client)  # accepted, read, never answered
                continue
            server = socket.create_connection(self.upstream)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while self.silent:  # mid-transfer: the store stops answering
                    time.sleep(0.1)
                target.sendall(data)
        except OSError:
            pass


def test_the_bounds_are_on_every_s3_location_and_the_users_own_win(s3_server):
    fs = storage.location("s3://any-bucket/x").fs
    assert fs.config_kwargs["read_timeout"] == 15 and fs.config_kwargs["connect_timeout"] == 5
    assert fs.config_kwargs["retries"]["mode"] == "standard" and fs.retries == 2
    assert storage.S3_CLIENT["retries"] == {"max_attempts": 3, "mode": "standard"}  # botocore edits a copy
    assert storage.store_timeout() == 120  # "about two minutes" when a store never answers
    saved = storage.options()
    try:
        storage.set_options({"config_kwargs": {"read_timeout": 90}})
        fs = storage.location("s3://any-bucket/y").fs
        assert fs.config_kwargs["read_timeout"] == 90 and fs.config_kwargs["connect_timeout"] == 5
    finally:
        storage.set_options(saved)


def test_a_store_that_never_answers_ends_verify_and_encode_with_exit_2_naming_it(tmp_path, s3_server):
    silent = SilentProxy(None)
    env = os.environ | {"AWS_ENDPOINT_URL": silent.endpoint}
    for command in (
        ["latents", "verify", "s3://bucket/latents"],
        ["encode", "s3://bucket/images", "-o", "s3://bucket/latents", "--vae", "tiny"],
    ):
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "latentmill", *command, *FAST], capture_output=True,
                                text=True, env=env, timeout=BOUND_S + 60)  # fmt: skip
        took = time.monotonic() - started
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"the object store at {silent.endpoint} stopped answering" in result.stderr, result.stderr[
            -2000:
        ]
        assert "Traceback" not in result.stderr and took < BOUND_S, took


def test_a_store_silent_mid_encode_ends_it_and_a_rerun_ends_identical(tmp_path, bucket, s3_server):
    local = _images(tmp_path / "images", shards=4)
    _upload(local, f"{bucket}/images")
    subprocess.run(_encode_cmd(local, tmp_path / "reference"), check=True, capture_output=True)
    host, port = s3_server.endpoint.removeprefix("http://").split(":")
    proxy = SilentProxy((host, int(port)))
    env = os.environ | {"AWS_ENDPOINT_URL": proxy.endpoint}
    out = f"{bucket}/latents"
    process = subprocess.Popen([*_encode_cmd(f"{bucket}/images", out), *FAST], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    marker = _S3Marker(f"{out}/00000.stats.json")
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proxy.silence()
    started = time.monotonic()
    _, stderr = process.communicate(timeout=BOUND_S + 60)
    assert time.monotonic() - started < BOUND_S
    assert process.returncode == 2, stderr[-2000:]
    assert "stopped answering" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert not _S3Marker(f"{out}/manifest.json").exists(), "the encode finished before the store went silent"

    proxy.speak()
    again = subprocess.run([*_encode_cmd(f"{bucket}/images", out), *FAST], env=env, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert _digests(out) == _digests(tmp_path / "reference")
    assert json.loads(storage.location(f"{out}/manifest.json").read_text())["samples"] == 16


def test_a_tools_own_fsspec_clients_get_the_bounds_through_the_environment(tmp_path):
    """img2dataset opens its output with fsspec itself, in processes of its own: the bounds reach those
    filesystems through fsspec's configuration variable, so a silent store ends its writes too."""
    proxy = SilentProxy(None)  # accepts, never answers
    tight = 'config_kwargs={"read_timeout": 1, "connect_timeout": 1, "retries": {"max_attempts": 1}}'
    import copy

    import fsspec.config

    saved = copy.deepcopy(fsspec.config.conf)
    storage.set_options(dict([storage.parse_option(tight)]))
    try:
        env = os.environ | storage.storage_environment() | storage.bounded_fsspec_environment()
        assert fsspec.config.conf["s3"]["config_kwargs"]["read_timeout"] == 1  # forked children inherit it
    finally:
        storage.set_options({})
        fsspec.config.conf.clear()
        fsspec.config.conf.update(saved)
    env |= {"AWS_ENDPOINT_URL": proxy.endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    tool = "import fsspec; fs = fsspec.filesystem('s3'); fs.ls('bucket/images')"  # no options of its own
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", tool], env=env, capture_output=True, text=True, timeout=BOUND_S + 60
    )
    assert time.monotonic() - started < BOUND_S
    assert result.returncode != 0 and "Timeout" in result.stderr, result.stderr[-2000:]
    assert json.loads(env["FSSPEC_S3"])["config_kwargs"]["read_timeout"] == 1
