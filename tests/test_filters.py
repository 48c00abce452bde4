"""Scoring with a tiny open_clip model and the LAION heads in their published layouts; selection; fit-head."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from latentmill.curate.download import DownloadConfig, download
from latentmill.curate.imageshards import iter_image_shard
from latentmill.errors import InputError, LatentmillWarning
from latentmill.filters.clip import load_clip, resolve_model_name
from latentmill.filters.heads import aesthetic_v2_module, watermark_module
from latentmill.filters.kerasnsfw import KerasNsfw
from latentmill.filters.score import ScoreConfig, score
from latentmill.filters.unsafehead import save_keras_nsfw
from tests.conftest import image_entry, kill_when_done, make_shard, write_table

TINY = dict(clip_model="tiny", pretrained="none", workers=0, batch_size=8)


@pytest.fixture(scope="module")
def downloaded(server, tmp_path_factory):
    """Real image shards from the loopback server, plus one shard with an undecodable image."""
    from latentmill.curate.imageserver import sample_rows

    root = tmp_path_factory.mktemp("filters")
    rows = [r for r in sample_rows(server.url("")) if r["expect"] == "ok"][:20]
    table = write_table(root / "urls.parquet", rows)
    download(
        table,
        root / "images",
        DownloadConfig(
            processes=1,
            http_threads=16,
            timeout=5,
            retries=0,
            shard_size=10,
            allow_hosts=(f"127.0.0.1:{server.port}",),
        ),
    )
    make_shard(
        root / "images" / "99999.tar",
        [
            image_entry("999990000", 300, 200, seed=5),
            ("999990001", {"jpg": b"<html>broken</html>", "txt": b"a broken image"}),
        ],
    )
    return root


def tiny_nsfw(dim=32):
    """A small detector in the converted Keras layout: one categorical column, Dense 64-1, a sigmoid."""
    rng = np.random.default_rng(1)
    lookups = {
        5: {
            f"{v:f}": i + 1 for i, v in enumerate(np.linspace(-0.2, 0.2, 401, dtype=np.float32).astype(float))
        }
    }
    dense = [
        (rng.normal(0, 0.3, (64, dim)).astype(np.float32), rng.normal(0, 0.1, 64).astype(np.float32)),
        (rng.normal(0, 0.3, (1, 64)).astype(np.float32), np.zeros(1, np.float32)),
    ]
    return KerasNsfw(
        dim,
        lookups,
        rng.uniform(-0.1, 0.1, dim).astype(np.float32),
        rng.uniform(0.5, 2.0, dim).astype(np.float32),
        dense,
        ["relu", "sigmoid"],
    )


def write_heads(folder, dim=32):
    torch.manual_seed(1)
    aesthetic = aesthetic_v2_module(dim).state_dict()
    paths = {
        "aesthetic": folder / "sac+logos+ava1-l14-linearMSE.pth",
        "unsafe": folder / "punsafe.safetensors",
        "watermark": folder / "watermark_model_v1.pt",
    }
    torch.save(aesthetic, paths["aesthetic"])
    save_keras_nsfw(tiny_nsfw(dim), paths["unsafe"])
    torch.save({"weights": watermark_module().state_dict()}, paths["watermark"])
    return paths


def test_score_end_to_end_with_the_laion_heads(downloaded, tmp_path):
    heads = write_heads(tmp_path)
    out = tmp_path / "scores"
    totals = score(
        downloaded / "images",
        out,
        ScoreConfig(
            **TINY,
            aesthetic_head=str(heads["aesthetic"]),
            unsafe_head=str(heads["unsafe"]),
            watermark_head=str(heads["watermark"]),
            save_embeddings=True,
        ),
    )
    assert totals["images"] == 22 and totals["scored"] == 21 and totals["error:undecodable"] == 1
    table = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))]).to_pandas()
    embeddings = np.concatenate([np.load(p) for p in sorted((tmp_path / "embeddings").glob("*.npy"))]).astype(
        np.float64
    )
    ok = table["error"].isna().to_numpy()
    assert table.loc[~ok, "aesthetic"].isna().all() and np.isnan(embeddings[~ok]).all()
    e = embeddings[ok]
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=2e-3)

    sd = {k: v.double().numpy() for k, v in torch.load(heads["aesthetic"], weights_only=True).items()}
    x = e
    for i in (0, 2, 4, 6, 7):  # the published MLP: linear layers, no activations
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    np.testing.assert_allclose(table.loc[ok, "aesthetic"], x[:, 0], atol=2e-3)

    x = tiny_nsfw().forward_numpy(e.astype(np.float32))[:, None]  # the Keras forward, lookup included
    np.testing.assert_allclose(table.loc[ok, "punsafe"], x[:, 0], atol=2e-3)

    clip = load_clip("latentmill-tiny", "none")
    text = clip.embed_texts(list(table.loc[ok, "caption"])).numpy()
    np.testing.assert_allclose(table.loc[ok, "clip_similarity"], (e * text).sum(1), atol=5e-3)
    assert table.loc[ok, "pwatermark"].between(0, 1).all()
    assert (table.loc[ok, "width"] > 0).all() and table["key"].is_unique


def test_the_watermark_column_is_the_detector_on_256px_imagenet_pixels(downloaded, tmp_path):
    from torchvision import transforms

    from latentmill.curate.imageshards import iter_image_shard

    heads = write_heads(tmp_path)
    out = tmp_path / "scores"
    score(downloaded / "images", out, ScoreConfig(**TINY, watermark_head=str(heads["watermark"])))
    net = watermark_module()
    net.load_state_dict(torch.load(heads["watermark"], weights_only=True)["weights"])
    net.eval()
    scores = pq.read_table(out / "00000.parquet").to_pandas().set_index("key")
    to_pixels = transforms.Compose(
        [
            transforms.Resize((256, 256)),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    for sample in list(iter_image_shard(downloaded / "images" / "00000.tar"))[:4]:
        with torch.no_grad():
            expected = torch.softmax(net(to_pixels(sample.image())[None]), -1)[0, 0].item()
        assert scores.loc[sample.key, "pwatermark"] == pytest.approx(expected, abs=1e-4)


def test_the_watermark_head_sees_laions_full_decode_on_large_jpegs(tmp_path, run_cli):
    """LAION-5B-WatermarkDetection opens the image at full size, then Resize((256, 256)): a draft decode
    (reduced scale) changes that input, so a pixel head must never get one; CLIP alone may."""
    import io

    from PIL import Image
    from torchvision import transforms

    from latentmill.curate import samples
    from tests.conftest import make_shard

    images = tmp_path / "images"
    images.mkdir()
    sizes = [(2048, 1024), (1280, 960), (640, 480)]
    make_shard(
        images / "00000.tar",
        [
            (
                f"{i:04d}",
                {"jpg": samples.encode(samples.photo("astronaut", w, h, view=i), "jpg"), "txt": b"a photo"},
            )
            for i, (w, h) in enumerate(sizes)
        ],
    )
    heads = write_heads(tmp_path)
    result = run_cli(
        "score",
        images,
        "-o",
        tmp_path / "scores",
        "--clip-model",
        "latentmill-tiny",
        "--pretrained",
        "none",
        "--workers",
        "0",
        "--watermark-head",
        heads["watermark"],
    )
    assert result.exit_code == 0, result.output
    assert "decode: clip full, watermark full" in result.output
    net = watermark_module()
    net.load_state_dict(torch.load(heads["watermark"], weights_only=True)["weights"])
    net.eval()
    to_pixels = transforms.Compose(
        [
            transforms.Resize((256, 256)),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    scores = pq.read_table(tmp_path / "scores" / "00000.parquet").to_pandas().set_index("key")
    for sample in iter_image_shard(images / "00000.tar"):
        full = to_pixels(
            Image.open(io.BytesIO(sample.image_bytes)).convert("RGB")
        )  # LAION's own preprocessing
        draft = to_pixels(sample.image(draft_size=(256, 256)))
        with torch.no_grad():
            expected = torch.softmax(net(full[None]), -1)[0, 0].item()
        assert scores.loc[sample.key, "pwatermark"] == pytest.approx(expected, abs=1e-5)
        if sample.image_bytes and Image.open(io.BytesIO(sample.image_bytes)).width >= 1280:
            assert (full - draft).abs().max() > 0.05  # what the draft shortcut would have changed
    plain = run_cli(
        "score",
        images,
        "-o",
        tmp_path / "clip-only",
        "--clip-model",
        "latentmill-tiny",
        "--pretrained",
        "none",
        "--workers",
        "0",
    )
    assert "decode: clip draft" in plain.output
    exact = run_cli(
        "score",
        images,
        "-o",
        tmp_path / "exact",
        "--clip-model",
        "latentmill-tiny",
        "--pretrained",
        "none",
        "--workers",
        "0",
        "--exact-decode",
    )
    assert "decode: clip full" in exact.output


def test_heads_are_checked_before_any_work(downloaded, tmp_path, run_cli):
    heads = write_heads(tmp_path, dim=768)  # the real ViT-L/14 size, not the tiny model's 32
    tiny = ["score", downloaded / "images", "-o", tmp_path / "s", "--clip-model", "latentmill-tiny"]
    tiny += ["--pretrained", "none"]
    result = run_cli(*tiny, "--aesthetic-head", heads["aesthetic"])
    assert result.exit_code == 2 and "768-d" in result.output and "32-d" in result.output
    assert not (tmp_path / "s").exists()
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1, 32)}, bad)
    result = run_cli(*tiny, "--unsafe-head", bad)
    assert (
        result.exit_code == 2
        and "not a LAION NSFW detector" in result.output
        and "Accepted:" in result.output
    )
    result = run_cli(*tiny, "--aesthetic-head", tmp_path / "nowhere.pth")
    assert result.exit_code == 2 and "nowhere.pth: no such head file" in result.output
    result = run_cli(
        *tiny, "--watermark-head", tmp_path / "none" / "watermark_model_v1.pt"
    )  # where it comes from
    assert result.exit_code == 2 and "LAION-AI/LAION-5B-WatermarkDetection" in result.output, result.output


def test_openai_weights_get_quickgelu():
    with pytest.warns(LatentmillWarning, match="needs QuickGELU"):
        assert resolve_model_name("ViT-L-14", "openai") == "ViT-L-14-quickgelu"
    assert resolve_model_name("ViT-L-14", "laion2b_s32b_b82k") == "ViT-L-14"
    with pytest.raises(InputError, match="pretrained tag"):
        load_clip("latentmill-tiny", "no-such-tag")


def _score_cmd(images, out):
    return [
        sys.executable,
        "-m",
        "latentmill",
        "score",
        str(images),
        "-o",
        str(out),
        "--clip-model",
        "tiny",
        "--pretrained",
        "none",
        "--workers",
        "0",
        "--batch-size",
        "1",
    ]


@pytest.mark.slow  # kills and restarts a subprocess
def test_a_score_killed_midway_resumes_to_the_same_parquets(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for shard in range(6):
        make_shard(
            images / f"{shard:05d}.tar",
            [image_entry(f"{shard:05d}{i:04d}", 200, 150, seed=shard * 10 + i) for i in range(8)],
        )
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    process = subprocess.Popen(
        _score_cmd(images, killed),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = killed / "00000.stats.json"
    kill_when_done(process, marker)
    assert marker.exists() and not (killed / "00005.stats.json").exists(), (
        "the score run was not stopped mid-way"
    )
    subprocess.run(_score_cmd(images, killed), check=True, capture_output=True)
    subprocess.run(_score_cmd(images, reference), check=True, capture_output=True)
    for shard in range(6):
        a = pq.read_table(killed / f"{shard:05d}.parquet")
        b = pq.read_table(reference / f"{shard:05d}.parquet")
        assert a.equals(b)


# --- select -------------------------------------------------------------------------------------------


def write_scores(folder, rows, shard="00000"):
    folder.mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard}.parquet")
    (folder / f"{shard}.stats.json").write_text("{}")


def score_row(key, aesthetic=6.0, pwatermark=0.1, punsafe=0.0, sim=0.3, w=800, h=600, error=None):
    return {
        "key": key,
        "url": f"https://x/{key}",
        "caption": "c",
        "width": w,
        "height": h,
        "original_width": w,
        "original_height": h,
        "aesthetic": aesthetic,
        "pwatermark": pwatermark,
        "punsafe": punsafe,
        "clip_similarity": sim,
        "error": error,
    }


def test_select_funnel_counts_are_exact(tmp_path, run_cli):
    rows = [
        score_row("a"),
        score_row("b", aesthetic=4.0),
        score_row("c", pwatermark=0.9),
        score_row("d", w=300, h=300),
        score_row("e", error="undecodable", aesthetic=None),
        score_row("f", aesthetic=7.0, w=2000, h=600),
        score_row("g", aesthetic=None),
        score_row("h", sim=0.1),
    ]
    write_scores(tmp_path / "scores", rows)
    result = run_cli(
        "select",
        tmp_path / "scores",
        "-o",
        tmp_path / "sel",
        "--preset",
        "sd-v1",
        "--max-aspect",
        "2",
        "--where",
        "clip_similarity >= 0.28 and not punsafe > 0.5",
    )
    assert result.exit_code == 0, result.output
    funnel = json.loads((tmp_path / "sel" / "funnel.json").read_text())
    assert [(s["rule"], s["dropped"]) for s in funnel["steps"]] == [
        ("error", 1),
        ("min_side", 1),
        ("min_aesthetic", 2),
        ("max_pwatermark", 1),
        ("max_aspect", 1),
        ("clip_similarity >= 0.28 and not punsafe > 0.5", 1),
    ]
    assert funnel["kept"] == 1
    selection = pq.read_table(tmp_path / "sel" / "00000.parquet").to_pylist()
    assert {r["key"]: (r["keep"], r["reason"]) for r in selection} == {
        "a": (True, ""),
        "b": (False, "min_aesthetic"),
        "c": (False, "max_pwatermark"),
        "d": (False, "min_side"),
        "e": (False, "error:undecodable"),
        "f": (False, "max_aspect"),
        "g": (False, "min_aesthetic"),
        "h": (False, "clip_similarity >= 0.28 and not punsafe > 0.5"),
    }
    png = tmp_path / "sel" / "plots" / "aesthetic.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "where, message",
    [
        ("__import__('os').system('true')", "only comparisons"),
        ("aesthetic.real > 5", "compare columns with numbers only"),
        ("aesthtic >= 5", "Did you mean 'aesthetic'"),
        ("aesthetic >= 'high'", "compare columns with numbers only"),
        ("aesthetic + 1 > 5", "compare columns with numbers only"),
        ("aesthetic >=", "not a valid expression"),
        ("aesthetic in [1, 2]", "only <, <=, >, >=, ==, != compare"),
    ],
)
def test_where_accepts_only_comparisons_of_known_columns(tmp_path, run_cli, where, message):
    write_scores(tmp_path / "scores", [score_row("a")])
    result = run_cli("select", tmp_path / "scores", "-o", tmp_path / "sel", "--where", where)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "sel" / "00000.parquet").exists()


def test_chained_and_negative_comparisons(tmp_path):
    from latentmill.filters.select import SelectConfig, select

    write_scores(
        tmp_path / "scores",
        [score_row("a", aesthetic=5.5), score_row("b", aesthetic=7.5), score_row("c", sim=-0.2)],
    )
    funnel = select(
        tmp_path / "scores",
        tmp_path / "sel",
        SelectConfig(where=["5 <= aesthetic < 7", "clip_similarity > -0.1"], plots=False),
    )
    assert funnel["kept"] == 1 and [s["dropped"] for s in funnel["steps"]] == [0, 1, 1]


# --- fit-head -----------------------------------------------------------------------------------------


def write_embeddings(root, x, keys):
    (root / "embeddings").mkdir(parents=True)
    (root / "scores").mkdir()
    np.save(root / "embeddings" / "00000.npy", x.astype(np.float16))
    pq.write_table(pa.table({"key": keys}), root / "scores" / "00000.parquet")


def test_fit_head_separates_separable_embeddings_and_not_shuffled_labels(tmp_path, run_cli):
    rng = np.random.default_rng(0)
    n, d = 400, 32
    direction = rng.normal(size=d)
    x = rng.normal(size=(n, d))
    labels = (x @ direction > 0).astype(int)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    keys = [f"{i:09d}" for i in range(n)]
    write_embeddings(tmp_path, x, keys)
    write_table(
        tmp_path / "labels.parquet",
        [{"key": k, "watermark": int(v)} for k, v in zip(keys, labels, strict=True)],
    )
    result = run_cli(
        "fit-head",
        "--embeddings",
        tmp_path / "embeddings",
        "--labels",
        tmp_path / "labels.parquet",
        "--target",
        "watermark",
        "--column",
        "wm_probe",
        "-o",
        tmp_path / "probe.safetensors",
    )
    assert result.exit_code == 0, result.output
    accuracy = float(result.output.split("accuracy ")[1].split(",")[0])
    assert accuracy >= 0.95

    from latentmill.filters.fithead import FitHeadConfig, fit_head

    shuffled = rng.permutation(labels).astype(np.float32)
    _, metrics = fit_head(x.astype(np.float32), shuffled, FitHeadConfig(target="watermark"))
    assert 0.3 <= metrics["accuracy"] <= 0.7 and 0.3 <= metrics["auc"] <= 0.7

    from latentmill.filters.heads import load_fitted

    head = load_fitted(tmp_path / "probe.safetensors")
    assert head.column == "wm_probe" and head.input_dim == 32
    probabilities = head(torch.from_numpy(x.astype(np.float32)))
    assert ((probabilities >= 0.5) == (labels == 1)).mean() >= 0.9

    # the same head file with other settings: refused by name, not silently kept; --overwrite fits again
    args = ["fit-head", "--embeddings", tmp_path / "embeddings", "--labels", tmp_path / "labels.parquet"]
    args += ["--target", "watermark", "--column", "wm_probe", "-o", tmp_path / "probe.safetensors"]
    before = (tmp_path / "probe.safetensors").read_bytes()
    assert run_cli(*args).exit_code == 0 and (tmp_path / "probe.safetensors").read_bytes() == before
    refused = run_cli(*args, "--kind", "mlp")
    assert refused.exit_code == 2 and 'settings.kind: "linear" -> "mlp"' in refused.output, refused.output
    assert (tmp_path / "probe.safetensors").read_bytes() == before
    again = run_cli(*args, "--kind", "mlp", "--epochs", "5", "--overwrite")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "probe.safetensors").read_bytes() != before


def test_fit_head_regression_reports_mae_and_spearman(tmp_path):
    from latentmill.filters.fithead import FitHeadConfig, fit_head

    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    y = (x @ rng.normal(size=16) * 0.5 + 5).astype(np.float32)
    _, metrics = fit_head(x, y, FitHeadConfig(target="aesthetic", kind="mlp", epochs=400))
    assert metrics["task"] == "regression" and metrics["spearman"] > 0.9


def test_a_linear_regressor_is_cross_validated_ridge(tmp_path):
    """Few labels, many dimensions: the penalty the CV picks is small for a clean linear target and large
    for noise, and the saved head reproduces the solution on raw (unstandardised) embeddings."""
    from latentmill.filters.fithead import FitHeadConfig, fit_head, ridge_solve

    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 64)).astype(np.float32) * rng.uniform(0.01, 1.0, 64).astype(np.float32)
    y = (x[:, :4].sum(1) * 2 + 5 + rng.normal(0, 0.05, 120)).astype(np.float32)
    module, clean = fit_head(x, y, FitHeadConfig(target="aesthetic"))
    assert clean["spearman"] > 0.95 and clean["mae"] < 0.2 and clean["alpha"] <= 1.0
    noise = rng.permutation(y)
    _, noisy = fit_head(x, noise, FitHeadConfig(target="aesthetic"))
    assert noisy["alpha"] >= 100 and abs(noisy["spearman"]) < 0.5

    # the module is the closed-form solution on standardised features, folded back to raw ones
    _, fixed = fit_head(x, y, FitHeadConfig(target="aesthetic", alpha=2.0))
    assert fixed["alpha"] == 2.0
    order = np.random.default_rng(0).permutation(len(y))
    train = order[int(round(len(y) * 0.2)) :]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    y_mean, y_std = y[train].mean(), y[train].std() + 1e-6
    w = ridge_solve(
        ((x[train] - mean) / std).astype(np.float64), ((y[train] - y_mean) / y_std).astype(np.float64), 2.0
    )
    expected = ((x - mean) / std) @ w * y_std + y_mean
    module2, _ = fit_head(x, y, FitHeadConfig(target="aesthetic", alpha=2.0))
    with torch.no_grad():
        got = module2(torch.from_numpy(x)).reshape(-1).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def _fitted_head(path, target: str, epochs: int):
    """A head fitted on 32-wide random embeddings (labels: the sign of the first dimension), saved at `path`."""
    from latentmill.filters.fithead import FitHeadConfig, fit_head, save_head

    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 32)).astype(np.float32)
    module, metrics = fit_head(
        x, (x[:, 0] > 0).astype(np.float32), FitHeadConfig(target=target, epochs=epochs)
    )
    return save_head(module, path, FitHeadConfig(target=target), 32, metrics)


def test_a_fitted_head_scores_as_its_own_column(downloaded, tmp_path):
    _fitted_head(tmp_path / "house.safetensors", "house_style", epochs=50)
    out = tmp_path / "scores"
    score(downloaded / "images", out, ScoreConfig(**TINY, heads=[str(tmp_path / "house.safetensors")]))
    table = pq.read_table(out / "00000.parquet")
    assert "house_style" in table.column_names
    assert all(0 <= v <= 1 for v in table.column("house_style").to_pylist())


def test_a_new_head_into_a_finished_scores_folder_is_refused_or_scored_again(downloaded, tmp_path, run_cli):
    _fitted_head(tmp_path / "wm-probe.safetensors", "wm_probe", epochs=5)
    out = tmp_path / "scores"
    tiny = ["--clip-model", "latentmill-tiny", "--pretrained", "none"]
    assert run_cli("score", downloaded / "images", "-o", out, *tiny).exit_code == 0
    before = (out / "00000.parquet").read_bytes()
    head = ["--head", tmp_path / "wm-probe.safetensors"]
    refused = run_cli("score", downloaded / "images", "-o", out, *tiny, *head)
    assert refused.exit_code == 2, refused.output
    assert "settings.heads: changed" in refused.output and "wm-probe.safetensors" in refused.output
    assert "--overwrite" in refused.output and (out / "00000.parquet").read_bytes() == before
    again = run_cli("score", downloaded / "images", "-o", out, *tiny, *head, "--overwrite")
    assert again.exit_code == 0, again.output
    assert "wm_probe" in pq.read_table(out / "00000.parquet").column_names
    # the same settings once more: nothing to redo, the shards kept as they are
    kept = (out / "00000.parquet").stat().st_mtime_ns
    assert run_cli("score", downloaded / "images", "-o", out, *tiny, *head).exit_code == 0
    assert (out / "00000.parquet").stat().st_mtime_ns == kept


def test_a_head_may_not_write_a_reserved_column(downloaded, tmp_path, run_cli):
    from safetensors.torch import load_file, save_file

    from latentmill.filters.fithead import FitHeadConfig, fit_head, save_head

    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 32)).astype(np.float32)
    module, metrics = fit_head(
        x, (x[:, 0] > 0).astype(np.float32), FitHeadConfig(target="house_style", epochs=5)
    )
    with pytest.raises(InputError, match="cannot write column 'key'"):
        save_head(
            module,
            tmp_path / "key.safetensors",
            FitHeadConfig(target="house_style", column="key"),
            32,
            metrics,
        )
    assert not (tmp_path / "key.safetensors").exists()
    # a head file whose metadata was edited to write `key` is refused before any image is read
    save_head(module, tmp_path / "ok.safetensors", FitHeadConfig(target="house_style"), 32, metrics)
    from safetensors import safe_open

    with safe_open(tmp_path / "ok.safetensors", framework="pt") as handle:
        meta = handle.metadata()
    save_file(
        load_file(tmp_path / "ok.safetensors"),
        str(tmp_path / "tampered.safetensors"),
        metadata=meta | {"column": "key"},
    )
    out = tmp_path / "scores"
    result = run_cli(
        "score",
        downloaded / "images",
        "-o",
        out,
        "--clip-model",
        "latentmill-tiny",
        "--pretrained",
        "none",
        "--head",
        tmp_path / "tampered.safetensors",
    )
    assert result.exit_code == 2 and "cannot write column 'key'" in result.output and not out.exists()
    result = run_cli(
        "fit-head",
        "--embeddings",
        tmp_path,
        "--labels",
        tmp_path / "ok.safetensors",
        "--target",
        "url",
        "-o",
        tmp_path / "x.safetensors",
    )
    assert result.exit_code == 2 and "cannot write column 'url'" in result.output


def test_hostile_sample_metadata_is_a_counted_read_not_a_failed_shard(tmp_path):
    from tests.conftest import hostile_metadata_entries

    (tmp_path / "images").mkdir()
    entries = hostile_metadata_entries()
    make_shard(tmp_path / "images" / "00000.tar", entries)
    out = tmp_path / "scores"
    score(tmp_path / "images", out, ScoreConfig(**TINY))
    table = pq.read_table(out / "00000.parquet").to_pandas()
    assert (
        len(table) == len(entries)
        and table["error"].isna().all()
        and table["clip_similarity"].notna().sum() == 1
    )
    assert table["caption"].iloc[0].startswith("caption ") and table["original_width"].isna().all()
    assert table["url"].iloc[-1] == "https://example.com/x.jpg"
    stats = json.loads((out / "00000.stats.json").read_text())
    assert stats["bad_metadata"] == 7 and stats["scored"] == len(entries)


def test_a_failed_select_leaves_the_previous_selection_intact(tmp_path, run_cli):
    scores = tmp_path / "scores"
    scores.mkdir()
    for shard in ("00000", "00001"):
        write_table(
            scores / f"{shard}.parquet", [score_row(f"{shard}{i:04d}", aesthetic=4.0 + i) for i in range(4)]
        )
        (scores / f"{shard}.stats.json").write_text("{}")
    result = run_cli("select", scores, "-o", tmp_path / "sel", "--min-aesthetic", "5")
    assert result.exit_code == 0, result.output
    plots = json.loads((tmp_path / "sel" / "funnel.json").read_text())["plots"]
    assert plots and all(Path(p).parent == tmp_path / "sel" / "plots" and Path(p).exists() for p in plots)
    before = {p.name: p.read_bytes() for p in (tmp_path / "sel").rglob("*") if p.is_file()}
    (scores / "00001.parquet").write_bytes(b"PAR1 cut off")
    result = run_cli("select", scores, "-o", tmp_path / "sel", "--min-aesthetic", "7")
    assert result.exit_code == 2 and "00001.parquet: cannot be read as parquet" in result.output
    after = {p.name: p.read_bytes() for p in (tmp_path / "sel").rglob("*") if p.is_file()}
    assert after == before and not list(tmp_path.glob(".sel.*"))


def test_clip_weights_load_from_a_local_checkpoint_and_missing_ones_say_what_to_provide(tmp_path):
    from PIL import Image

    reference = load_clip("latentmill-tiny", "none")
    torch.save(reference.model.state_dict(), tmp_path / "tiny.pt")
    with torch.no_grad():
        for p in reference.model.parameters():
            p.add_(0.01)
    torch.save(reference.model.state_dict(), tmp_path / "tiny-shifted.pt")
    loaded = load_clip("latentmill-tiny", str(tmp_path / "tiny-shifted.pt"))
    pixels = reference.preprocess(Image.new("RGB", (80, 60), (200, 30, 30)))[None]
    np.testing.assert_allclose(loaded.embed_images(pixels), reference.embed_images(pixels), atol=1e-5)
    with pytest.raises(InputError, match="pass the checkpoint file: --pretrained"):
        load_clip("ViT-B-32", "laion2b_s34b_b79k")  # not cached, and HF_HUB_OFFLINE is set


def test_the_aesthetic_v1_linear_head(downloaded, tmp_path):
    torch.manual_seed(3)
    linear = torch.nn.Linear(32, 1)
    torch.save(linear.state_dict(), tmp_path / "sa_0_4_vit_l_14_linear.pth")
    out = tmp_path / "scores"
    score(
        downloaded / "images",
        out,
        ScoreConfig(
            **TINY, aesthetic_head=str(tmp_path / "sa_0_4_vit_l_14_linear.pth"), save_embeddings=True
        ),
    )
    table = pq.read_table(out / "00000.parquet").to_pandas()
    e = np.load(tmp_path / "embeddings" / "00000.npy").astype(np.float64)
    expected = e @ linear.weight.detach().double().numpy().T + linear.bias.detach().double().numpy()
    np.testing.assert_allclose(table["aesthetic"], expected[:, 0], atol=2e-3)
