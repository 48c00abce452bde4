"""Semantic de-duplication: the clustered search against brute force, the kept image, select --dedup."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from latentmill.filters.dedup import DedupConfig, choose_kept, dedup, duplicate_keys, groups_from_pairs


def planted(n: int = 20_000, bases: int = 300, dim: int = 64, seed: int = 0):
    """Unit float16 embeddings: `bases` base vectors, each with near-copies (small noise, or a small rotation in
    a random plane), among random vectors. Returns (matrix, base index or -1 per row)."""
    rng = np.random.default_rng(seed)
    rows, origin = [], []
    base = rng.standard_normal((bases, dim))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    for b in range(bases):
        rows.append(base[b])
        origin.append(b)
        for c in range(int(rng.integers(1, 6))):
            if c % 2:  # noise
                v = base[b] + rng.normal(0, rng.uniform(0.02, 0.09), dim)
            else:  # a rotation by a small angle in a random plane through the base vector
                u = rng.standard_normal(dim)
                u -= u @ base[b] * base[b]
                u /= np.linalg.norm(u)
                angle = rng.uniform(0.05, 0.4)
                v = np.cos(angle) * base[b] + np.sin(angle) * u
            rows.append(v / np.linalg.norm(v))
            origin.append(b)
    while len(rows) < n:
        v = rng.standard_normal(dim)
        rows.append(v / np.linalg.norm(v))
        origin.append(-1)
    order = rng.permutation(len(rows))
    return np.asarray(rows, np.float32)[order].astype(np.float16), np.asarray(origin)[order]


def write_scores(root, matrix, shards: int = 4, aesthetic=None):
    """score parquets (key, aesthetic) and embeddings/{shard}.npy as `score --save-embeddings` writes them."""
    (root / "scores").mkdir(parents=True)
    (root / "embeddings").mkdir()
    keys = [f"{i:09d}" for i in range(len(matrix))]
    for s, rows in enumerate(np.array_split(np.arange(len(matrix)), shards)):
        columns = {"key": [keys[r] for r in rows]}
        if aesthetic is not None:
            columns["aesthetic"] = pa.array([float(aesthetic[r]) for r in rows], pa.float32())
        pq.write_table(pa.table(columns), root / "scores" / f"{s:05d}.parquet")
        np.save(root / "embeddings" / f"{s:05d}.npy", matrix[rows])
        (root / "scores" / f"{s:05d}.stats.json").write_text(json.dumps({"shard": f"{s:05d}"}))
    return keys


def brute_force_pairs(matrix, threshold):
    x = matrix.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    found = {}
    for start in range(0, len(x), 2048):
        sims = x[start : start + 2048] @ x.T
        for i, j in zip(*np.nonzero(sims >= threshold), strict=True):
            if start + i < j:
                found[(start + i, int(j))] = float(sims[i, j])
    return found


def test_the_clustered_search_finds_the_pairs_brute_force_finds(tmp_path):
    matrix, origin = planted()
    keys = write_scores(tmp_path, matrix)
    threshold = 0.95
    funnel = dedup(tmp_path / "scores", tmp_path / "dedup", DedupConfig(threshold=threshold, partitions=8))
    expected = brute_force_pairs(matrix, threshold)
    assert len(expected) > 300  # the planted near-copies, well above the threshold and near it
    found = {}
    for path in (tmp_path / "dedup" / "_work" / "pairs").glob("*.parquet"):
        table = pq.read_table(path).to_pydict()
        for a, b, s in zip(table["a"], table["b"], table["similarity"], strict=True):
            found[(int(a), int(b))] = s
    recall = len(set(found) & set(expected)) / len(expected)
    wrong = [
        p for p in found if p not in expected and brute_force_pairs(matrix[list(p)], threshold - 1e-5) == {}
    ]
    assert recall >= 0.99, (recall, len(expected), funnel)
    assert not wrong  # precision 1.0: every pair found is above the threshold in the exact computation
    assert funnel["clusters"] > 50 and funnel["largest_cluster"] < len(matrix) / 10  # the work was split
    # groups: every duplicate points at a kept image of its own planted family
    result = pd_concat(tmp_path / "dedup")
    dups = {k: d for k, d in zip(result["key"], result["duplicate_of"], strict=True) if d is not None}
    assert dups and all(origin[int(k)] == origin[int(d)] != -1 for k, d in dups.items())
    assert not set(dups.values()) & set(dups)  # the kept one is never itself a duplicate
    assert funnel["duplicates"] == len(dups) and len(keys) == funnel["input"]


def pd_concat(folder):
    tables = [pq.read_table(p).to_pydict() for p in sorted(folder.glob("*.parquet"))]
    return {c: sum((t[c] for t in tables), []) for c in tables[0]}


def test_the_kept_image_is_the_highest_aesthetic_else_the_smallest_key():
    assert choose_kept(["b", "a", "c"], {"b": 6.0, "c": 7.5}) == "c"
    assert choose_kept(["b", "a", "c"], {}) == "a"
    assert choose_kept(["b", "a"], {"a": float("nan"), "b": 1.0}) == "b"
    assert choose_kept(["b", "a"], {"a": 5.0, "b": 5.0}) == "a"  # a tie: the smallest key
    roots = groups_from_pairs([("a", "b", 0.99), ("c", "d", 0.97), ("b", "d", 0.96), ("x", "y", 1.0)])
    assert len({roots[k] for k in "abcd"}) == 1 and roots["x"] == roots["y"] != roots["a"]


def test_select_drops_the_duplicates_with_their_reason(tmp_path, run_cli):
    matrix, _ = planted(n=2_000, bases=40)
    aesthetic = np.random.default_rng(1).uniform(4, 8, len(matrix))
    write_scores(tmp_path, matrix, shards=2, aesthetic=aesthetic)
    for shard in (tmp_path / "scores").glob("*.parquet"):  # the columns select needs
        table = pq.read_table(shard)
        n = table.num_rows
        for name, value in (("url", "u"), ("caption", "c"), ("error", None)):
            table = table.append_column(name, pa.array([value] * n, pa.string()))
        for name in ("width", "height", "original_width", "original_height"):
            table = table.append_column(name, pa.array([512] * n, pa.int32()))
        pq.write_table(table, shard)
    result = run_cli("dedup", tmp_path / "scores", "-o", tmp_path / "dedup", "--threshold", "0.95")
    assert result.exit_code == 0, result.output
    assert "far more than real image sets hold" not in result.output  # a plausible share: no warning
    dups = duplicate_keys(tmp_path / "dedup")
    kept_by_dedup = pd_concat(tmp_path / "dedup")
    for key, of in zip(kept_by_dedup["key"], kept_by_dedup["duplicate_of"], strict=True):
        if of is not None:  # the kept one has the higher aesthetic score
            assert aesthetic[int(of)] >= aesthetic[int(key)]
    result = run_cli(
        "select", tmp_path / "scores", "-o", tmp_path / "sel", "--dedup", tmp_path / "dedup", "--no-plots"
    )
    assert result.exit_code == 0, result.output
    selection = pd_concat(tmp_path / "sel")
    dropped = {
        k
        for k, keep, why in zip(selection["key"], selection["keep"], selection["reason"], strict=True)
        if not keep and why == "duplicate"
    }
    assert dropped == dups and len(dups) > 20
    funnel = json.loads((tmp_path / "sel" / "funnel.json").read_text())
    assert {"rule": "duplicate", "dropped": len(dups)}.items() <= next(
        s for s in funnel["steps"] if s["rule"] == "duplicate"
    ).items()


def test_most_of_a_set_marked_duplicates_is_warned_with_its_likely_cause(tmp_path, run_cli):
    from latentmill.curate.lineage import make_record, record_path
    from latentmill.curate.storage import write_json

    rng = np.random.default_rng(0)  # what an untrained CLIP gives: every picture's embedding nearly the same
    matrix = np.ones((200, 64)) + rng.normal(0, 0.01, (200, 64))
    matrix = (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float16)
    write_scores(tmp_path, matrix, shards=2)
    write_json(
        record_path(tmp_path / "scores"),
        make_record("score", settings={"clip_model": "tiny-rn", "pretrained": "none"}),
    )
    result = run_cli("dedup", tmp_path / "scores", "-o", tmp_path / "dedup")
    assert result.exit_code == 0, result.output
    funnel = json.loads((tmp_path / "dedup" / "funnel.json").read_text())
    assert funnel["duplicates"] > 150
    assert f"{funnel['duplicates']} of 200 images" in result.output and "far more than" in result.output
    assert "tiny-rn, random weights" in result.output and "untrained CLIP" in result.output
    assert funnel["warning"].startswith("dedup: ")


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_a_threshold_outside_0_1_is_refused(tmp_path, run_cli, value):
    result = run_cli("dedup", tmp_path, "-o", tmp_path / "d", "--threshold", value)
    assert result.exit_code == 2 and "--threshold" in result.output


def thumbnail_descriptor(image) -> np.ndarray:
    """A stand-in image embedding: the mean-removed 16x16 colour thumbnail, unit length. It survives resizing,
    re-encoding and a slight crop, and tells different photographs apart."""
    small = np.asarray(image.convert("RGB").resize((16, 16), 3), dtype=np.float32).reshape(-1)
    small -= small.mean()
    return small / np.linalg.norm(small)


def test_copies_of_a_photograph_from_the_loopback_server_are_grouped_with_it(server, tmp_path, run_cli):
    """Real pictures, copied as the web copies them. No CLIP weights can be loaded offline, and a random CLIP
    maps every picture to nearly the same vector (cosine >= 0.999 between different photographs), so the
    embeddings here are thumbnail descriptors written where `score --save-embeddings` writes CLIP's: the test
    is of the grouping on real pictures, and of byte-identical copies found through --images."""
    import io
    import urllib.request

    from PIL import Image

    from latentmill.curate import samples
    from tests.conftest import make_shard

    def fetch(path):
        with urllib.request.urlopen(server.url(path)) as response:
            return response.read()

    # photographs with structure; a star field or a plate of coins shifts too much under a crop for a thumbnail
    names = ["astronaut", "coffee", "chelsea", "rocket", "retina", "camera"]
    assert set(names) <= set(samples.PHOTOS)
    entries, family = [], {}
    for n, name in enumerate(names):
        original = fetch(f"/photo/{name}/480x360.jpg")
        image = Image.open(io.BytesIO(original)).convert("RGB")
        smaller = fetch(f"/photo/{name}/320x240.jpg")  # resized by the server
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=40)  # re-encoded
        cropped = io.BytesIO()
        image.crop((12, 9, 468, 351)).save(cropped, "JPEG", quality=90)  # slightly cropped
        for v, data in enumerate([original, smaller, buffer.getvalue(), cropped.getvalue(), original]):
            key = f"{n:04d}{v:05d}"
            family[key] = name
            entries.append((key, {"jpg": data, "txt": name.encode(), "json": b"{}"}))
    (tmp_path / "images").mkdir()
    make_shard(tmp_path / "images" / "00000.tar", entries)
    keys = [k for k, _ in entries]
    vectors = np.stack([thumbnail_descriptor(Image.open(io.BytesIO(files["jpg"]))) for _, files in entries])
    (tmp_path / "scores").mkdir()
    (tmp_path / "embeddings").mkdir()
    pq.write_table(pa.table({"key": keys}), tmp_path / "scores" / "00000.parquet")
    (tmp_path / "scores" / "00000.stats.json").write_text("{}")
    np.save(tmp_path / "embeddings" / "00000.npy", vectors.astype(np.float16))
    result = run_cli(
        "dedup",
        tmp_path / "scores",
        "-o",
        tmp_path / "dedup",
        "--threshold",
        "0.9",
        "--images",
        tmp_path / "images",
    )
    assert result.exit_code == 0, result.output
    table = pd_concat(tmp_path / "dedup")
    kept_of = {k: d or k for k, d in zip(table["key"], table["duplicate_of"], strict=True)}
    for name in names:  # each photograph and its four copies: one group, one image kept
        members = [k for k in keys if family[k] == name]
        assert len({kept_of[k] for k in members}) == 1, (name, [kept_of[k] for k in members])
    assert len(set(kept_of.values())) == len(names)  # and different photographs are never grouped
    funnel = json.loads((tmp_path / "dedup" / "funnel.json").read_text())
    assert funnel["exact_pairs"] == len(names)  # the byte-identical copy of each, found by its hash
    assert funnel["duplicates"] == 4 * len(names)
    result = run_cli("report", tmp_path)  # the folder is laid out as a work folder: images/, scores/, dedup/
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report" / "index.html").read_text()
    section = page[page.index('<section id="dedup">') :]
    section = section[: section.index("</section>")]
    assert section.count("<figure>") >= 10 and "kept" in section and "1.000" in section


@pytest.mark.slow  # starts Ray
def test_ray_spreads_the_passes_and_gives_the_same_duplicates(tmp_path):
    from latentmill.curate.executors import ExecutorConfig

    matrix, _ = planted(n=4_000, bases=80)
    write_scores(tmp_path, matrix)
    local = dedup(tmp_path / "scores", tmp_path / "local", DedupConfig(partitions=4))
    remote = dedup(
        tmp_path / "scores",
        tmp_path / "ray",
        DedupConfig(partitions=4),
        executor=ExecutorConfig(kind="ray", actors=2),
    )
    assert remote["duplicates"] == local["duplicates"] > 50
    assert pd_concat(tmp_path / "ray") == pd_concat(tmp_path / "local")
