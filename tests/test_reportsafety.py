"""Names and values from the data stay text: the report escapes everything it did not write (rendered in
headless Chromium, no script from the data runs), and names that become files or columns are checked where
they enter (no histogram lands outside its folder)."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import image_entry, make_shard, tiny_clip_text_pipeline

# each payload would mark the page (body[data-pwned]) if the browser ran it
SCRIPT = "<script>document.body.dataset.pwned='script'</script>"
IMG = "<img src=x onerror=\"document.body.dataset.pwned='img'\">"
ATTR = '" onmouseover="document.body.dataset.pwned=\'attr\'" x="'
PAYLOADS = (SCRIPT, IMG, ATTR)


def _hostile_work(work):
    from safetensors.numpy import save_file

    images = work / "images"
    images.mkdir(parents=True)
    keys = ["k0" + IMG.replace("/", ""), "k1" + ATTR, "k2plain"]  # a key cannot hold "/" or "." in a tar
    entries = []
    for i, key in enumerate(keys):
        _, files = image_entry(f"{i}", 200, 160, seed=i)
        entries.append((key, {"jpg": files["jpg"], "txt": (SCRIPT + IMG + " ../../caption").encode()}))
    make_shard(images / "00000.tar", entries)
    (work / "urls").mkdir()
    selection = work / "selection"
    selection.mkdir()
    pq.write_table(pa.table({"key": keys, "keep": [True, False, False],
                             "reason": ["", SCRIPT, "../../" + IMG]}), selection / "00000.parquet")  # fmt: skip
    heads = work / "heads"
    heads.mkdir()
    save_file({"w": np.zeros((1, 4), np.float32)}, str(heads / "h.safetensors"),
              metadata={"format": "latentmill.head/1", "column": IMG, "target": SCRIPT,
                        "metrics": json.dumps({"r2": 0.5})})  # fmt: skip
    dedup = work / "dedup"
    dedup.mkdir()
    (dedup / "funnel.json").write_text(
        json.dumps({"duplicates": SCRIPT, "groups": IMG, "threshold": ATTR, "keep": SCRIPT})
    )
    pq.write_table(pa.table({"key": keys[1:], "duplicate_of": [keys[0], keys[0]], "similarity": [0.99, 0.98]}),
                   dedup / "00000.parquet")  # fmt: skip
    checkpoint = work / "runs" / "r" / "checkpoints" / "step-0000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text('{"step": 1}')
    text = tiny_clip_text_pipeline(work / "text")
    (checkpoint / "token.json").write_text(
        json.dumps({"token": SCRIPT, "init_word": IMG, "text_encoder": str(text)})
    )
    save_file({SCRIPT: np.ones((1, 32), np.float32)}, str(checkpoint / "embeddings_ema.safetensors"))
    return work


def test_a_report_of_hostile_data_shows_it_as_text_and_runs_none_of_it_in_chromium(tmp_path, run_cli):
    from tests.test_demo import chromium_flags

    work = _hostile_work(tmp_path / "work")
    result = run_cli("report", work)
    assert result.exit_code == 0, result.output
    page = (work / "report" / "index.html").read_text()
    assert "Content-Security-Policy" in page and "script-src" not in page and "default-src 'none'" in page
    for payload in PAYLOADS:
        assert payload not in page  # not one payload reaches the page unescaped
    assert "&lt;script&gt;document.body.dataset.pwned" in page  # shown as text

    chromium, flags = chromium_flags(tmp_path)
    dom = subprocess.run([chromium, *flags, "--dump-dom", (work / "report" / "index.html").as_uri()],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "data-pwned" not in dom.stdout  # no script, handler or attribute from the data ran
    assert "<script" not in dom.stdout.lower()  # no script element at all
    for section in ("heads", "thumbnails", "tokens", "dedup"):
        assert f'id="{section}"' in dom.stdout
    assert "&lt;script&gt;" in dom.stdout  # the text is there, as text
    assert sorted(os.listdir(tmp_path)) == ["chromium", "work"]  # nothing landed beside the work folder


def test_names_from_files_that_would_leave_their_folder_are_refused_naming_the_file(tmp_path, run_cli):
    from safetensors.numpy import save_file

    scores = tmp_path / "w" / "scores"
    scores.mkdir(parents=True)
    table = {"key": ["a"], "url": ["u"], "caption": ["c"], "width": [512], "height": [512],
             "original_width": [512], "original_height": [512], "error": pa.array([None], pa.string()),
             "../../../../x/ESCAPED": [1.0]}  # fmt: skip
    pq.write_table(pa.table(table), scores / "00000.parquet")
    (scores / "00000.stats.json").write_text('{"shard": "00000"}')
    result = run_cli("select", scores, "-o", tmp_path / "w" / "selection")
    assert result.exit_code == 2, result.output
    assert (
        "00000.parquet" in result.output and "'../../../../x/ESCAPED' is not a column name" in result.output
    )
    assert not list(tmp_path.parent.rglob("ESCAPED*")) and not (tmp_path / "w" / "selection").exists()

    head = tmp_path / "bad.safetensors"
    save_file({"w": np.zeros((1, 4), np.float32)}, str(head),
              metadata={"format": "latentmill.head/1", "column": IMG, "kind": "linear", "input_dim": "4"})  # fmt: skip
    from latentmill.errors import InputError
    from latentmill.filters.heads import load_fitted

    with pytest.raises(InputError, match=r"bad.safetensors: head column .* is not a column name"):
        load_fitted(head)


def test_a_manifest_shard_name_that_leaves_the_folder_is_refused(tmp_path, run_cli):
    from latentmill.curate.encode import EncodeConfig, encode
    from tests.conftest import SMALL_ENCODE, small_image_shards

    latents = tmp_path / "latents"
    encode(
        small_image_shards(tmp_path / "images", shards=1, per_shard=2), latents, EncodeConfig(**SMALL_ENCODE)
    )
    manifest = json.loads((latents / "manifest.json").read_text())
    manifest["shards"] = {"../outside": manifest["shards"]["00000"]}
    (latents / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("latents", "verify", latents)
    assert result.exit_code == 2, result.output
    assert "manifest.json: shard name '../outside' is not a plain name" in result.output
