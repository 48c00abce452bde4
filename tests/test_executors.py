"""The Ray executor gives the same shards as the local one (a Ray instance on 127.0.0.1)."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from latentmill.curate.encode import EncodeConfig, encode
from latentmill.curate.executors import ExecutorConfig
from latentmill.filters.score import ScoreConfig, score

pytestmark = pytest.mark.slow  # end to end: real downloads, Ray, training runs


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2)
    yield
    ray.shutdown()


def test_ray_and_local_executors_give_identical_shards(image_shards, tmp_path, ray_local, run_cli):
    # CPU float sums depend on the thread count, so both sides use one thread per worker
    config = EncodeConfig(vae="tiny", resolution=256, batch_size=4, flip=True, torch_threads=1)
    local = encode(image_shards, tmp_path / "local", config)
    remote = encode(image_shards, tmp_path / "ray", config, executor=ExecutorConfig(kind="ray", actors=2))
    assert local["shards"] == remote["shards"]  # per-shard sample counts and sha256 of the tars
    for shard in ("00000", "00001"):
        assert (tmp_path / "local" / f"{shard}.tar").read_bytes() == (
            tmp_path / "ray" / f"{shard}.tar"
        ).read_bytes()

    tiny = ScoreConfig(clip_model="tiny", pretrained="none", batch_size=4, torch_threads=1)
    score(image_shards, tmp_path / "scores-local", tiny)
    result = run_cli(
        "score",
        image_shards,
        "-o",
        tmp_path / "scores-ray",
        "--clip-model",
        "tiny",
        "--pretrained",
        "none",
        "--executor",
        "ray",
        "--actors",
        "2",
        "--torch-threads",
        "1",
    )
    assert result.exit_code == 0, result.output
    for shard in ("00000", "00001"):
        a = pq.read_table(tmp_path / "scores-local" / f"{shard}.parquet").to_pandas()
        b = pq.read_table(tmp_path / "scores-ray" / f"{shard}.parquet").to_pandas()
        exact = ["key", "url", "caption", "width", "height", "original_width", "original_height", "error"]
        assert a[exact].equals(b[exact])
        # float32 scores: a Ray actor's BLAS runs under OMP_NUM_THREADS=1, which can change the last bit
        # (the float16 latents above hide that; these do not)
        np.testing.assert_allclose(a["clip_similarity"], b["clip_similarity"], rtol=1e-5, atol=1e-6)


def test_a_shard_that_keeps_failing_is_reported_and_the_others_are_kept(tmp_path, ray_local):
    from latentmill.curate.executors import run_shards
    from tests.conftest import FlakyStage

    shards = [tmp_path / f"{i:05d}.tar" for i in range(3)]
    for shard in shards:
        shard.write_bytes(b"")
    with pytest.raises(RuntimeError, match="1 shard\\(s\\) failed after 1 retries"):
        run_shards(
            FlakyStage(tmp_path, fail="00001"), shards, ExecutorConfig(kind="ray", actors=2, shard_retries=1)
        )
    assert sorted(p.name for p in tmp_path.glob("*.stats.json")) == ["00000.stats.json", "00002.stats.json"]
    done = run_shards(
        FlakyStage(tmp_path, fail=None), shards, ExecutorConfig(kind="ray", actors=2, shard_retries=1)
    )
    assert sorted(done) == ["00000", "00001", "00002"]


def test_an_actor_that_dies_is_replaced_and_the_run_equals_a_local_one(image_shards, tmp_path, ray_local):
    from latentmill.curate.encode import EncodeStage
    from latentmill.curate.executors import run_shards
    from latentmill.curate.imageshards import list_image_shards
    from tests.conftest import DyingStage

    config = EncodeConfig(vae="tiny", resolution=256, batch_size=4, torch_threads=1)
    local = encode(image_shards, tmp_path / "local", config)
    out = tmp_path / "ray"
    out.mkdir()
    stage = DyingStage(EncodeStage(config, out, None), die_on="00001", marker=tmp_path / "died")
    done = run_shards(
        stage, list_image_shards(image_shards), ExecutorConfig(kind="ray", actors=2, shard_retries=1)
    )
    assert (tmp_path / "died").exists()  # an actor's process did die mid-run
    assert sorted(done) == ["00000", "00001"]
    for shard in ("00000", "00001"):
        assert done[shard]["sha256"] == local["shards"][shard]["sha256"]
        assert (out / f"{shard}.tar").read_bytes() == (tmp_path / "local" / f"{shard}.tar").read_bytes()


class _Probe:
    """A dataset of one item: the worker's value of LATENTMILL_PROBE."""

    def __len__(self):
        return 1

    def __getitem__(self, index):
        import os

        return os.environ.get("LATENTMILL_PROBE", "unset")


def test_a_variable_set_after_the_fork_server_started_reaches_every_worker(monkeypatch):
    """The fork server keeps the environment it started with: credentials set later (a library caller's
    os.environ, a test's S3 keys) reach the workers only because each gets the command's environment."""
    import torch

    from latentmill.curate.workerprocesses import worker_context, worker_environment

    def read(**options):
        loader = torch.utils.data.DataLoader(
            _Probe(), batch_size=None, num_workers=1, multiprocessing_context=worker_context(), **options
        )
        return list(loader)[0]

    monkeypatch.delenv("LATENTMILL_PROBE", raising=False)
    assert read() == "unset"  # the fork server runs now, without the variable
    monkeypatch.setenv("LATENTMILL_PROBE", "seen")
    assert read() == "unset"  # what a worker had without the environment handed over
    assert read(worker_init_fn=worker_environment()) == "seen"


CHILD = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor
from latentmill.curate.workerprocesses import worker_context, worker_environment
if __name__ == "__main__":
    with ProcessPoolExecutor(1, mp_context=worker_context(), initializer=worker_environment()) as pool:
        print(pool.submit(os.getpid).result(), flush=True)
        time.sleep(120)
"""


def _alive(pid: int) -> bool:
    from pathlib import Path

    status = Path(f"/proc/{pid}/status")
    try:
        return "\\tZ" not in next(
            line for line in status.read_text().splitlines() if line.startswith("State")
        )
    except (FileNotFoundError, StopIteration):
        return False


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_command_killed_with_sigkill_leaves_no_pool_worker_behind(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "child.py").write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(tmp_path / "child.py")], stdout=subprocess.PIPE, text=True)
    worker = int(child.stdout.readline())
    assert _alive(worker)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 20
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(worker), "the pool worker outlived the killed command"
