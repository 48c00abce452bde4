"""Local copies that own their folder: the private scratch folder (runs' working copies, shard caches,
temporaries), its locks and clean-up, copies checked against the store, nothing missing left unsaid, and
the training inputs that make no sense refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from latentmill.curate import scratch, storage
from latentmill.curate.encode import EncodeConfig, encode
from latentmill.errors import InputError
from latentmill.train.loop import train
from tests.conftest import SMALL_ENCODE, image_entry, make_shard, quick_train_config, tiny_clip_text_pipeline

CLI = [sys.executable, "-m", "latentmill"]


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """TMPDIR (and this process's tempfile) pointed at a folder of the test's, the scratch space not yet
    swept in this process."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setattr(scratch, "_swept", False)
    return tmp


def _images(folder: Path, shards: int, seed: int, per_shard: int = 4) -> Path:
    folder.mkdir(parents=True)
    for s in range(shards):
        make_shard(
            folder / f"{s:05d}.tar",
            [image_entry(f"{s:05d}{i:04d}", 64, 64, seed=seed + 10 * s + i) for i in range(per_shard)],
        )
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Latents of 2 and of 4 shards (other pictures), a tiny CLIP text pipeline."""
    root = tmp_path_factory.mktemp("localcopies")
    encode(_images(root / "images", 2, seed=0), root / "latents", EncodeConfig(**SMALL_ENCODE))
    encode(_images(root / "images4", 4, seed=100), root / "latents4", EncodeConfig(**SMALL_ENCODE))
    tiny_clip_text_pipeline(root / "text")
    return root


def _upload(folder: Path, url: str) -> None:
    for path in sorted(folder.iterdir()):
        if path.is_file():
            storage.upload(path, storage.location(f"{url}/{path.name}"))


def _train_cli(data: Path, shards: str, run: str, *more: str, env=None, wait=True, wait_log=None):
    args = [*CLI, "train", shards, "--model", "tiny", "-o", run, "--text-encoder", str(data / "text"),
            "--batch-size", "4", *more]  # fmt: skip
    if not wait:  # its output to a file: a pipe nobody reads would stop it once full
        log = open(wait_log, "w")
        return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (links as their target's text) -> its content digest."""
    found = {}
    for here, _, files in os.walk(folder):
        for name in files:
            path = Path(here) / name
            found[str(path.relative_to(folder))] = (
                "link:" + os.readlink(path)
                if path.is_symlink()
                else hashlib.sha256(path.read_bytes()).hexdigest()
            )
    return found


# --- URLs and the scratch folder --------------------------------------------------------------------


@pytest.mark.parametrize("url", ["s3://b/runs/..", "s3://b/runs/./v1", "s3://b//runs/v1", "s3://b/runs/../x"])
def test_store_urls_with_dot_or_empty_segments_are_refused(url, run_cli):
    with pytest.raises(InputError, match="without '.', '..' or '//'"):
        storage.location(url)
    result = run_cli("export", url, "-o", "out")
    assert result.exit_code == 2 and url in result.output, result.output
    assert (
        storage.location("s3://b/runs/v1/").path.rstrip("/").endswith("runs/v1")
    )  # a trailing slash is fine


def test_the_scratch_folder_must_be_a_private_folder_of_this_user(private_tmp):
    victim = private_tmp.parent / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    planted = private_tmp / f"latentmill-{os.geteuid()}"
    planted.symlink_to(victim)
    with pytest.raises(InputError, match="is a symbolic link"):
        scratch.root()
    planted.unlink()
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    with pytest.raises(InputError, match="may be written by others"):
        scratch.root()
    planted.rmdir()
    made = scratch.root()
    assert made == planted and (made.stat().st_mode & 0o777) == 0o700
    assert (victim / "precious.txt").read_text() == "keep me"


def _holder(folder: Path):
    """A process that holds `folder` until killed."""
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom latentmill.curate import scratch\n"
        f"scratch.hold(Path({str(folder)!r}), 'run s3://b/runs/v')\nprint('held', flush=True)\ntime.sleep(600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_held_folder_is_refused_to_a_second_process_and_freed_when_its_holder_dies(private_tmp, run_cli):
    folder = scratch.run_folder("s3://b/runs/v")
    first = _holder(folder)
    try:
        with pytest.raises(scratch.FolderInUse, match=rf"host {os.uname().nodename}, PID {first.pid}\)"):
            scratch.hold(folder, "run s3://b/runs/v")
        listing = run_cli("cache", "--list")
        assert listing.exit_code == 0 and f"in use by PID {first.pid}" in listing.output
        cleared = run_cli("cache", "--clear")
        assert (
            cleared.exit_code == 0
            and folder.exists()
            and f"kept (in use by PID {first.pid}" in cleared.output
        )
    finally:
        first.kill()
        first.wait()
    held = scratch.hold(folder, "run s3://b/runs/v")  # its holder is gone: the folder is free
    assert scratch.holder_of(folder)["pid"] == os.getpid()
    held.release()


def test_the_caches_and_temporaries_of_dead_processes_are_swept_and_run_copies_kept(private_tmp, run_cli):
    root = scratch.root()
    stale_run = root / "run-0123456789abcdef"
    for folder in (stale_run, root / "cache-dead"):  # a trainer killed mid-run: its working copy, its cache
        killed = _holder(folder)
        killed.kill()
        killed.wait()
    (root / "cache-dead" / "shard.tar").write_bytes(b"x" * 1000)
    alive = scratch.new_folder("cache", "a live run's cache")
    (stale_run / "v").mkdir(parents=True)
    (stale_run / "v" / "log.jsonl").write_text("{}\n")
    assert scratch.sweep() == 1
    assert not (root / "cache-dead").exists() and alive.path.exists() and stale_run.exists()
    listing = run_cli("cache", "--list")
    assert "run-0123456789abcdef" in listing.output and "not in use" in listing.output
    cleared = run_cli("cache", "--clear")
    assert cleared.exit_code == 0 and "removed 1 folder(s)" in cleared.output
    assert not stale_run.exists() and alive.path.exists()
    alive.release(remove=True)


# --- a run in the store: its working copy ---------------------------------------------------------


@pytest.mark.slow  # four training processes
def test_a_remote_runs_working_copy_keeps_to_its_folder_and_is_never_shared(data, bucket, tmp_path):
    """Links planted around and inside the working copy, canaries beside it; a run URL ending in '..';
    two trainers of one URL; a killed one's copy reused and its cache swept by the next."""
    tmp = Path(tempfile.mkdtemp(prefix="lmc"))  # short, as users' TMPDIR is: sockets live under it
    env = os.environ | {"TMPDIR": str(tmp)}
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    (tmp / "canary.txt").write_text("a file of another program")
    (tmp / "other-program").mkdir()
    (tmp / "other-program" / "state").write_text("its state")
    _upload(data / "latents", f"{bucket}/latents")
    shards, run = f"{bucket}/latents", f"{bucket}/runs/v"
    # a working copy in which links stand (as a hostile earlier state would leave it)
    copy = tmp / f"latentmill-{os.geteuid()}" / f"run-{hashlib.sha256(run.encode()).hexdigest()[:16]}"
    (copy / "v").mkdir(parents=True)
    os.chmod(copy.parent, 0o700)
    (copy / "v" / "checkpoints").symlink_to(victim)
    (copy / "v" / "notes.txt").symlink_to(victim / "precious.txt")
    before = _tree(tmp_path / "victim") | {"canary": (tmp / "canary.txt").read_text()}

    up = _train_cli(data, shards, f"{bucket}/runs/..", "--steps", "1", env=env)
    assert up.returncode == 2 and "'..' segment" in up.stderr, up.stderr[-2000:]

    output = tmp_path / "first.log"
    first = _train_cli(data, shards, run, "--steps", "100000", "--checkpoint-every", "100000", env=env,
                       wait=False, wait_log=output)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (scratch.is_held(copy) and (scratch.holder_of(copy) or {}).get("pid") == first.pid):
            assert first.poll() is None and time.monotonic() < deadline, output.read_text()[-2000:]
            time.sleep(0.2)
        second = _train_cli(data, shards, run, "--steps", "2", env=env)
        assert second.returncode == 2 and f"PID {first.pid})" in second.stderr, second.stderr[-2000:]
        started = storage.location(f"{run}/started.json")  # what --resume starts from, before a checkpoint
        while not (any(p.name.startswith("cache-") for p in copy.parent.iterdir()) and started.exists()):
            assert first.poll() is None and time.monotonic() < deadline, output.read_text()[-2000:]
            time.sleep(0.2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    caches = [p for p in copy.parent.iterdir() if p.name.startswith("cache-")]
    assert caches and (copy / "v").is_dir()  # what a killed run leaves
    third = _train_cli(data, shards, run, "--steps", "2", "--checkpoint-every", "2", "--resume", env=env)
    assert third.returncode == 0, third.stderr[-2000:]
    assert not any(p.exists() for p in caches), "the killed run's cache stays"
    assert not copy.exists(), "a finished run's working copy stays"
    assert storage.location(f"{run}/checkpoints/step-0000002/state.json").exists()
    assert _tree(tmp_path / "victim") | {"canary": (tmp / "canary.txt").read_text()} == before
    assert (tmp / "other-program" / "state").read_text() == "its state"
    assert sorted(p.name for p in tmp.iterdir()) == [
        "canary.txt",
        f"latentmill-{os.geteuid()}",
        "other-program",
    ]


# --- copies checked against the store; nothing missing unsaid ----------------------------------------


def _log(run: Path | str) -> list[dict]:
    return [json.loads(line) for line in storage.location(f"{run}/log.jsonl").read_text().splitlines()]


@pytest.mark.slow  # two training runs from the store
def test_a_prefix_encoded_again_trains_on_its_new_shards_all_of_them(data, bucket, tmp_path):
    cache = str(tmp_path / "cache")  # kept between runs, as --cache-dir /nvme/cache would be
    shards = f"{bucket}/latents"
    _upload(data / "latents", shards)
    train(quick_train_config(data, tmp_path / "a", model="tiny", shards=shards, cache_dir=cache, epochs=1))
    for path in storage.location(shards).iterdir():
        storage.remove(path)
    _upload(data / "latents4", shards)  # the same names, other bytes, and more of them
    train(quick_train_config(data, tmp_path / "b", model="tiny", shards=shards, cache_dir=cache, epochs=1))
    report = json.loads((tmp_path / "b" / "ranks" / "rank-0.json").read_text())
    assert report["skipped"] == {} and len(report["shards"]) == 4, report
    assert not any("skipped" in line for line in _log(tmp_path / "b"))


@pytest.mark.slow  # training runs, on disk and in the store
def test_a_listed_shard_that_is_gone_is_said_counted_and_stops_a_strict_run(data, bucket, tmp_path, run_cli):
    local = tmp_path / "latents"
    shutil.copytree(data / "latents4", local)
    (local / "00002.tar").unlink()
    remote = f"{bucket}/latents"
    _upload(data / "latents4", remote)
    storage.remove(f"{remote}/00002.tar")
    for shards in (str(local), remote):
        run = tmp_path / f"run-{len(shards)}"
        common = [
            "--model",
            "tiny",
            "--text-encoder",
            str(data / "text"),
            "--batch-size",
            "4",
            "--steps",
            "2",
        ]
        result = run_cli("train", shards, "-o", run, *common)
        assert result.exit_code == 0, result.output
        assert "1 of the 4 shard(s) its manifest lists are gone (00002.tar)" in result.output
        assert "training on the 3 left" in result.output
        assert _log(run)[0]["skipped"] == {"missing_shard": 1}
        strict = run_cli("train", shards, "-o", tmp_path / "strict", "--strict", *common)
        assert strict.exit_code == 2 and "00002.tar" in strict.output and "without --strict" in strict.output
        assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize("where", ["disk", "store"])
def test_encode_run_again_redoes_a_done_shard_whose_tar_was_cut_or_deleted(data, tmp_path, where, request):
    root = str(tmp_path) if where == "disk" else request.getfixturevalue("bucket")
    images = tmp_path / "images"
    shutil.copytree(data / "images4", images)
    config = EncodeConfig(**SMALL_ENCODE)
    encode(images, f"{root}/latents", config)
    folder = storage.location(f"{root}/latents")
    whole = {name: (folder / name).read_bytes() for name in ("00001.tar", "00002.tar", "manifest.json")}
    with storage.atomic_path(folder / "00001.tar") as tmp:
        tmp.write_bytes(whole["00001.tar"][:5000])  # cut off
    storage.remove(folder / "00002.tar")
    with pytest.warns(UserWarning) as caught:
        encode(images, f"{root}/latents", config)
    said = " ".join(str(w.message) for w in caught)
    assert "00001: 00001.tar holds 5,000 bytes" in said and "00002: 00002.tar is gone" in said
    assert {name: (folder / name).read_bytes() for name in whole} == whole


# --- inputs that make sense --------------------------------------------------------------------------


def _png(array) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_mask_file_of_another_size_is_dropped_naming_it_and_both_sizes(tmp_path):
    from latentmill.curate.pack import PackConfig, pack_images

    pictures = tmp_path / "pictures"
    pictures.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (pictures / f"{name}.png").write_bytes(_png(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)))
    (pictures / "a.mask.png").write_bytes(_png(np.full((96, 128), 255, np.uint8)))
    (pictures / "b.mask.png").write_bytes(_png(np.full((48, 64), 255, np.uint8)))  # another size
    with pytest.warns(UserWarning, match=r"b\.mask\.png: 64x48 against its image's 128x96"):
        totals = pack_images(pictures, tmp_path / "images", PackConfig(caption="a picture"))
    assert totals["packed"] == 1 and totals["dropped"] == {"mask_size_mismatch": 1}
    # a shard made elsewhere with such a mask: encode drops it, naming the sample and its image
    shard = tmp_path / "elsewhere" / "00000.tar"
    shard.parent.mkdir()
    key, files = image_entry("000000007", 128, 96, seed=1, fmt="png")
    good = image_entry("000000008", 128, 96, seed=2, fmt="png")
    make_shard(shard, [(key, files | {"mask.png": _png(np.full((10, 10), 255, np.uint8))}), good])
    with pytest.warns(
        UserWarning, match=r"000000007\.mask\.png is 10x10 against its image's 128x96.*000000007\.png"
    ):
        manifest = encode(shard.parent, tmp_path / "latents", EncodeConfig(alpha_mask=True, **SMALL_ENCODE))
    assert manifest["samples"] == 1 and manifest["dropped"] == {"mask_size_mismatch": 1}


def test_masks_that_are_all_empty_are_refused_and_some_empty_ones_counted(data, tmp_path, run_cli):
    from latentmill.curate.pack import PackConfig, pack_images

    pictures = tmp_path / "pictures"
    pictures.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        (pictures / f"p{i}.png").write_bytes(_png(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
        (pictures / f"p{i}.mask.png").write_bytes(_png(np.zeros((64, 64), np.uint8)))
    pack_images(pictures, tmp_path / "images", PackConfig(caption="a picture"))
    manifest = encode(
        tmp_path / "images", tmp_path / "latents", EncodeConfig(alpha_mask=True, **SMALL_ENCODE)
    )
    assert manifest["empty_masks"] == 4
    common = ["--model", "tiny", "--text-encoder", str(data / "text"), "--batch-size", "4", "--steps", "1"]
    result = run_cli("train", tmp_path / "latents", "-o", tmp_path / "run", "--masked-loss", *common)
    assert result.exit_code == 2 and "every one of the 4 loss masks" in result.output, result.output
    assert not (tmp_path / "run").exists()
