"""The storage layer: memory:// for the module's own rules, moto's S3 server on 127.0.0.1 (through s3fs and
AWS_ENDPOINT_URL, as users reach MinIO or S3) for stages run against an object store."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from latentmill.curate import storage
from latentmill.curate.encode import EncodeConfig, encode
from latentmill.errors import InputError
from tests.conftest import image_entry, kill_when_done, make_shard

SMALL = dict(resolution=256, batch_size=2, vae="tiny", torch_threads=1)


def test_a_url_is_a_path_of_the_store_and_a_local_path_stays_a_path(tmp_path):
    from pathlib import Path

    assert storage.location(tmp_path) == tmp_path and isinstance(storage.location(str(tmp_path)), Path)
    assert storage.location(f"file://{tmp_path}") == tmp_path
    remote = storage.location("memory://bucket/work") / "images" / "00000.tar"
    assert storage.is_remote(remote) and str(remote) == "memory://bucket/work/images/00000.tar"
    assert (remote.name, remote.stem) == ("00000.tar", "00000")


def test_writes_are_whole_and_an_identical_file_is_left_alone():
    target = storage.location("memory://writes/folder/a.json")
    assert storage.write_json(target, {"a": 1}) is True
    assert storage.write_json(target, {"a": 1}) is False  # the same bytes: nothing written
    assert target.read_text() == '{\n  "a": 1\n}\n'
    with pytest.raises(RuntimeError), storage.atomic_path("memory://writes/folder/b.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert not storage.location("memory://writes/folder/b.bin").exists()  # nothing appears on failure


def test_a_missing_backend_names_the_extra_and_an_unknown_protocol_is_refused(monkeypatch):
    import fsspec

    def missing(protocol):
        raise ImportError(f"Install gcsfs to access {protocol}")

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    with pytest.raises(InputError, match=r"gs://b/x: gs:// needs gcsfs.*pip install 'latentmill\[gcs\]'"):
        storage.location("gs://b/x")
    monkeypatch.undo()
    with pytest.raises(InputError, match="unknown storage protocol nosuch://"):
        storage.location("nosuch://b/x")


def test_storage_options_are_parsed_as_json_or_text():
    assert storage.parse_option("endpoint_url=http://10.0.0.5:9000") == (
        "endpoint_url",
        "http://10.0.0.5:9000",
    )
    assert storage.parse_option("anon=true") == ("anon", True)
    assert storage.parse_option('client_kwargs={"region_name": "eu"}') == (
        "client_kwargs",
        {"region_name": "eu"},
    )
    with pytest.raises(InputError, match="KEY=VALUE"):
        storage.parse_option("nokey")


# --- against the loopback S3 server ---------------------------------------------------------------------


def _images(folder, shards=3, per_shard=4):
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        make_shard(
            folder / f"{shard:05d}.tar",
            [
                image_entry(f"{shard:05d}{i:04d}", 300 + 24 * i, 256, seed=shard * 10 + i)
                for i in range(per_shard)
            ],
        )
    return folder


def _upload(folder, url):
    target = storage.location(url)
    for path in sorted(folder.iterdir()):
        storage.upload(path, target / path.name)


def _digests(where, suffixes=(".tar", ".parquet")):
    """sha256 of every tar and parquet under a folder or prefix, by name."""
    where = storage.location(where)
    if storage.is_remote(where):
        where.fs.invalidate_cache()
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in where.iterdir()
        if p.name.endswith(suffixes)
    }


def _encode_cmd(images, out):
    return [sys.executable, "-m", "latentmill", "encode", str(images), "-o", str(out), "--resolution", "256",
            "--batch-size", "1", "--vae", "tiny", "--torch-threads", "1"]  # fmt: skip


def test_encode_into_s3_writes_the_bytes_a_local_encode_writes_and_a_rerun_puts_nothing(
    tmp_path, bucket, s3_server, run_cli
):
    local = _images(tmp_path / "images")
    _upload(local, f"{bucket}/images")
    reference = encode(local, tmp_path / "latents", EncodeConfig(**SMALL))
    result = run_cli(
        "encode", f"{bucket}/images", "-o", f"{bucket}/latents", "--resolution", "256", "--batch-size", "2",
        "--vae", "tiny", "--torch-threads", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = _digests(tmp_path / "latents")
    assert len(expected) == 6 and _digests(f"{bucket}/latents") == expected
    manifest = storage.location(f"{bucket}/latents/manifest.json").read_text()
    assert f'"samples": {reference["samples"]}' in manifest

    before = len(s3_server.writes)
    again = encode(f"{bucket}/images", f"{bucket}/latents", EncodeConfig(**SMALL))
    assert again["samples"] == reference["samples"]
    assert s3_server.writes[before:] == []  # a finished stage run again writes nothing


class _S3Marker:
    """`exists()` of one object, asked of the server itself (no client-side listing cache)."""

    def __init__(self, url):
        import boto3

        self.bucket, self.key = url[len("s3://") :].split("/", 1)
        self.client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])

    def exists(self):
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key)
            return True
        except Exception:
            return False


@pytest.mark.slow  # kills and restarts subprocesses
def test_an_encode_into_s3_killed_midway_and_two_writers_end_identical(tmp_path, bucket):
    local = _images(tmp_path / "images", shards=5)
    _upload(local, f"{bucket}/images")
    subprocess.run(_encode_cmd(local, tmp_path / "reference"), check=True, capture_output=True)
    expected = _digests(tmp_path / "reference")

    killed = f"{bucket}/killed"
    process = subprocess.Popen(
        _encode_cmd(f"{bucket}/images", killed), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    kill_when_done(process, _S3Marker(f"{killed}/00000.stats.json"))
    assert not _S3Marker(f"{killed}/manifest.json").exists(), "the encode was not stopped mid-way"
    subprocess.run(_encode_cmd(f"{bucket}/images", killed), check=True, capture_output=True)
    assert _digests(killed) == expected

    shared = f"{bucket}/shared"
    writers = [
        subprocess.Popen(
            _encode_cmd(f"{bucket}/images", shared), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    for writer in writers:
        assert writer.wait() == 0, writer.stderr.read().decode()[-2000:]
    assert _digests(shared) == expected


def test_bad_storage_input_is_a_clear_exit_2(tmp_path, bucket, s3_server, run_cli):
    encode_args = ["--vae", "tiny", "--resolution", "256"]
    missing = run_cli("encode", "s3://no-such-bucket/images", "-o", f"{bucket}/out", *encode_args)
    assert missing.exit_code == 2 and "s3://no-such-bucket/images" in missing.output
    assert "bucket is missing" in missing.output and "Traceback" not in missing.output

    (storage.location(f"{bucket}/empty") / "note.txt").write_text("no shards here")
    empty = run_cli("encode", f"{bucket}/empty", "-o", f"{bucket}/out", *encode_args)
    assert empty.exit_code == 2 and "no .tar image shards" in empty.output

    closed = subprocess.run(
        [sys.executable, "-m", "latentmill", "encode", f"{bucket}/images", "-o", f"{bucket}/out", *encode_args],
        capture_output=True, text=True,
        env=os.environ | {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"},
    )  # fmt: skip
    assert closed.returncode == 2, closed.stderr
    assert "cannot reach the object store at http://127.0.0.1:9" in closed.stderr
    assert "Traceback" not in closed.stderr


def test_a_cut_off_shard_in_the_store_is_counted_not_fatal(tmp_path, bucket):
    local = _images(tmp_path / "images", shards=2)
    data = (local / "00001.tar").read_bytes()
    (local / "00001.tar").write_bytes(data[: len(data) // 2])  # what a writer killed mid-copy leaves
    _upload(local, f"{bucket}/images")
    manifest = encode(f"{bucket}/images", f"{bucket}/latents", EncodeConfig(**SMALL))
    stats = storage.location(f"{bucket}/latents/00001.stats.json").read_text()
    assert '"damaged_tar": true' in stats and manifest["shards"]["00000"]["samples"] == 4


@pytest.mark.slow  # the whole demo recipe, twice
def test_the_demo_recipe_runs_in_s3_and_status_and_report_read_it(bucket, s3_server, tmp_path):
    from tests.test_run import SMALL

    work = f"{bucket}/work"
    cli = [sys.executable, "-m", "latentmill"]
    first = subprocess.run([*cli, "run", "demo", "-w", work, *SMALL], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    names = {p.name for p in storage.location(work).iterdir()}
    assert {"urls", "images", "scores", "selection", "latents-128", "runs", "export", "lineage"} <= names
    assert not os.path.exists("s3:"), "a URL was taken for a local path"

    before = len(s3_server.writes)
    again = subprocess.run([*cli, "run", "demo", "-w", work, *SMALL], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ["prefilter", "download", "score", "fit-head", "select", "encode", "train", "export"]:
        assert f"[{stage}] keep: up to date" in again.stdout, again.stdout
    assert s3_server.writes[before:] == []  # a finished run again: not one PUT

    status = subprocess.run([*cli, "status", work], capture_output=True, text=True)
    assert status.returncode == 0 and "step 6/6" in status.stdout, status.stdout + status.stderr
    report = subprocess.run([*cli, "report", work], capture_output=True, text=True)
    assert report.returncode == 0 and f"wrote {work}/report/index.html" in report.stdout, report.stderr
    page = storage.location(f"{work}/report/index.html").read_text()
    assert "<h3>Kept</h3>" in page and 'alt="loss main"' in page and 'alt="buckets"' in page
    # --open: a local copy, handed to the browser ($BROWSER: a script that notes what it was given)
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.py"
    browser.write_text(f"import sys, pathlib; pathlib.Path({str(opened)!r}).write_text(sys.argv[1])\n")
    env = os.environ | {"BROWSER": f"{sys.executable} {browser} %s"}
    shown = subprocess.run([*cli, "report", work, "--open"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0, shown.stderr
    copy = shown.stdout.split("local copy: ")[1].strip()
    assert opened.read_text().startswith("file://") and opened.read_text().endswith(copy)
    assert open(copy).read() == page


def test_wrong_credentials_are_a_clear_exit_2(tmp_path):
    """moto's server with its access checks on: keys it does not know are refused, as S3 refuses them."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=os.environ | {"INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):  # until it listens
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        env = os.environ | {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1",
            "AWS_SECRET_ACCESS_KEY": "wrong",
        }
        result = subprocess.run(
            [sys.executable, "-m", "latentmill", "encode", "s3://bucket/images", "-o", "s3://bucket/latents",
             "--vae", "tiny"],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
    finally:
        server.terminate()
        server.wait()
    assert result.returncode == 2, result.stderr
    assert "the object store refused access" in result.stderr and "AWS_ACCESS_KEY_ID" in result.stderr
    assert "Traceback" not in result.stderr


def test_dedup_select_and_latents_verify_in_s3_match_the_local_ones(tmp_path, bucket, run_cli):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.test_dedup import planted, write_scores

    matrix, _ = planted(n=600, bases=20)
    write_scores(tmp_path, matrix, shards=2, aesthetic=np.random.default_rng(1).uniform(4, 8, len(matrix)))
    for shard in (tmp_path / "scores").glob("*.parquet"):  # the columns select needs
        table = pq.read_table(shard)
        for name, value in (("url", "u"), ("caption", "c"), ("error", None)):
            table = table.append_column(name, pa.array([value] * table.num_rows, pa.string()))
        for name in ("width", "height", "original_width", "original_height"):
            table = table.append_column(name, pa.array([512] * table.num_rows, pa.int32()))
        pq.write_table(table, shard)
    for folder in ("scores", "embeddings"):
        _upload(tmp_path / folder, f"{bucket}/{folder}")
    for root in (str(tmp_path), bucket):
        result = run_cli("dedup", f"{root}/scores", "-o", f"{root}/dedup", "--threshold", "0.95")
        assert result.exit_code == 0, result.output
        result = run_cli("select", f"{root}/scores", "-o", f"{root}/selection", "--dedup", f"{root}/dedup",
                         "--where", "aesthetic >= 5")  # fmt: skip
        assert result.exit_code == 0, result.output
    for folder in ("dedup", "selection"):
        local = _digests(tmp_path / folder, (".parquet",))
        assert local and _digests(f"{bucket}/{folder}", (".parquet",)) == local
    assert storage.location(f"{bucket}/selection/plots").is_dir()

    images = _images(tmp_path / "images", shards=2)
    _upload(images, f"{bucket}/images")
    encode(f"{bucket}/images", f"{bucket}/latents", EncodeConfig(**SMALL))
    good = run_cli("latents", "verify", f"{bucket}/latents")
    assert good.exit_code == 0 and "8 samples: all match" in good.output, good.output
    storage.location(f"{bucket}/latents/00001.tar").write_bytes(b"cut off")
    bad = run_cli("latents", "verify", f"{bucket}/latents")
    assert bad.exit_code != 0 and "00001.tar" in bad.output


def test_a_recipe_carries_storage_options_and_a_bad_one_is_named(tmp_path):
    from latentmill.recipe import load_recipe
    from latentmill.runner import run_recipe

    good = tmp_path / "r.yaml"
    good.write_text(
        "storage_options: {endpoint_url: 'http://10.0.0.5:9000', anon: true}\nencode: {vae: tiny}\n"
    )
    recipe = load_recipe(str(good))
    saved = storage.options()
    try:
        storage.set_options({"anon": False})  # as --storage-option anon=false: the command line wins
        (tmp_path / "urls.csv").write_text("url\nhttps://example.com/a.jpg\n")
        run_recipe(recipe, tmp_path / "work", urls=str(tmp_path / "urls.csv"), until="prefilter", dry_run=True,
                   log=lambda line: None)  # fmt: skip
        assert storage.options() == {"endpoint_url": "http://10.0.0.5:9000", "anon": False}
    finally:
        storage.set_options(saved)
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage_options: [endpoint_url]\n")
    with pytest.raises(InputError, match="storage_options is a mapping of fsspec options"):
        load_recipe(str(bad))


def test_inspecting_commands_read_the_store(tmp_path, bucket, run_cli):
    local = _images(tmp_path / "images", shards=2)
    _upload(local, f"{bucket}/images")
    (tmp_path / "urls.csv").write_text(
        "URL,TEXT\nhttps://example.com/a.jpg,a cat\nhttps://example.com/b.jpg,a dog\n"
    )
    storage.upload(tmp_path / "urls.csv", storage.location(f"{bucket}/urls.csv"))
    table = run_cli("urls", "inspect", f"{bucket}/urls.csv")
    assert table.exit_code == 0 and "urls.csv: 2 rows in 1 file(s)" in table.output, table.output
    shards = run_cli("images", "inspect", f"{bucket}/images")
    assert shards.exit_code == 0 and "total: 8 samples in 2 shard(s)" in shards.output, shards.output
    chart = run_cli("buckets", "--images", f"{bucket}/images", "--plot", f"{bucket}/buckets.png")
    assert chart.exit_code == 0, chart.output
    assert storage.location(f"{bucket}/buckets.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "pictures").mkdir()
    for name, data in [image_entry(f"p{i}", 320, 256, seed=i) for i in range(3)]:
        (tmp_path / "pictures" / f"{name}.jpg").write_bytes(data["jpg"])
    packed = run_cli(
        "images", "pack", tmp_path / "pictures", "-o", f"{bucket}/packed", "--caption", "a picture"
    )
    assert packed.exit_code == 0, packed.output
    assert storage.location(f"{bucket}/packed/00000.tar").exists()


def test_prefilter_and_score_in_s3_write_the_bytes_they_write_on_disk(tmp_path, bucket):
    from latentmill.curate.imageserver import sample_rows
    from latentmill.curate.prefilter import PrefilterConfig, prefilter
    from latentmill.filters.score import ScoreConfig, score
    from tests.conftest import write_table

    table = write_table(tmp_path / "table.parquet", sample_rows("http://images.example/"))
    storage.upload(table, storage.location(f"{bucket}/table.parquet"))
    rules = PrefilterConfig(min_side=256, max_pwatermark=0.5)
    for root in (str(tmp_path), bucket):
        prefilter(f"{root}/table.parquet", f"{root}/urls/kept.parquet", rules)
    assert _digests(tmp_path / "urls") == _digests(f"{bucket}/urls") and len(_digests(tmp_path / "urls")) == 2

    local = _images(tmp_path / "images", shards=2)
    _upload(local, f"{bucket}/images")
    tiny = ScoreConfig(clip_model="tiny", pretrained="none", batch_size=4, torch_threads=1,
                       save_embeddings=True)  # fmt: skip
    for root in (str(tmp_path), bucket):
        score(f"{root}/images", f"{root}/scores", tiny)
    assert _digests(tmp_path / "scores") == _digests(f"{bucket}/scores")
    assert _digests(tmp_path / "embeddings", (".npy",)) == _digests(f"{bucket}/embeddings", (".npy",))


def test_a_stale_local_copy_of_a_run_never_stands_in_for_the_store(tmp_path, bucket):
    from latentmill.train.remoterun import RunMirror

    run = f"{bucket}/runs/a"
    storage.location(f"{run}/checkpoints/step-0000001/state.json").write_text('{"shards": "new/path"}')
    storage.location(f"{run}/log.jsonl").write_text('{"step": 1}\n')
    mirror = RunMirror(run, local=tmp_path / "copy")
    (tmp_path / "copy" / "checkpoints" / "step-0000001").mkdir(parents=True)
    (tmp_path / "copy" / "checkpoints" / "step-0000001" / "state.json").write_text('{"shards": "old/path"}')
    (tmp_path / "copy" / "stale.txt").write_text("from an earlier run")  # the same size, other bytes above
    local = mirror.pull()
    assert (local / "checkpoints" / "step-0000001" / "state.json").read_text() == '{"shards": "new/path"}'
    assert (local / "log.jsonl").read_text() == '{"step": 1}\n' and not (local / "stale.txt").exists()


def _readme_s3_commands() -> list[str]:
    """The `latentmill …` lines of the README's "Data in object storage" block, in order."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("### Data in object storage") :]
    block = section[section.index("```bash", section.index("AWS_ENDPOINT_URL")) :]
    block = block[: block.index("```", 7)]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("latentmill ")]


def test_the_readme_s3_commands_run_as_written_at_their_defaults(tmp_path, bucket, server, run_cli):
    """Each stage line of the README's object-storage block, with the bucket and cache folder of the test and
    only what an offline loopback run needs added: the image server's host let through the guard, the tiny
    VAE and a tiny model for a few steps (the README's own `...`). No worker count or other setting is
    pinned: DataLoader and prepare workers start as a user's do. (`run`, `status` and `report` on a work
    folder in the store: test_the_demo_recipe_runs_in_s3_and_status_and_report_read_it.)"""
    import shlex

    from latentmill.curate.imageserver import sample_rows
    from latentmill.filters.score import ScoreConfig, score
    from latentmill.filters.select import SelectConfig, select
    from tests.conftest import tiny_clip_text_pipeline, write_table

    commands = _readme_s3_commands()
    wanted = ["latentmill download s3", "latentmill download --retry", "latentmill encode s3",
              "latentmill train s3", "latentmill cache --list"]  # fmt: skip
    lines = {w: next(c for c in commands if c.startswith(w)) for w in wanted}
    rows = [r for r in sample_rows(server.url("")) if "/gen/" in r["URL"]][:8]
    storage.upload(write_table(tmp_path / "kept.parquet", rows), storage.location(f"{bucket}/kept.parquet"))
    tiny_clip_text_pipeline(tmp_path / "text")
    offline = {
        "latentmill download s3": ["--allow-host", f"127.0.0.1:{server.port}", "--min-image-size", "64"],
        "latentmill download --retry": ["--allow-host", f"127.0.0.1:{server.port}"],
        "latentmill encode s3": ["--vae", "tiny", "--resolution", "128", "--step", "32",
                                 "--text-encoder", str(tmp_path / "text")],
        "latentmill train s3": ["--model", "tiny", "--steps", "2", "--batch-size", "2",
                                "--text-encoder", str(tmp_path / "text")],
    }  # fmt: skip
    for want in wanted:
        line = lines[want].replace("s3://my-bucket", bucket).replace("/nvme/cache", str(tmp_path / "cache"))
        args = [a for a in shlex.split(line)[1:] if a != "..."] + offline.get(want, [])
        result = run_cli(*args)
        assert result.exit_code == 0, f"{line}\n{result.output}"
        if want == "latentmill download s3":  # the README's selection: score and select the downloaded images
            score(f"{bucket}/images", f"{bucket}/scores", ScoreConfig(clip_model="tiny", pretrained="none"))
            select(f"{bucket}/scores", f"{bucket}/selection", SelectConfig(min_side=64))
    assert storage.location(f"{bucket}/latents-512/manifest.json").exists()
    assert storage.location(f"{bucket}/runs/v1/checkpoints").is_dir()
