"""A real Ray cluster on one machine: a head (`ray start --head`) and a second node (`ray start --address`),
each with its own --temp-dir, sharing no folder with the driver: stage inputs and outputs live in the
loopback S3 server. Only the processes these tests start are stopped."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.test_storage import _digests, _images, _upload

pytestmark = pytest.mark.slow  # starts a two-node cluster

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_under(folder: str):
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(folder in part for part in process.info["cmdline"] or []):
                yield process
        except psutil.Error:
            continue


class Cluster:
    def __init__(self, env: dict):
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # short temp dirs: Ray's Unix socket paths must stay under 108 characters
        self.head_dir, self.node_dir = tempfile.mkdtemp(prefix="lmh"), tempfile.mkdtemp(prefix="lmn")
        self.env = env
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats"]
        self._start([RAY, "start", "--head", f"--port={self.port}", f"--temp-dir={self.head_dir}",
                     "--include-dashboard=false", *common])  # fmt: skip
        self._start([RAY, "start", f"--address={self.address}", f"--temp-dir={self.node_dir}", *common])

    def _start(self, command):
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    def second_raylet(self):
        return next(p for p in _processes_under(self.node_dir) if "raylet" in " ".join(p.cmdline()[:1]))

    def stop(self):
        for folder in (self.node_dir, self.head_dir):
            for process in _processes_under(folder):
                try:
                    process.send_signal(signal.SIGKILL)
                except Exception:
                    pass


@pytest.fixture
def cluster(s3_server):
    env = os.environ | {
        "RAY_AUTH_MODE": "disabled",
        "RAY_health_check_period_ms": "500",  # notice a lost node in seconds, not half a minute
        "RAY_health_check_failure_threshold": "3",
    }
    started = Cluster(env)
    yield started
    started.stop()


def _count_objects(url: str, suffix: str) -> int:
    import boto3

    bucket, prefix = url[len("s3://") :].split("/", 1)
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    return sum(1 for item in listed.get("Contents", []) if item["Key"].endswith(suffix))


def test_encode_on_two_nodes_from_s3_survives_losing_a_node_and_equals_a_local_run(tmp_path, bucket, cluster):
    local = _images(tmp_path / "images", shards=10, per_shard=6)
    _upload(local, f"{bucket}/images")
    args = [
        "--vae",
        "tiny",
        "--resolution",
        "256",
        "--batch-size",
        "1",
        "--torch-threads",
        "1",
    ]
    reference = subprocess.run(
        [sys.executable, "-m", "latentmill", "encode", str(local), "-o", str(tmp_path / "reference"), *args],
        capture_output=True, text=True,
    )  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = f"{bucket}/latents"
    run = subprocess.Popen(
        [sys.executable, "-m", "latentmill", "encode", f"{bucket}/images", "-o", out, *args,
         "--executor", "ray", "--ray-address", cluster.address, "--actors", "2"],
        env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while _count_objects(out, ".stats.json") < 3 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.poll() is None, "the encode ended before the node could be lost: " + run.stderr.read()[-2000:]
    cluster.second_raylet().send_signal(signal.SIGKILL)  # the second node is gone mid-run
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    assert _count_objects(out, ".stats.json") == 10
    assert _digests(out) == _digests(tmp_path / "reference")  # identical to the run on one machine
    nodes = re.search(r"shards by Ray node: (.*)", stdout).group(1)
    assert len(nodes.split(", ")) == 2, stdout  # shards ran on both nodes


def _weights(path) -> dict:
    from safetensors.torch import load

    return load(path.read_bytes())


def test_ray_train_on_two_nodes_loses_a_node_resumes_and_equals_torchrun(tmp_path, bucket, cluster):
    from latentmill.curate import storage
    from latentmill.curate.encode import EncodeConfig, encode
    from tests.conftest import image_entry, make_shard, tiny_clip_text_pipeline

    (tmp_path / "images").mkdir()
    for s in range(4):
        make_shard(
            tmp_path / "images" / f"{s:05d}.tar",
            [image_entry(f"{s:05d}{i:04d}", 256, 256 if i % 2 else 192, seed=i % 4) for i in range(8)],
        )
    tiny_clip_text_pipeline(tmp_path / "pipeline")  # caption embeddings stored: the workers need no encoder
    config = EncodeConfig(vae="tiny", resolution=128, step=32, bucket_min_side=64,
                          text_encoder=str(tmp_path / "pipeline"))  # fmt: skip
    encode(tmp_path / "images", tmp_path / "latents", config)
    _upload(tmp_path / "latents", f"{bucket}/latents")
    args = ["--model", "tiny", "--steps", "24", "--batch-size", "2", "--checkpoint-every", "6",
            "--log-every", "6", "--learning-rate", "1e-3"]  # fmt: skip
    torchrun = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "latentmill",
         "train", str(tmp_path / "latents"), "-o", str(tmp_path / "torchrun"), *args],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]

    run = f"{bucket}/runs/ray"
    process = subprocess.Popen(
        [sys.executable, "-m", "latentmill", "train", f"{bucket}/latents", "-o", run, *args, "--launcher", "ray",
         "--ray-address", cluster.address, "--num-workers", "2"],
        env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while _count_objects(f"{run}/checkpoints/step-0000006", "state.json") == 0 and process.poll() is None:
        assert time.monotonic() < deadline, "no first checkpoint"
        time.sleep(0.05)
    assert process.poll() is None, (
        "training ended before the node could be lost: " + process.stderr.read()[-3000:]
    )
    cluster.second_raylet().send_signal(signal.SIGKILL)  # a worker's node is gone mid-run
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-4000:]
    (tmp_path / "out.txt").write_text(stdout + stderr)
    assert "resuming" in stdout + stderr, "the workers were not restarted from a checkpoint"
    # rank 0's lines come through latentmill; the workers' and Ray's own actors' output does not
    assert "PlacementGroupCleaner" not in stdout + stderr and "(RayTrainWorker" not in stdout + stderr
    assert "train:" in stderr and "step" in stderr  # the live bar
    final = storage.location(f"{run}/checkpoints/step-0000024")
    local_copy = tmp_path / "ray-final"
    local_copy.mkdir()
    for name in ("unet.safetensors", "ema.safetensors"):
        final.fs.get_file((final / name).path, str(local_copy / name))
        ours = _weights(local_copy / name)
        theirs = _weights(tmp_path / "torchrun" / "checkpoints" / "step-0000024" / name)
        assert ours.keys() == theirs.keys()
        assert all((ours[k] == theirs[k]).all() for k in ours), f"{name} differs from torchrun's"
    ranks = [storage.location(f"{run}/ranks/rank-{r}.json").read_text() for r in range(2)]
    assert all('"world_size": 2' in text for text in ranks)
