"""Downloads with real img2dataset against the loopback image server."""

import json
import os
import signal
import subprocess
import sys
import tarfile
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from latentmill.curate.download import DownloadConfig, download, retry_failed
from latentmill.curate.imageshards import iter_image_shard, list_image_shards
from latentmill.errors import InputError, NothingLeft
from tests.conftest import write_table

pytestmark = pytest.mark.slow  # end to end: real downloads, Ray, training runs

FAST = dict(processes=1, http_threads=16, timeout=2, retries=0, shard_size=16)


def fast(server, **more):
    """Quick download settings that allow the test's own loopback server, and only it."""
    return DownloadConfig(**(FAST | {"allow_hosts": (f"127.0.0.1:{server.port}",)} | more))


def shard_samples(folder):
    return [s for shard in list_image_shards(folder) for s in iter_image_shard(shard)]


def test_every_good_image_arrives_once_and_every_failure_is_counted(sample_table, tmp_path, server):
    table, rows = sample_table
    out = tmp_path / "images"
    summary = download(table, out, fast(server))

    good = [r for r in rows if r["expect"] == "ok"]
    samples = shard_samples(out)
    assert sorted(s.meta["url"] for s in samples) == sorted(r["URL"] for r in good)
    by_url = {r["URL"]: r for r in rows}
    for sample in samples:
        source = by_url[sample.meta["url"]]
        assert sample.caption == source["TEXT"]
        assert sample.meta["AESTHETIC_SCORE"] == source["AESTHETIC_SCORE"]  # LAION metadata carried
        assert sample.meta["WIDTH"] == source["WIDTH"] and sample.meta["variant"] == source["variant"]

    expected_failures = Counter(r["expect"] for r in rows if r["expect"] != "ok")
    assert summary["success"] == len(good)
    assert summary["failures"] == dict(expected_failures)
    assert summary["new_images"] == len(good)


def test_a_second_run_downloads_nothing(sample_table, tmp_path, server):
    table, _ = sample_table
    out = tmp_path / "images"
    first = download(table, out, fast(server))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    requests_before = len(server.requests)
    second = download(table, out, fast(server))
    assert second["new_shards"] == 0 and second["new_images"] == 0
    assert second["success"] == first["success"] and second["failures"] == first["failures"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == stamps
    assert len(server.requests) == requests_before
    # other settings into the same folder: refused by name, nothing downloaded or removed
    with pytest.raises(InputError, match=r"settings.image_size: \d+ -> 96.*--overwrite"):
        download(table, out, fast(server, image_size=96))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == stamps
    assert len(server.requests) == requests_before


def test_the_guard_drops_private_addresses_without_sending_traffic(fresh_server, tmp_path, run_cli):
    rows = [
        {"URL": fresh_server.url(f"/gen/{i}/300x300.jpg"), "TEXT": "a loopback picture"} for i in range(3)
    ]
    rows += [
        {"URL": "http://10.0.0.1/a.jpg", "TEXT": "private"},
        {"URL": "http://169.254.169.254/latest", "TEXT": "metadata"},
    ]
    table = write_table(tmp_path / "urls.parquet", rows)
    # every row refused: not a success in disguise, but exit 3 with the reason and the fix
    with pytest.raises(NothingLeft, match=r"none of 5 left: private_address 5 \(.*--allow-host HOST"):
        download(table, tmp_path / "images", DownloadConfig(**FAST))
    assert fresh_server.requests == [] and not (tmp_path / "images").exists()
    result = run_cli("download", table, "-o", tmp_path / "images")
    assert result.exit_code == 3 and "--allow-host" in result.output and "already done" not in result.output
    result = run_cli("urls", "prefilter", table, "-o", tmp_path / "kept.parquet")
    assert result.exit_code == 3, result.output
    assert "none of 5 left: private_address 5" in result.output and "--allow-host" in result.output
    assert fresh_server.requests == []


def test_retry_failed_downloads_the_failures_into_new_shards(fresh_server, tmp_path, run_cli):
    rows = [
        {"URL": fresh_server.url(f"/flaky/{i}/gen/{i}/320x320.jpg"), "TEXT": f"flaky picture {i}"}
        for i in range(3)
    ]
    rows += [
        {"URL": fresh_server.url(f"/gen/{i}/320x320.jpg"), "TEXT": f"steady picture {i}"}
        for i in range(10, 14)
    ]
    rows += [{"URL": fresh_server.url("/fail/404"), "TEXT": "gone for good"}]
    table = write_table(tmp_path / "urls.parquet", rows)
    out = tmp_path / "images"
    first = download(table, out, fast(fresh_server))
    assert first["success"] == 4 and first["failures"] == {"http_503": 3, "http_404": 1}

    result = run_cli(
        "download",
        "--retry-failed",
        out,
        "--only-reason",
        "http_503",
        "--processes",
        "1",
        "--min-image-size",
        "64",
        "--allow-host",
        f"127.0.0.1:{fresh_server.port}",
    )
    assert result.exit_code == 0, result.output
    after = json.loads((out / "_latentmill" / "summary.json").read_text())
    assert after["success"] == 7 and after["failures"] == {"http_404": 1}
    assert after["new_shards"] == 1
    urls = [s.meta["url"] for s in shard_samples(out)]
    assert sorted(urls) == sorted(r["URL"] for r in rows[:7])  # each good image exactly once
    assert retry_failed(out, fast(fresh_server), {"http_503"})["new_shards"] == 0  # nothing left to retry
    again = run_cli("download", "--retry-failed", out, "--only-reason", "http_503")
    assert again.exit_code == 0 and "nothing to retry (no URL failed with http_503)" in again.output
    typo = run_cli("download", "--retry-failed", out, "--only-reason", "timeoutt")
    assert typo.exit_code == 2 and "Did you mean timeout?" in typo.output and "http_404 (1)" in typo.output


def _download_cmd(table, out, server):
    return [
        sys.executable,
        "-m",
        "latentmill",
        "download",
        str(table),
        "-o",
        str(out),
        "--processes",
        "1",
        "--http-threads",
        "4",
        "--shard-size",
        "6",
        "--retries",
        "0",
        "--timeout",
        "5",
        "--allow-host",
        f"127.0.0.1:{server.port}",
        "--min-image-size",
        "64",
    ]


def test_a_killed_download_resumes_to_the_same_keys_and_no_truncated_tar(fresh_server, tmp_path):
    rows = [{"URL": fresh_server.url(f"/gen/{i}/320x256.jpg"), "TEXT": f"picture {i}"} for i in range(18)]
    rows[9]["URL"] = fresh_server.url("/hold/gen/9/320x256.jpg")  # the second shard stops here until released
    table = write_table(tmp_path / "urls.parquet", rows)
    out = tmp_path / "killed"
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    process = subprocess.Popen(
        _download_cmd(table, out, fresh_server),
        start_new_session=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert fresh_server.held.wait(120), "the download never reached the held URL"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    fresh_server.release_holds()
    assert (out / "00000_stats.json").exists() and not (out / "00001_stats.json").exists()

    subprocess.run(_download_cmd(table, out, fresh_server), check=True, env=env, capture_output=True)
    reference = tmp_path / "reference"
    made = subprocess.run(
        _download_cmd(table, reference, fresh_server), check=True, env=env, capture_output=True, text=True
    )
    # img2dataset's chatter goes to its log, latentmill's summary to the terminal
    assert "bwm-ng" not in made.stdout + made.stderr and "worker  - success" not in made.stdout + made.stderr
    assert "bwm-ng" in (reference / "_latentmill" / "img2dataset.log").read_text()
    assert "images 18 downloaded" in made.stdout

    def keys(folder):
        return sorted(s.key for s in shard_samples(folder))

    assert keys(out) == keys(reference) and len(keys(out)) == 18
    for tar in list_image_shards(out):
        with tarfile.open(tar) as handle:  # reads to the end: raises on a truncated tar
            names = handle.getnames()
        stats = json.loads(tar.with_name(tar.stem + "_stats.json").read_text())
        assert len([n for n in names if n.endswith(".jpg")]) == stats["successes"]
    assert not (out / "_tmp").exists()


def test_download_cli_prints_a_summary_grouped_by_reason(sample_table, tmp_path, run_cli, server):
    table, rows = sample_table
    result = run_cli(
        "download",
        table,
        "-o",
        tmp_path / "images",
        "--processes",
        "1",
        "--http-threads",
        "16",
        "--timeout",
        "2",
        "--retries",
        "0",
        "--allow-host",
        f"127.0.0.1:{server.port}",
    )
    assert result.exit_code == 0, result.output
    good = sum(r["expect"] == "ok" for r in rows)
    assert f"images {good} downloaded" in result.output
    assert "http_404" in result.output and "timeout" in result.output and "images/s" in result.output
    assert (
        pa.Table.from_batches(pq.ParquetFile(tmp_path / "images" / "00000.parquet").iter_batches()).num_rows
        > 0
    )


def test_the_ray_distributor_downloads_the_same_images(server, tmp_path):
    import ray

    rows = [{"URL": server.url(f"/gen/{i}/320x256.jpg"), "TEXT": f"picture {i}"} for i in range(12)]
    table = write_table(tmp_path / "urls.parquet", rows)
    try:
        summary = download(
            table, tmp_path / "images", fast(server, distributor="ray", processes=2, min_image_size=64)
        )
    finally:
        ray.shutdown()
    assert summary["success"] == 12 and summary["shards"] == 1
    assert sorted(s.meta["url"] for s in shard_samples(tmp_path / "images")) == sorted(r["URL"] for r in rows)


def test_download_writes_to_s3_retries_from_there_and_guards_image_urls_not_the_store(
    fresh_server, tmp_path, bucket, s3_server, run_cli
):
    from latentmill.curate import storage

    # the store is on a private address (127.0.0.1): its own connections pass, an image URL pointing at it
    # does not, even with the object there
    from tests.conftest import image_entry

    storage.location(f"{bucket}/private/secret.jpg").write_bytes(image_entry("secret", 320, 320)[1]["jpg"])
    rows = [
        {"URL": fresh_server.url(f"/flaky/{i}/gen/{i}/320x320.jpg"), "TEXT": f"flaky {i}"} for i in range(2)
    ]
    rows += [{"URL": fresh_server.url(f"/gen/{i}/320x320.jpg"), "TEXT": f"steady {i}"} for i in range(10, 13)]
    rows += [{"URL": f"{s3_server.endpoint}/{bucket[5:]}/private/secret.jpg", "TEXT": "the store itself"}]
    table = write_table(tmp_path / "urls.parquet", rows)
    out = f"{bucket}/images"
    first = download(table, out, fast(fresh_server))
    assert first["success"] == 3 and first["failures"] == {"http_503": 2, "private_address": 1}
    assert storage.location(f"{out}/_latentmill/summary.json").exists()
    assert not any(os.path.exists(p) for p in ("s3:", "images"))  # nothing landed on the local disk

    writes = len(s3_server.writes)
    result = run_cli("download", "--retry-failed", out, "--only-reason", "http_503", "--processes", "1",
                     "--min-image-size", "64", "--allow-host", f"127.0.0.1:{fresh_server.port}")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(s3_server.writes) > writes  # the new shard went to the store
    urls = sorted(s.meta["url"] for s in shard_samples(out))
    assert urls == sorted(r["URL"] for r in rows[:5])  # each good image once; the store's object never
