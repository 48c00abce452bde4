"""Ray at its edges: a wrong, malformed or unreachable cluster address, and more workers than the cluster
can place, end in seconds with exit 2 and a message naming the address and the fix, at every Ray entry
point. Every address here is on 127.0.0.0/8."""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from tests.conftest import image_entry, make_shard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_port():
    """A port on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.fixture
def http_port():
    """An HTTP/1 server on 127.0.0.1, as Ray's dashboard is."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    make_shard(folder / "00000.tar", [image_entry(f"0000000{i}", 64, 64, seed=i) for i in range(2)])
    return folder


def _entry_points(images, tmp_path, bucket, address, *more):
    """The same address given to every Ray entry point: shard stages, download, a recipe run, Ray Train."""
    table = tmp_path / "urls.parquet"
    import pandas as pd

    pd.DataFrame({"URL": ["http://127.0.0.1:9/a.jpg"], "TEXT": ["a"]}).to_parquet(table)
    return {
        "encode": ["encode", images, "-o", tmp_path / "latents", "--vae", "tiny", "--executor", "ray",
                   "--ray-address", address, *more],
        "download": ["download", table, "-o", tmp_path / "downloaded", "--distributor", "ray",
                     "--ray-address", address, *more],
        "run": ["run", "demo", "-w", tmp_path / "work", "--executor", "ray", "--ray-address", address, *more],
        "train": ["train", f"{bucket}/latents", "-o", f"{bucket}/runs/r", "--model", "tiny", "--launcher", "ray",
                  "--ray-address", address, *more],
    }  # fmt: skip


def _each_exits_2(run_cli, commands, expected: str, bound_s: float):
    for name, args in commands.items():
        started = time.monotonic()
        result = run_cli(*args)
        took = time.monotonic() - started
        assert result.exit_code == 2, (name, result.output[-2000:])
        assert expected in result.output, (name, result.output[-2000:])
        assert took < bound_s, (name, took)
        assert "Traceback" not in result.output


def test_an_address_where_nothing_listens_ends_at_once_at_every_entry_point(
    images, tmp_path, bucket, run_cli
):
    address = f"127.0.0.1:{_free_port()}"
    commands = _entry_points(images, tmp_path, bucket, address)
    _each_exits_2(run_cli, commands, f"--ray-address {address}: nothing listens at {address}", 20)
    assert not (tmp_path / "latents").exists() and not (tmp_path / "work").exists()


def test_a_port_that_never_answers_ends_within_the_timeout(images, tmp_path, bucket, run_cli, silent_port):
    address = f"127.0.0.1:{silent_port}"
    commands = _entry_points(images, tmp_path, bucket, address, "--ray-timeout", "2")
    _each_exits_2(run_cli, commands, f"no answer from {address} within 2 s", 25)


def test_the_dashboard_and_other_servers_are_told_apart_from_a_gcs(
    images, tmp_path, bucket, run_cli, http_port
):
    dashboard = _entry_points(images, tmp_path, bucket, f"http://127.0.0.1:{http_port}")
    _each_exits_2(run_cli, dashboard, "the Ray dashboard's address (HTTP)", 20)
    assert "127.0.0.1:6379" in run_cli(*dashboard["encode"]).output  # the address to give instead
    plain = _entry_points(images, tmp_path, bucket, f"127.0.0.1:{http_port}")
    _each_exits_2(run_cli, plain, "an HTTP server answers", 20)


@pytest.mark.parametrize(
    "address", ["::::", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:99999", "host:port", ":6379"]
)
def test_malformed_addresses_name_the_forms_to_give(images, tmp_path, bucket, run_cli, address):
    commands = _entry_points(images, tmp_path, bucket, address)
    _each_exits_2(run_cli, commands, "expected HOST:PORT (e.g. 10.0.0.5:6379), auto, or ray://HOST:10001", 20)


def test_auto_without_a_running_cluster_says_how_to_start_one(images, tmp_path, bucket, run_cli, monkeypatch):
    from ray._private.services import find_gcs_addresses

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not find_gcs_addresses(), "a Ray cluster is running on this machine"
    commands = _entry_points(images, tmp_path, bucket, "auto")
    _each_exits_2(run_cli, commands, "auto: no running Ray cluster found on this machine", 30)
    assert "ray start --head" in run_cli(*commands["encode"]).output


@pytest.fixture
def one_node():
    """A one-node loopback Ray cluster with 1 CPU and no GPU (`ray start --head`, its own temp dir)."""
    import psutil

    ray = shutil.which("ray", path=os.path.dirname(os.sys.executable))
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="lmr")  # short: Ray's Unix socket paths must stay under 108 characters
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    subprocess.run(
        [ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1",
         "--num-gpus", "0", "--temp-dir", temp, "--include-dashboard", "false", "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    yield f"127.0.0.1:{port}", env
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(temp in part for part in process.info["cmdline"] or []):
                process.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow  # a Ray head
def test_more_workers_than_the_cluster_holds_are_refused_before_a_placement_group(
    images, tmp_path, bucket, one_node, monkeypatch
):
    address, env = one_node
    cli = [os.sys.executable, "-m", "latentmill"]
    train = subprocess.run(
        [*cli, "train", f"{bucket}/latents", "-o", f"{bucket}/runs/r", "--model", "tiny", "--launcher", "ray",
         "--ray-address", address, "--num-workers", "3"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert train.returncode == 2, train.stderr[-3000:]
    assert "--num-workers 3: 3 x {'CPU': 1} do not fit the cluster" in train.stderr
    assert "at most 1 fit" in train.stderr and "PlacementGroupCleaner" not in train.stderr
    encode = subprocess.run(
        [*cli, "encode", images, "-o", tmp_path / "latents", "--vae", "tiny", "--executor", "ray",
         "--ray-address", address, "--actors", "4"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert encode.returncode == 2, encode.stderr[-3000:]
    assert "--actors 4: 4 x {'CPU': 1} do not fit the cluster" in encode.stderr


def _statuses(*states):
    """A cluster's successive (bundles that fit, nodes launching) as check_fits polls it."""
    replies = iter(states)
    last = [states[-1]]

    def status():
        last[0] = next(replies, last[0])
        return (*last[0], "{'CPU': 1.0} on 1 node(s)")

    return status


def test_an_autoscaling_cluster_is_waited_for_within_its_bound_and_a_static_one_is_not(monkeypatch):
    import time

    from latentmill.curate import raycluster
    from latentmill.errors import InputError

    monkeypatch.setattr(raycluster, "SCALE_GRACE_S", 0.3)
    monkeypatch.setattr(raycluster, "_request", lambda count, need: None)
    lines = []
    need = {"CPU": 1}
    # nodes start, then the work fits: it goes on, having said what it waited for
    raycluster.check_fits(
        3, need, "--actors 3", "fix", wait_s=30, log=lines.append, status=_statuses((1, 2), (2, 1), (3, 0))
    )
    assert lines and "waiting for the cluster to scale (1 of 3 fit, 2 node(s) starting" in lines[0]
    # nothing launches: refused after the grace, not after the wait
    started = time.monotonic()
    with pytest.raises(InputError, match=r"3 x \{'CPU': 1\} do not fit the cluster.*at most 1 fit\. fix"):
        raycluster.check_fits(3, need, "--actors 3", "fix", wait_s=600, status=_statuses((1, 0)))
    assert time.monotonic() - started < 5
    # nodes keep starting but never enough: refused at the bound, saying so
    started = time.monotonic()
    with pytest.raises(InputError, match=r"still scaling after 1 s \(--ray-scale-wait\)"):
        raycluster.check_fits(3, need, "--actors 3", "fix", wait_s=1, status=_statuses((1, 1)))
    assert time.monotonic() - started < 5
