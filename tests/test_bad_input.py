"""The bad-input corpus: every case is exit 2, a message that names the culprit, and nothing written or
changed (the zoo folder, which holds the earlier outputs, is byte-identical afterwards)."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import FIXTURES, image_entry, make_shard, needs_fixtures


def tree_digest(root):
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(os.fsencode(path.relative_to(root)))
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    z = tmp_path_factory.mktemp("zoo")
    (z / "nourl.csv").write_text("foo,bar\n1,2\n")
    (z / "ok.csv").write_text("URL,TEXT\nhttp://example.com/a.jpg,a picture\n")
    (z / "bad.jsonl").write_text('{"URL": "http://a.com/1.jpg"}\n{broken\n')
    (z / "empty.csv").write_text("")
    (z / "notparquet.parquet").write_text("hello")
    (z / "emptydir").mkdir()
    (z / "list.yaml").write_text("- a\n- b\n")
    (z / "sectionlist.yaml").write_text("train: [1, 2]\n")
    (z / "unknown.yaml").write_text("train:\n  bogus_key: 3\n")
    (z / "evil.yaml").write_text('train: !!python/object/apply:os.system ["echo hi"]\n')
    (z / "bs0.yaml").write_text("train:\n  batch_size: 0\n")
    (z / "fp16.yaml").write_text("train:\n  precision: fp16\n")
    (z / "steps-text.yaml").write_text("train:\n  steps: many\n")
    (z / "stages-map.yaml").write_text("stages:\n  name: a\n")
    (z / "stage-item.yaml").write_text("stages:\n  - 3\n")
    (z / "badyaml.yaml").write_text("train: [unclosed\n")
    (z / "so-number.yaml").write_text("storage_options:\n  endpoint_url: 9000\n")
    (z / "so-timeout.yaml").write_text("storage_options:\n  config_kwargs: {read_timeout: -1}\n")
    (z / "empty.pth").write_bytes(b"")
    (z / "text.pth").write_text("text")
    (z / "text.safetensors").write_text("text")
    torch.save({"layers.0.weight": torch.zeros(3, 3)}, z / "wrongshape.pth")
    (z / "images").mkdir()
    make_shard(z / "images" / "00000.tar", [image_entry("000000000", 160, 120)])
    (z / "lat").mkdir()
    (z / "lat" / "manifest.json").write_text('{"format": "latentmill.latents/1"}')
    good = {
        "format": "latentmill.latents/1",
        "latent_channels": 4,
        "downsample_factor": 8,
        "resolution": 128,
        "scaling_factor": 0.18215,
        "shift_factor": 0.0,
        "buckets": [[128, 128]],
        "vae": {"fingerprint": "x"},
        "encode_config": {},
        "text_encoder": None,
        "shards": {"00000": {"samples": 0, "sha256": "0"}},
    }
    tampered = {
        "list": [1, 2],
        "channels": {k: v for k, v in good.items() if k != "latent_channels"},
        "buckets": good | {"buckets": [[128, "wide"]]},
        "scale": good | {"scaling_factor": "big"},
        "text": good | {"text_encoder": {"shape": [77, -1]}},
        "resolution": good | {"resolution": 10**30},
        "entry": good | {"shards": {"00000": 5}},
    }
    for name, manifest in tampered.items():
        (z / f"lat-{name}").mkdir()
        make_shard(z / f"lat-{name}" / "00000.tar", [])
        (z / f"lat-{name}" / "manifest.json").write_text(json.dumps(manifest))
    for name, damage in (("missing", None), ("cut", b"\xff" * 8), ("state", "bad")):  # damaged checkpoints
        folder = z / f"ck-{name}" / "checkpoints" / "step-0000002"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text("{not json" if damage == "bad" else '{"step": 2, "config": {}}')
        (folder / "unet_config.json").write_text("{}")
        if isinstance(damage, bytes):
            (folder / "ema.safetensors").write_bytes(damage)
        elif damage == "bad":
            from safetensors.torch import save_file

            save_file({"w": torch.zeros(2)}, str(folder / "ema.safetensors"))
    scores = z / "scores"
    scores.mkdir()
    table = pa.table(
        {
            "key": ["000000000"],
            "url": ["u"],
            "caption": ["c"],
            "width": pa.array([160], pa.int32()),
            "height": pa.array([120], pa.int32()),
            "original_width": pa.array([160], pa.int32()),
            "original_height": pa.array([120], pa.int32()),
            "aesthetic": pa.array([5.0], pa.float32()),
            "clip_similarity": pa.array([0.3], pa.float32()),
            "error": pa.array([None], pa.string()),
        }
    )
    pq.write_table(table, scores / "00000.parquet")
    (scores / "00000.stats.json").write_text(json.dumps({"shard": "00000", "images": 1}))
    (z / "labels.csv").write_text("key,target\n000000000,hello\n")
    np.save(z / "emb.npy", np.zeros((1, 32), np.float16))
    _round_two_files(z)
    return z


def _round_two_files(z):
    """The inputs of the second hostile pass: dedup's embeddings and keys, folders to pack, damaged score
    shards and work folders, head files."""
    import io
    import os

    from safetensors.torch import save_file

    from latentmill.filters.heads import aesthetic_v2_module

    def scores(name, shards, extra=None):
        (z / name / "scores").mkdir(parents=True)
        (z / name / "embeddings").mkdir()
        for i, (keys, embeddings) in enumerate(shards):
            columns = {"key": keys, "aesthetic": pa.array([5.0] * len(keys), pa.float32())} | (extra or {})
            pq.write_table(pa.table(columns), z / name / "scores" / f"{i:05d}.parquet")
            (z / name / "scores" / f"{i:05d}.stats.json").write_text("{}")
            target = z / name / "embeddings" / f"{i:05d}.npy"
            if isinstance(embeddings, bytes):
                target.write_bytes(embeddings)
            else:
                np.save(target, embeddings, allow_pickle=True)

    keys, f16 = [f"k{i}" for i in range(4)], np.ones((4, 8), np.float16)
    whole = io.BytesIO()
    np.save(whole, f16)
    scores("dd-width0", [(keys, np.zeros((4, 0), np.float16))])
    scores("dd-1d", [(keys, np.zeros(4, np.float16))])
    scores("dd-3d", [(keys, np.zeros((4, 2, 2), np.float16))])
    scores("dd-mixed", [(keys, f16), ([f"j{i}" for i in range(4)], np.ones((4, 16), np.float16))])
    scores("dd-intkeys", [(pa.array([1, 2, 3, 4]), f16)])
    scores("dd-nullkeys", [(pa.array(["a", None, "b", "c"]), f16)])
    scores("dd-pickled", [(keys, np.array([{"a": 1}] * 4, dtype=object))])
    scores("dd-garbage", [(keys, b"garbage")])
    scores("dd-truncated", [(keys, whole.getvalue()[:-10])])
    scores("dd-strings", [(keys, np.array([["a"] * 8] * 4))])
    scores("dd-complex", [(keys, np.ones((4, 8), np.complex64))])
    scores("dd-samekey", [(["same"] * 50, np.random.default_rng(0).random((50, 8)).astype(np.float16))])
    scores("dd-crosskey", [(keys, f16), (["k9", "k8", "k2", "k7"], f16)])
    scores("dd-rows", [([*keys, "k5"], f16)])
    scores("dd-keep", [(keys, f16)], extra={"licence": ["cc"] * 4})
    jpg = image_entry("p", 320, 256)[1]["jpg"]
    (z / "pics-folder-caption").mkdir()
    (z / "pics-folder-caption" / "a.jpg").write_bytes(jpg)
    (z / "pics-folder-caption" / "a.txt").mkdir()
    (z / "pics-latin1").mkdir()
    (z / "pics-latin1" / "b.jpg").write_bytes(jpg)
    with open(os.fsencode(z / "pics-latin1") + b"/caf\xe9.jpg", "wb") as f:
        f.write(jpg)
    (z / "afile").write_text("not a folder")
    (z / "badsel").mkdir()
    (z / "badsel" / "00000.parquet").write_text("garbage")
    (z / "folder-source.yaml").write_text("urls:\n  source: folder\n  path: /nonexistent/pictures\n")
    base = {
        "key": ["000000000"],
        "url": ["u"],
        "caption": ["c"],
        "aesthetic": pa.array([5.0], pa.float32()),
    }
    for name, table, damage in (
        ("w-noerror", pa.table(base), None),
        ("w-cut", pa.table(base | {"error": pa.array([None], pa.string())}), "cut"),
        ("w-manifest", pa.table(base | {"error": pa.array([None], pa.string())}), "{broken"),
    ):
        (z / name / "images").mkdir(parents=True)
        make_shard(z / name / "images" / "00000.tar", [image_entry("000000000", 160, 120)])
        (z / name / "scores").mkdir()
        pq.write_table(table, z / name / "scores" / "00000.parquet")
        (z / name / "scores" / "00000.stats.json").write_text("{}")
        if damage == "cut":
            data = (z / name / "scores" / "00000.parquet").read_bytes()
            (z / name / "scores" / "00000.parquet").write_bytes(data[: len(data) // 2])
        elif damage:
            (z / name / "latents-128").mkdir()
            (z / name / "latents-128" / "manifest.json").write_text(damage)
    (z / "w-cut" / "selection").mkdir()
    (z / "w-cut" / "selection" / "funnel.json").write_text('{"kept": ')  # cut off
    fit = z / "fit"
    (fit / "scores").mkdir(parents=True)
    (fit / "embeddings").mkdir()
    labelled = [f"k{i}" for i in range(20)]
    pq.write_table(pa.table({"key": labelled}), fit / "scores" / "00000.parquet")
    np.save(fit / "embeddings" / "00000.npy", np.ones((15, 8), np.float16))
    (z / "labels20.csv").write_text(
        "key,target\n" + "".join(f"{k},{i % 2}\n" for i, k in enumerate(labelled))
    )
    (z / "fit-pickled" / "scores").mkdir(parents=True)
    (z / "fit-pickled" / "embeddings").mkdir()
    pq.write_table(pa.table({"key": labelled}), z / "fit-pickled" / "scores" / "00000.parquet")
    np.save(
        z / "fit-pickled" / "embeddings" / "00000.npy", np.array([{}] * 20, dtype=object), allow_pickle=True
    )
    state = aesthetic_v2_module(32).state_dict()
    torch.save(state | {"layers.7.bias": torch.zeros(3)}, z / "head-bias.pth")
    torch.save(state | {"extra": torch.zeros(1)}, z / "head-extra.pth")
    torch.save(state | {"layers.7.bias": "0.5"}, z / "head-string.pth")
    torch.save(state | {"layers.0.weight": torch.full((1024, 32), float("nan"))}, z / "head-nan.pth")
    for name, dim in (("fitted-dim", "-3"), ("fitted-dim-text", "wide")):
        save_file(
            {"0.weight": torch.zeros(1, 8), "0.bias": torch.zeros(1)},
            str(z / f"{name}.safetensors"),
            metadata={"format": "latentmill.head/1", "column": "mine", "kind": "linear", "input_dim": dim,
                      "task": "regression"},
        )  # fmt: skip


def cases():
    """(id, args with {z} for the zoo, what the message must name)."""
    L, R, IM, S = "{z}/lat", "{z}/run", "{z}/images", "{z}/scores"
    train = ["train", L, "-o", R, "--model", "tiny"]
    sample = ["sample", "{z}/emptydir", "--prompt", "x"]
    score = ["score", IM, "-o", "{z}/out", "--clip-model", "latentmill-tiny", "--pretrained", "none"]
    select = ["select", S, "-o", "{z}/sel"]
    download = ["download", "{z}/nourl.csv", "-o", "{z}/img"]
    fit = [
        "fit-head",
        "--embeddings",
        "{z}",
        "--labels",
        "{z}/labels.csv",
        "--target",
        "target",
        "-o",
        "{z}/h.safetensors",
    ]
    return [
        # options: ranges, finiteness, choices
        ("train-batch-0", [*train, "--batch-size", "0"], "--batch-size"),
        ("train-lr-nan", [*train, "--learning-rate", "nan"], "--learning-rate"),
        ("train-lr-0", [*train, "--learning-rate", "0"], "--learning-rate"),
        ("train-steps-neg", [*train, "--steps", "-1"], "--steps"),
        ("train-accum-0", [*train, "--grad-accum", "0"], "--grad-accum"),
        ("train-ckpt-0", [*train, "--checkpoint-every", "0"], "--checkpoint-every"),
        ("train-dropout", [*train, "--caption-dropout", "1.5"], "--caption-dropout"),
        ("train-ema", [*train, "--ema-decay", "-0.1"], "--ema-decay"),
        ("train-keep-0", [*train, "--keep-checkpoints", "0"], "--keep-checkpoints"),
        ("train-workers", [*train, "--workers", "-1"], "--workers"),
        ("train-warmup", [*train, "--warmup-steps", "-5"], "--warmup-steps"),
        ("train-offset-inf", [*train, "--noise-offset", "inf"], "--noise-offset"),
        ("train-log-0", [*train, "--log-every", "0"], "--log-every"),
        ("train-precision", [*train, "--precision", "fp8"], "--precision"),
        ("train-mode", [*train, "--mode", "sometimes"], "--mode"),
        ("train-steps-text", [*train, "--steps", "ten"], "--steps"),
        ("sample-steps-0", [*sample, "--steps", "0"], "--steps"),
        ("sample-width-0", [*sample, "--width", "0"], "--width"),
        ("sample-guidance-nan", [*sample, "--guidance", "nan"], "--guidance"),
        ("buckets-res-0", ["buckets", "--resolution", "0"], "--resolution"),
        ("buckets-step-0", ["buckets", "--step", "0"], "--step"),
        ("buckets-min-side", ["buckets", "--resolution", "512", "--bucket-min-side", "600"], "min side 600"),
        ("encode-batch-0", ["encode", IM, "-o", "{z}/o", "--batch-size", "0"], "--batch-size"),
        ("encode-res-neg", ["encode", IM, "-o", "{z}/o", "--resolution", "-1"], "--resolution"),
        ("encode-crop", ["encode", IM, "-o", "{z}/o", "--crop", "diagonal"], "crop"),
        ("encode-assign", ["encode", IM, "-o", "{z}/o", "--bucket-assign", "nearest"], "bucket-assign"),
        ("score-batch-0", [*score, "--batch-size", "0"], "--batch-size"),
        ("score-workers", [*score, "--workers", "-1"], "--workers"),
        ("score-threads", [*score, "--torch-threads", "0"], "--torch-threads"),
        ("score-actors", [*score, "--actors", "0"], "--actors"),
        ("select-aspect", [*select, "--max-aspect", "0.5"], "--max-aspect"),
        ("select-punsafe-nan", [*select, "--max-punsafe", "nan"], "--max-punsafe"),
        ("select-min-side", [*select, "--min-side", "0"], "--min-side"),
        ("fit-epochs", [*fit, "--epochs", "0"], "--epochs"),
        ("fit-validation", [*fit, "--validation-fraction", "1.0"], "--validation-fraction"),
        ("download-threads", [*download, "--http-threads", "0"], "--http-threads"),
        ("download-timeout", [*download, "--timeout", "0"], "--timeout"),
        ("download-shard-size", [*download, "--shard-size", "0"], "--shard-size"),
        ("download-retries", [*download, "--retries", "-1"], "--retries"),
        ("download-aspect-nan", [*download, "--max-aspect", "nan"], "--max-aspect"),
        (
            "merge-alpha-nan",
            ["merge", "{z}/emptydir", "{z}/emptydir", "--alpha", "nan", "-o", "{z}/m"],
            "--alpha",
        ),
        # tables
        ("table-no-url", ["urls", "inspect", "{z}/nourl.csv"], "no URL column"),
        ("table-bad-jsonl", ["urls", "inspect", "{z}/bad.jsonl"], "bad.jsonl"),
        ("table-empty", ["urls", "inspect", "{z}/empty.csv"], "empty.csv: the file is empty"),
        (
            "table-not-parquet",
            ["urls", "inspect", "{z}/notparquet.parquet"],
            "notparquet.parquet: cannot be read as parquet",
        ),
        ("table-empty-folder", ["urls", "inspect", "{z}/emptydir"], "holds no .parquet"),
        ("prefilter-no-url", ["urls", "prefilter", "{z}/nourl.csv", "-o", "{z}/out.parquet"], "--url-col"),
        ("download-no-url", download, "--url-col"),
        (
            "download-allow-host-no-port",
            ["download", "{z}/ok.csv", "-o", "{z}/img", "--allow-host", "127.0.0.1"],
            "--allow-host '127.0.0.1': write HOST:PORT",
        ),
        (
            "prefilter-allow-host-port",
            ["urls", "prefilter", "{z}/ok.csv", "-o", "{z}/o.parquet", "--allow-host", "127.0.0.1:99999"],
            "write HOST:PORT",
        ),
        # recipes
        ("recipe-list", ["run", "{z}/list.yaml", "--work", "{z}/w"], "a recipe is a mapping"),
        (
            "recipe-section-list",
            ["run", "{z}/sectionlist.yaml", "--work", "{z}/w"],
            "section train is a mapping",
        ),
        ("recipe-unknown-key", ["run", "{z}/unknown.yaml", "--work", "{z}/w"], "train.bogus_key"),
        ("recipe-python-tag", ["run", "{z}/evil.yaml", "--work", "{z}/w"], "not valid YAML"),
        ("recipe-batch-0", ["run", "{z}/bs0.yaml", "--work", "{z}/w"], "train.batch_size"),
        ("recipe-steps-text", ["run", "{z}/steps-text.yaml", "--work", "{z}/w"], "train.steps"),
        (
            "recipe-precision-fp16",
            ["run", "{z}/fp16.yaml", "--work", "{z}/w"],
            "fp16 training needs a gradient scaler",
        ),
        ("recipe-stages-map", ["run", "{z}/stages-map.yaml", "--work", "{z}/w"], "stages is a list"),
        ("recipe-stage-item", ["run", "{z}/stage-item.yaml", "--work", "{z}/w"], "stages[0]"),
        ("recipe-bad-yaml", ["run", "{z}/badyaml.yaml", "--work", "{z}/w"], "badyaml.yaml: not valid YAML"),
        ("recipe-unknown-name", ["run", "no-such-recipe", "--work", "{z}/w"], "no-such-recipe"),
        ("recipe-bad-set", ["run", "demo", "--work", "{z}/w", "--set", "trainsteps"], "section.key=value"),
        # heads
        ("head-aesthetic-empty", [*score, "--aesthetic-head", "{z}/empty.pth"], "empty.pth"),
        (
            "head-aesthetic-text",
            [*score, "--aesthetic-head", "{z}/text.pth"],
            "text.pth: not a PyTorch state dict",
        ),
        ("head-aesthetic-shape", [*score, "--aesthetic-head", "{z}/wrongshape.pth"], "wrongshape.pth"),
        ("head-unsafe-text", [*score, "--unsafe-head", "{z}/text.pth"], "text.pth"),
        (
            "head-unsafe-missing",
            [*score, "--unsafe-head", "{z}/nowhere.zip"],
            "nowhere.zip: no such unsafe-head file",
        ),
        ("head-watermark-empty", [*score, "--watermark-head", "{z}/empty.pth"], "empty.pth"),
        ("head-fitted-text", [*score, "--head", "{z}/text.safetensors"], "text.safetensors"),
        (
            "convert-not-zip",
            ["convert-head", "laion-nsfw", "{z}/text.pth", "-o", "{z}/h.safetensors"],
            "text.pth: not LAION's",
        ),
        ("convert-out-suffix", ["convert-head", "laion-nsfw", "{z}/text.pth", "-o", "{z}/h.pt"], "-o"),
        ("fit-reserved-column", [*fit, "--column", "caption"], "cannot write column 'caption'"),
        ("fit-text-labels", fit, "row 2 (key 000000000) has 'hello'"),
        # folders, runs, latents
        ("images-empty", ["images", "inspect", "{z}/emptydir"], "no .tar image shards"),
        ("encode-empty", ["encode", "{z}/emptydir", "-o", "{z}/o"], "no .tar image shards"),
        (
            "score-empty",
            [
                "score",
                "{z}/emptydir",
                "-o",
                "{z}/o",
                "--clip-model",
                "latentmill-tiny",
                "--pretrained",
                "none",
            ],
            "emptydir",
        ),
        ("select-empty", ["select", "{z}/emptydir", "-o", "{z}/sel"], "no finished score shards"),
        ("report-empty", ["report", "{z}/emptydir"], "not a latentmill work folder"),
        ("export-no-ckpt", ["export", "{z}/emptydir", "-o", "{z}/p"], "no checkpoints"),
        ("sample-no-ckpt", sample, "no checkpoints"),
        (
            "merge-no-ckpt",
            ["merge", "{z}/emptydir", "{z}/emptydir", "--alpha", "0.5", "-o", "{z}/m"],
            "emptydir: no checkpoints",
        ),
        ("train-no-tars", train, "no latent shards"),
        ("train-no-model", ["train", L, "-o", R], "train: give --model: tiny, sd15, sd2-base"),
        (
            "train-missing-pattern",
            ["train", "{z}/lat/{00000..00003}.tar", "-o", R, "--model", "tiny"],
            "no latent shards at",
        ),
        ("train-resume-new-run", [*train, "--resume"], "no latent shards"),
        # tampered manifests
        ("manifest-list", ["train", "{z}/lat-list", "-o", R, "--model", "tiny"], "not a latentmill manifest"),
        (
            "manifest-no-channels",
            ["train", "{z}/lat-channels", "-o", R, "--model", "tiny"],
            "no 'latent_channels'",
        ),
        ("manifest-buckets", ["latents", "verify", "{z}/lat-buckets"], "'buckets' is"),
        (
            "manifest-scale",
            ["train", "{z}/lat-scale", "-o", R, "--model", "tiny"],
            "'scaling_factor' is \"big\"",
        ),
        ("manifest-text-shape", ["latents", "verify", "{z}/lat-text"], "'text_encoder' is"),
        (
            "manifest-resolution",
            ["train", "{z}/lat-resolution", "-o", R, "--model", "tiny"],
            "'resolution' is",
        ),
        # damaged checkpoints
        ("ckpt-export-missing", ["export", "{z}/ck-missing", "-o", "{z}/p"], "ema.safetensors is missing"),
        ("ckpt-sample-cut", ["sample", "{z}/ck-cut", "--prompt", "x"], "ema.safetensors is cut off"),
        (
            "ckpt-merge-missing",
            ["merge", "{z}/ck-missing", "{z}/ck-cut", "--alpha", "0.5", "-o", "{z}/m"],
            "step-0000002",
        ),
        ("ckpt-export-state", ["export", "{z}/ck-state", "-o", "{z}/p"], "state.json is unreadable"),
        # selection rules
        ("where-import", [*select, "--where", "import os"], "rule 'import os'"),
        ("where-dunder", [*select, "--where", "__import__('os').system('x')"], "found Call"),
        ("where-unknown-column", [*select, "--where", "beauty > 3"], "beauty"),
        ("where-huge-literal", [*select, "--where", "aesthetic > 0x" + "f" * 300], "not a finite float"),
        ("where-deep-nesting", [*select, "--where", "not " * 400 + "aesthetic > 1"], "nested too deeply"),
        ("where-too-long", [*select, "--where", "not " * 3000 + "aesthetic > 1"], "a rule may have 2,000"),
        ("select-preset", [*select, "--preset", "laion-best"], "laion-best"),
        # round two: dedup's inputs
        *[
            (
                f"dedup-{name}",
                ["dedup", f"{{z}}/dd-{name}/scores", "-o", f"{{z}}/dd-{name}/out", *extra],
                culprit,
            )
            for name, extra, culprit in (
                (
                    "width0",
                    [],
                    "00000.npy: not an embeddings file written by `latentmill score --save-embeddings`: shape [4, 0]",
                ),
                ("1d", [], "shape [4], expected (images, width)"),
                ("3d", [], "shape [4, 2, 2], expected"),
                ("mixed", [], "00001.npy: 16-d embeddings, but the other shards' are 8-d"),
                ("intkeys", [], "00000.parquet: the key column is int64, expected strings"),
                ("nullkeys", [], "00000.parquet: 1 row(s) without a key"),
                (
                    "pickled",
                    [],
                    "00000.npy: not an embeddings file written by `latentmill score --save-embeddings`: its values are pickled Python objects",
                ),
                ("garbage", [], "00000.npy: not an embeddings file"),
                ("truncated", [], "00000.npy: 54 bytes of data for float16[4, 8] (64 expected)"),
                ("strings", [], "its values are <U1"),
                ("complex", [], "its values are complex64"),
                ("samekey", [], "key 'same' is on 50 rows (shard(s) 00000)"),
                ("crosskey", [], "key 'k2' is on 2 rows (shard(s) 00000, 00001)"),
                ("rows", [], "00000.npy: 4 rows for the 5 keys of its score shard"),
                ("keep", ["--keep", "licence"], "--keep licence: in"),
            )
        ],
        # round two: packing a folder
        (
            "pack-caption-folder",
            ["images", "pack", "{z}/pics-folder-caption", "-o", "{z}/packed", "--caption", "x"],
            "a.txt: a folder where a.jpg's caption file would be",
        ),
        (
            "pack-not-utf8",
            ["images", "pack", "{z}/pics-latin1", "-o", "{z}/packed", "--caption", "x"],
            "caf\\xe9.jpg': the file name is not UTF-8",
        ),
        ("pack-out-file", ["images", "pack", "{z}/pics-latin1", "-o", "{z}/afile"], "-o {z}/afile: a file"),
        # round two: damaged score shards, funnels and manifests
        ("select-no-error-column", ["select", "{z}/w-noerror/scores", "-o", "{z}/sel"], "no 'error' column"),
        (
            "select-cut-parquet",
            ["select", "{z}/w-cut/scores", "-o", "{z}/sel"],
            "00000.parquet: cannot be read as parquet",
        ),
        ("report-cut-funnel", ["report", "{z}/w-cut", "-o", "{z}/rep"], "funnel.json: damaged JSON"),
        # round three: options and outputs checked before work
        (
            "encode-absent-gpu",
            ["encode", "{z}/images", "-o", "{z}/enc", "--vae", "tiny", "--device", "cuda"],
            "--device auto",
        ),
        (
            "train-absent-gpu",
            ["train", "{z}/lat", "-o", "{z}/r", "--model", "tiny", "--device", "cuda:3"],
            "--device auto",
        ),
        (
            "score-absent-gpu",
            [
                "score",
                "{z}/images",
                "-o",
                "{z}/s",
                "--clip-model",
                "tiny",
                "--pretrained",
                "none",
                "--device",
                "cuda",
            ],
            "--device auto",
        ),
        (
            "eval-not-a-device",
            ["eval", "fid", "{z}/images", "{z}/images", "--features", "clip:tiny", "--device", "gpu"],
            "not a torch device",
        ),
        (
            "train-cache-dir-a-file",
            ["train", "{z}/lat", "-o", "{z}/r", "--model", "tiny", "--cache-dir", "{z}/ok.csv"],
            "ok.csv is a file, not a folder",
        ),
        (
            "recipe-storage-option-number",
            ["run", "{z}/so-number.yaml", "-w", "{z}/wso", "--dry-run"],
            "endpoint_url = 9000",
        ),
        (
            "recipe-storage-timeout",
            ["run", "{z}/so-timeout.yaml", "-w", "{z}/wso", "--dry-run"],
            "read_timeout = -1",
        ),
        (
            "storage-option-number",
            ["score", "{z}/images", "-o", "{z}/s", "--storage-option", "anon=3"],
            "anon = 3",
        ),
        ("eval-output-a-folder", ["eval", "run", "{z}/ck-state", "-o", "{z}/emptydir"], "is a directory"),
        (
            "sample-output-a-folder",
            ["sample", "{z}/ck-state", "--prompt", "x", "-o", "{z}/emptydir"],
            "is a directory",
        ),
        (
            "report-broken-manifest",
            ["report", "{z}/w-manifest", "-o", "{z}/rep"],
            "manifest.json: cannot read the manifest",
        ),
        # round two: fit-head's embeddings, head files
        (
            "fit-rows",
            [
                "fit-head",
                "--embeddings",
                "{z}/fit/embeddings",
                "--labels",
                "{z}/labels20.csv",
                "--target",
                "target",
                "-o",
                "{z}/h.safetensors",
            ],
            "00000.npy: 15 rows for the 20 keys",
        ),
        (
            "fit-pickled",
            [
                "fit-head",
                "--embeddings",
                "{z}/fit-pickled/embeddings",
                "--labels",
                "{z}/labels20.csv",
                "--target",
                "target",
                "-o",
                "{z}/h.safetensors",
            ],
            "pickled Python objects",
        ),
        (
            "head-bias-shape",
            [*score, "--aesthetic-head", "{z}/head-bias.pth"],
            "layers.7.bias has shape [3], expected [1]",
        ),
        (
            "head-extra-key",
            [*score, "--aesthetic-head", "{z}/head-extra.pth"],
            "'extra' is not a tensor of a LAION aesthetic head",
        ),
        (
            "head-string-value",
            [*score, "--aesthetic-head", "{z}/head-string.pth"],
            "layers.7.bias is a str, not a tensor",
        ),
        (
            "head-nan",
            [*score, "--aesthetic-head", "{z}/head-nan.pth"],
            "layers.0.weight holds NaN or infinite values",
        ),
        ("head-fitted-dim", [*score, "--head", "{z}/fitted-dim.safetensors"], "metadata input_dim is '-3'"),
        (
            "head-fitted-dim-text",
            [*score, "--head", "{z}/fitted-dim-text.safetensors"],
            "metadata input_dim is 'wide'",
        ),
        # round two: options
        (
            "recipe-set-yaml-tag",
            ["run", "demo", "--work", "{z}/w", "--set", "train.steps=!!python/object/apply:os.system [echo]"],
            "the value is not plain YAML",
        ),
        (
            "recipe-set-yaml-anchor",
            ["run", "demo", "--work", "{z}/w", "--set", "train.steps=*nowhere"],
            "train.steps=*nowhere",
        ),
        (
            "recipe-folder-until-prefilter",
            ["run", "{z}/folder-source.yaml", "--work", "{z}/w", "--until", "prefilter"],
            "--until prefilter: the prefilter stage does not run for this recipe (its pictures come from a folder",
        ),
        (
            "recipe-folder-missing",
            ["run", "{z}/folder-source.yaml", "--work", "{z}/w", "--until", "download"],
            "the image folder /nonexistent/pictures does not exist",
        ),
        (
            "verify-manifest-entry",
            ["latents", "verify", "{z}/lat-entry"],
            "the entry of shard 00000 is 5, not a table",
        ),
        (
            "encode-out-file",
            ["encode", "{z}/images", "-o", "{z}/afile", "--vae", "tiny"],
            "afile: a file, where a folder",
        ),
        ("score-out-file", [*score[:2], "-o", "{z}/afile", *score[4:]], "afile: a file, where a folder"),
        (
            "encode-garbage-selection",
            ["encode", "{z}/images", "-o", "{z}/o", "--vae", "tiny", "--selection", "{z}/badsel"],
            "badsel/00000.parquet: cannot be read as parquet",
        ),
        ("serve-port", ["serve-images", "--port", "99999"], "99999 is not in the range 0<=x<=65535"),
    ]


CASES = cases()


def test_the_corpus_is_large():
    assert len(CASES) >= 80 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, args, culprit", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_exit_2_naming_the_culprit_and_changes_nothing(zoo, run_cli, name, args, culprit):
    before = tree_digest(zoo)
    result = run_cli(*[a.replace("{z}", str(zoo)) for a in args])
    assert result.exit_code == 2, (name, result.exit_code, result.output[-600:])
    assert culprit.replace("{z}", str(zoo)) in result.output, (name, result.output[-600:])
    assert "Traceback" not in result.output
    assert tree_digest(zoo) == before, f"{name} changed the folder"


def test_images_pack_skips_files_linked_from_outside_the_folder(tmp_path, run_cli):
    """A link out of the packed folder brings nothing in: not an image from elsewhere, not a system file
    as a caption. Both are skipped and counted as outside_folder."""
    import tarfile

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.txt").write_text("SECRET TOKEN 1234")
    (elsewhere / "other.jpg").write_bytes(image_entry("o", 320, 256, seed=3)[1]["jpg"])
    folder = tmp_path / "pictures"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(image_entry("g", 320, 256, seed=1)[1]["jpg"])
    (folder / "good.txt").write_text("a good picture")
    (folder / "linked.jpg").symlink_to(elsewhere / "other.jpg")  # an image from elsewhere
    (folder / "leaky.jpg").write_bytes(image_entry("l", 320, 256, seed=2)[1]["jpg"])
    (folder / "leaky.txt").symlink_to(elsewhere / "secret.txt")  # a caption from a file elsewhere
    result = run_cli("images", "pack", folder, "-o", tmp_path / "packed")
    assert result.exit_code == 0, result.output
    assert "packed 1 image(s); dropped: outside_folder 2" in result.output
    with tarfile.open(tmp_path / "packed" / "00000.tar") as tar:
        contents = b"".join(tar.extractfile(m).read() for m in tar.getmembers())
    assert b"SECRET TOKEN" not in contents and b"a good picture" in contents
    (folder / "inside.txt").write_text("a caption inside")
    (folder / "also.jpg").symlink_to(folder / "good.jpg")  # a link that stays inside is fine
    (folder / "also.txt").symlink_to(folder / "inside.txt")
    again = run_cli("images", "pack", folder, "-o", tmp_path / "packed-2")
    assert "packed 2 image(s); dropped: outside_folder 2" in again.output, again.output


def test_the_instance_folder_as_its_own_class_data_is_refused(tmp_path):
    from latentmill.errors import InputError
    from latentmill.train.config import TrainConfig

    (tmp_path / "dog").mkdir()
    for class_data in (str(tmp_path / "dog"), str(tmp_path / "dog") + "/", str(tmp_path / "." / "dog")):
        config = TrainConfig(output=str(tmp_path / "run"), model="tiny", instance=str(tmp_path / "dog"),
                             class_data=class_data)  # fmt: skip
        with pytest.raises(
            InputError, match=r"\(--class-data\) .* is the train.instance \(--instance\) folder"
        ):
            config.validate()
    (tmp_path / "dogs").mkdir()
    TrainConfig(output=str(tmp_path / "run"), model="tiny", instance=str(tmp_path / "dog"),
                class_data=str(tmp_path / "dogs")).validate()  # fmt: skip


def test_a_lora_rank_above_the_adapted_layers_smallest_dimension_is_refused():
    from latentmill.errors import InputError
    from latentmill.train.lora import add_lora, target_modules
    from latentmill.train.models import build_unet

    unet = build_unet("tiny", latent_channels=4, cross_attention_dim=32, sample_size=16)
    layers = dict(unet.named_modules())
    limit = min(min(layers[n].in_features, layers[n].out_features) for n in target_modules(unet, "attention"))
    with pytest.raises(
        InputError, match=rf"--lora-rank 100000 is above .* layers it adapts \({limit}, .*to_"
    ):
        add_lora(unet, 100000, 1.0, "attention", seed=0)
    with pytest.raises(InputError, match=rf"--lora-rank {limit + 1} is above"):
        add_lora(unet, limit + 1, 1.0, "attention", seed=0)
    assert add_lora(unet, limit, 1.0, "attention", seed=0)  # the largest rank that adds capacity


# --- convert-head on hostile archives ----------------------------------------------------------------

SAVED = "clip_autokeras_nsfw_b32/"
GARBAGE_MODEL = {
    SAVED + "saved_model.pb": b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01garbage",
    SAVED + "keras_metadata.pb": b"\x0a\x05hello",
    SAVED + "variables/variables.index": b"not a table",
    SAVED + "variables/variables.data-00000-of-00001": b"",
}


def _write_zip(path, members, method=None):
    import zipfile

    with zipfile.ZipFile(path, "w", method or zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _patch_zip_headers(path, member, offsets):
    """Overwrite fields of `member`'s local and central headers: {(local offset, central offset): bytes}."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    for signature, start in ((b"PK\x03\x04", 30), (b"PK\x01\x02", 46)):
        at = 0
        while (at := data.find(signature, at)) >= 0:
            if data[at + start : at + start + len(name)] == name:
                for (local, central), value in offsets.items():
                    field = at + (local if signature == b"PK\x03\x04" else central)
                    data[field : field + len(value)] = value
            at += 4
    path.write_bytes(bytes(data))


def _hostile_zips(tmp_path):
    """(id, the zip, what the message must name)."""
    import zipfile

    index = SAVED + "variables/variables.index"
    made = []
    made.append(("garbage-members", _write_zip(tmp_path / "garbage.zip", GARBAGE_MODEL), "not LAION's Keras"))
    empty = {name: b"" for name in GARBAGE_MODEL}
    made.append(("empty-members", _write_zip(tmp_path / "empty.zip", empty), "not LAION's Keras"))
    varint = GARBAGE_MODEL | {SAVED + "keras_metadata.pb": b"\x0a" + b"\xff" * 30}
    made.append(("huge-varint", _write_zip(tmp_path / "varint.zip", varint), "truncated varint"))
    length = GARBAGE_MODEL | {SAVED + "keras_metadata.pb": b"\x0a\xff\xff\xff\xff\x0f{}"}
    made.append(("huge-length", _write_zip(tmp_path / "length.zip", length), "not LAION's Keras"))
    bomb = GARBAGE_MODEL | {SAVED + "saved_model.pb": bytes(64 << 20)}  # 64 MiB of zeros: ~1000:1
    made.append(("zip-bomb", _write_zip(tmp_path / "bomb.zip", bomb), "(a zip bomb?)"))
    traversal = GARBAGE_MODEL | {"../../escaped.pb": b"x"}
    made.append(("path-traversal", _write_zip(tmp_path / "traversal.zip", traversal), "escaped.pb"))
    encrypted = _write_zip(tmp_path / "encrypted.zip", GARBAGE_MODEL)
    _patch_zip_headers(encrypted, index, {(6, 8): b"\x01\x00"})  # general purpose flag: encrypted
    made.append(("encrypted-member", encrypted, "variables.index: an encrypted member"))
    method = _write_zip(tmp_path / "method.zip", GARBAGE_MODEL)
    _patch_zip_headers(method, index, {(8, 10): b"\x63\x00"})  # compression method 99 (AES)
    made.append(("unknown-compression", method, "compression method is not supported"))
    deflate = _write_zip(tmp_path / "deflate.zip", GARBAGE_MODEL | {index: b"table " * 4000})
    data = bytearray(deflate.read_bytes())  # scramble the deflate stream of the index's data
    start = data.find(index.encode()) + len(index)
    data[start + 4 : start + 40] = bytes(range(36))
    deflate.write_bytes(bytes(data))
    made.append(("corrupt-deflate", deflate, "while decompressing data"))
    stored = _write_zip(tmp_path / "stored.zip", GARBAGE_MODEL, method=zipfile.ZIP_STORED)
    made.append(("stored-garbage", stored, "not LAION's Keras"))
    return made


def test_convert_head_refuses_hostile_archives_before_extracting_them(tmp_path, run_cli):
    """Each archive is exit 2 naming the zip and why, with nothing written: not the head, not a temporary
    file beside it, nothing extracted outside the temporary folder."""
    import tempfile

    cases = _hostile_zips(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    before_tmp = set(Path(tempfile.gettempdir()).iterdir())
    for name, archive, culprit in cases:
        result = run_cli("convert-head", "laion-nsfw", archive, "-o", out / "head.safetensors")
        assert result.exit_code == 2, (name, result.output[-600:])
        assert archive.name in result.output and culprit in result.output, (name, result.output[-600:])
        assert "Traceback" not in result.output, name
        assert not list(out.iterdir()), name
    assert not (tmp_path.parent / "escaped.pb").exists() and not list(tmp_path.rglob("escaped.pb"))
    assert set(Path(tempfile.gettempdir()).iterdir()) <= before_tmp  # the extraction folders are gone


@needs_fixtures
@pytest.mark.parametrize(
    "name, culprit",
    [
        ("nan-kernel", "holds NaN or infinite values"),
        ("layer-out-of-order", "not LAION's Keras"),
        ("input-width-text", "not LAION's Keras"),
        ("truncated-index", "not LAION's Keras"),
        ("truncated-data", "does not fit the"),
    ],
)
def test_convert_head_refuses_a_damaged_published_zip_naming_the_tensor(tmp_path, run_cli, name, culprit):
    """LAION's real B/32 zip, one thing changed (lengths kept, so every container still parses)."""
    import zipfile

    from latentmill.filters.tfbundle import _entry, read_table

    source = FIXTURES / "clip_autokeras_nsfw_b32.zip"
    with zipfile.ZipFile(source) as archive:
        members = {m.filename: archive.read(m) for m in archive.infolist() if not m.is_dir()}
    meta, index = SAVED + "keras_metadata.pb", SAVED + "variables/variables.index"
    data = SAVED + "variables/variables.data-00000-of-00001"
    if name == "nan-kernel":
        (tmp_path / "variables.index").write_bytes(members[index])
        kernel = next(
            (key.decode(), _entry(value))
            for key, value in read_table(tmp_path / "variables.index").items()
            if key.endswith(b"kernel/.ATTRIBUTES/VARIABLE_VALUE")
        )
        at = kernel[1]["offset"] + 8
        members[data] = members[data][:at] + np.float32(np.nan).tobytes() + members[data][at + 4 :]
        culprit = f"variable {kernel[0]}: holds NaN"
    elif name == "layer-out-of-order":
        members[meta] = members[meta].replace(b'"class_name": "Dense"', b'"class_name": "ReLU" ', 1)
    elif name == "input-width-text":
        members[meta] = members[meta].replace(b"[null, 512]", b'[null, "a"]', 1)
    elif name == "truncated-index":
        members[index] = members[index][: len(members[index]) // 2]
    elif name == "truncated-data":
        members[data] = members[data][: len(members[data]) // 2]
    archive = _write_zip(tmp_path / "damaged.zip", members)
    result = run_cli("convert-head", "laion-nsfw", archive, "-o", tmp_path / "head.safetensors")
    assert result.exit_code == 2, result.output[-600:]
    assert "damaged.zip" in result.output and culprit in result.output, result.output[-600:]
    assert not (tmp_path / "head.safetensors").exists()


def test_the_prefilter_funnel_counts_hostile_urls_once_each_and_never_negative(tmp_path, run_cli):
    urls = [None, "", "http://10.0.0.1/a.jpg", "http://[::1]/x.jpg", "http://example.com/a.jpg", "ftp://x/y",
            "http://%31%30.0.0.1/a", "http://0x7f000001/", "http://example.com/a.jpg", "http://[fe80::1%25eth0]/",
            "http://user@127.0.0.1:80@example.com/", "HTTP://LOCALHOST./a"] * 3  # fmt: skip
    table = pa.table({"URL": pa.array(urls, pa.string()), "TEXT": ["a caption long enough"] * len(urls)})
    pq.write_table(table, tmp_path / "hostile.parquet")
    result = run_cli("urls", "prefilter", tmp_path / "hostile.parquet", "-o", tmp_path / "kept.parquet")
    assert result.exit_code == 0, result.output
    funnel = json.loads((tmp_path / "kept.funnel.json").read_text())
    assert all(step["dropped"] >= 0 for step in funnel["steps"])
    kept = pq.read_table(tmp_path / "kept.parquet").num_rows
    assert funnel["input_rows"] - sum(s["dropped"] for s in funnel["steps"]) == funnel["kept_rows"] == kept
    reasons = pq.read_table(tmp_path / "kept.dropped.parquet").column("reason").to_pylist()
    assert {r: reasons.count(r) for r in set(reasons)} == {
        s["rule"]: s["dropped"] for s in funnel["steps"] if s["dropped"]
    }


@pytest.mark.parametrize("text", ["e", "+", ".", "1e400", "0", "-5", "1e19", "12 parsecs"])
def test_a_cache_limit_that_is_no_size_is_exit_2_naming_the_option(text, tmp_path, run_cli):
    result = run_cli("train", tmp_path / "latents", "-o", tmp_path / "run", "--model", "tiny",
                     "--cache-limit", text)  # fmt: skip
    assert result.exit_code == 2, result.output
    assert (
        f"--cache-limit {text!r}: give a size such as 50GB" in result.output
        and "Traceback" not in result.output
    )
