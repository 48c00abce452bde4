"""Round three, item 4: every record latentmill writes, damaged each way (cut, empty, wrong top-level type,
wrong field types, missing fields, not text), is exit 2 naming the file and a fix, never a traceback; and
`status` shows the stage as damaged instead of stopping."""

import json

import numpy as np
import pytest

DAMAGES = {
    "cut": lambda good: json.dumps(good)[: len(json.dumps(good)) // 2],
    "empty": lambda good: "",
    "list": lambda good: "[1, 2]",
    "string": lambda good: '"a string"',
    "wrong-types": lambda good: json.dumps(
        {k: "x" if not isinstance(v, str) else 5 for k, v in good.items()}
    ),
    "missing-fields": lambda good: "{}",
    "not-text": lambda good: b"\xff\xfe\x00garbage",
    "deep": lambda good: "[" * 100_000 + "]" * 100_000,
}

LINEAGE = {"fingerprint": "abc", "output": "def", "record": {"inputs": {}}}
STATE = {"step": 2, "config": {"steps": 4}}
FUNNEL = {"input_rows": 10, "kept_rows": 8}


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)


def _checkpoint(run, state_text):
    folder = run / "checkpoints" / "step-0000002"
    _write(folder / "state.json", state_text)
    _write(folder / "unet_config.json", "{}")
    return folder / "state.json"


# record kind -> (where it lives in WORK, its intact form)
KINDS = {
    "lineage": (lambda w: w / "lineage" / "score.json", LINEAGE),
    "funnel": (lambda w: w / "urls" / "kept.funnel.json", FUNNEL),
    "manifest": (lambda w: w / "latents-128" / "manifest.json", {"samples": 3}),
    "state": (lambda w: w / "runs" / "r" / "checkpoints" / "step-0000002" / "state.json", STATE),
    "started": (lambda w: w / "runs" / "r" / "started.json", {"steps": 4}),
}


def _damaged_work(tmp_path, kind, damage):
    work = tmp_path / "work"
    (work / "urls").mkdir(parents=True)
    where, good = KINDS[kind]
    path = where(work)
    text = DAMAGES[damage](good)
    if kind == "state":
        _checkpoint(work / "runs" / "r", text)
    else:
        _write(path, text)
    return work, path


# which (kind, damage) pairs are damage at all: a manifest or funnel with extra fields is still intact
def _is_damage(kind, damage):
    return not (kind == "started" and damage == "missing-fields")  # {} is a run with every default


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_status_shows_a_damaged_record_as_damaged_naming_it(tmp_path, run_cli, kind, damage):
    work, path = _damaged_work(tmp_path, kind, damage)
    result = run_cli("status", work)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    if _is_damage(kind, damage):
        (row,) = [line for line in result.output.splitlines() if "damaged" in line]
        assert str(path) in row and "Fix:" in row, row
    assert "prefilter" in result.output and "export" in result.output  # every other row still shows


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_run_dry_run_on_a_damaged_lineage_record_is_exit_2_naming_it(tmp_path, run_cli, damage):
    work, path = _damaged_work(tmp_path, "lineage", damage)
    result = run_cli("run", "demo", "-w", work, "--dry-run")
    assert result.exit_code == 2, result.output
    assert str(path) in result.output and "the score stage again" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("kind", ["state", "started"])
def test_train_resume_from_a_damaged_state_is_exit_2_naming_it(tmp_path, run_cli, kind, damage):
    work, path = _damaged_work(tmp_path, kind, damage)
    run = work / "runs" / "r"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = run_cli("train", "-o", run, "--resume", "--model", "tiny", "--steps", "4")
    if not _is_damage(kind, damage):
        return
    assert result.exit_code == 2, result.output
    assert str(path) in result.output and "Fix:" in result.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing changed


STATISTICS = {
    "not-a-zip": lambda path: path.write_bytes(b"hello"),
    "cut": lambda path: path.write_bytes(
        _npz(mu=np.zeros(4), sigma=np.eye(4), count=4, space="clip:tiny")[:60]
    ),
    "no-sigma": lambda path: path.write_bytes(_npz(mu=np.zeros(4), count=4, space="clip:tiny")),
    "sigma-1d": lambda path: path.write_bytes(
        _npz(mu=np.zeros(4), sigma=np.zeros(4), count=4, space="clip:tiny")
    ),
    "mismatch": lambda path: path.write_bytes(
        _npz(mu=np.zeros(4), sigma=np.eye(3), count=4, space="clip:tiny")
    ),
    "pickled": lambda path: path.write_bytes(
        _npz(mu=np.array([{}], dtype=object), sigma=np.eye(4), count=4, space="clip:tiny")
    ),
    "empty": lambda path: path.write_bytes(b""),
}


def _npz(**arrays):
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize("damage", sorted(STATISTICS))
def test_eval_fid_on_damaged_statistics_is_exit_2_naming_the_file(tmp_path, run_cli, damage):
    good = tmp_path / "good.npz"
    good.write_bytes(_npz(mu=np.zeros(4), sigma=np.eye(4), count=4, space="clip:tiny"))
    bad = tmp_path / "bad.npz"
    STATISTICS[damage](bad)
    result = run_cli("eval", "fid", good, bad, "--features", "clip:tiny", "--json")
    assert result.exit_code == 2, result.output
    assert str(bad) in result.output and "Fix:" in result.output and "Traceback" not in result.output


def test_a_damaged_statistics_cache_is_computed_again(tmp_path, run_cli, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("LATENTMILL_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(tmp_path / name / f"{i}.png")
    args = ("eval", "fid", tmp_path / "a", tmp_path / "b", "--features", "clip:tiny", "--kid-only", "--json")
    first = run_cli(*args)
    assert first.exit_code == 0, first.output
    for cached in (tmp_path / "cache" / "eval-stats").glob("*.npz"):
        cached.write_bytes(b"cut")
    again = run_cli(*args)
    assert again.exit_code == 0, again.output
    assert "not an .npz" in again.output and "Computing the statistics again" in again.output
    assert json.loads(again.output.splitlines()[-1]) == json.loads(first.output.splitlines()[-1])


@pytest.mark.parametrize("damage", ["cut", "list", "not-text"])
def test_a_damaged_sample_index_is_exit_2_naming_it(tmp_path, damage, monkeypatch):
    from latentmill.errors import InputError
    from latentmill.train import samplefolder, sampling

    folder = tmp_path / "samples"
    _write(folder / samplefolder.SAMPLE_INDEX, DAMAGES[damage]({"000000": "abc"}))
    monkeypatch.setattr(sampling, "sampler", lambda *a, **k: pytest.fail("sampled before the index was read"))
    with pytest.raises(InputError, match="Fix:") as caught:
        samplefolder.sample_to_folder(tmp_path / "run", ["a cat"], folder, 1)
    assert str(folder / samplefolder.SAMPLE_INDEX) in str(caught.value)


def test_status_marks_every_stage_downstream_of_a_stale_one(tmp_path):
    from latentmill.layout import Layout
    from latentmill.plan import stale

    lay = Layout(tmp_path / "work")
    records = {  # score read images as download made them once; select read score's scores
        "download": {"output": "images-v2", "record": {"inputs": {}}},
        "score": {"output": "scores-v1", "record": {"inputs": {"images": "images-v1"}}},
        "select": {"output": "sel-v1", "record": {"inputs": {"scores": "scores-v1"}}},
    }
    for name, body in records.items():
        _write(lay.lineage / f"{name}.json", json.dumps({"fingerprint": name} | body))
    marked = stale(lay)
    assert "images was made again by the download stage" in marked["score"]
    assert "scores comes from the score stage, which is stale" in marked["select"]
    assert "download" not in marked


@pytest.mark.parametrize("damage", ["cut", "list", "empty"])
def test_a_damaged_stats_file_of_a_shard_stage_is_exit_2_naming_it(tmp_path, run_cli, damage):
    from tests.conftest import image_entry, make_shard

    (tmp_path / "images").mkdir()
    make_shard(tmp_path / "images" / "00000.tar", [image_entry("000000000", 64, 64)])
    stats = tmp_path / "scores" / "00000.stats.json"
    _write(stats, DAMAGES[damage]({"shard": "00000", "images": 1}))
    result = run_cli(
        "score",
        tmp_path / "images",
        "-o",
        tmp_path / "scores",
        "--clip-model",
        "tiny",
        "--pretrained",
        "none",
    )
    assert result.exit_code == 2, result.output
    assert str(stats) in result.output and "Fix: remove 00000.stats.json and run again" in result.output
