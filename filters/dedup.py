"""`dedup`: near-duplicate images from the saved CLIP embeddings, as SemDeDup and NeMo Curator find them:
cluster with k-means, then compare pairs only within clusters.

    pass 1  fit k-means (faiss, spherical) on a seeded sample of the embeddings      -> _work/centroids.npy
    pass 2  per score shard: each embedding to its `probes` nearest clusters; rows   -> _work/parts/P/{shard}.*
            written into partition P = cluster mod `partitions`, sorted by cluster
    pass 3  per partition, cluster by cluster: every pair at or above the threshold  -> _work/pairs/P.parquet
            (faiss range search, exact within the cluster)
    pass 4  pairs (and byte-identical images) joined into groups; one kept per group -> {shard}.parquet
            (highest `keep` score, else the smallest key); the rest get `duplicate_of`   funnel.json

Passes 1 to 3 live in filters/clusterpairs.py. Passes 2 and 3 are shard stages (curate.executors): `--executor ray` spreads them, and a stopped run
redoes only unfinished shards and partitions. A pass-3 worker holds one cluster's embeddings at a time
(read from memory-mapped files), so its memory is bounded by the largest cluster, not the dataset. An
embedding is compared in its `probes` nearest clusters, so a pair split by a cluster border is still found.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentmill.curate.lineage import input_fingerprint, make_record, record_path
from latentmill.curate.storage import (
    atomic_path,
    load_npy,
    location,
    make_folder,
    parquet_schema,
    read_parquet,
    remove_stale_temporaries,
    write_json,
)
from latentmill.errors import InputError, warn
from latentmill.filters.clusterpairs import AssignStage, PairStage, fit_centroids
from latentmill.filters.dedupwarning import implausible_share
from latentmill.filters.embeddings import checked_embeddings, embeddings_folder, embeddings_path
from latentmill.schema import StageConfig, opt

WORK = "_work"


@dataclass
class DedupConfig(StageConfig):
    SECTION = "dedup"
    threshold: float = opt(
        0.95,
        "Cosine similarity at or above which two images are duplicates.",
        low=0.0,
        low_open=True,
        high=1.0,
    )
    keep: str = opt(
        "aesthetic",
        "Score column whose highest value is kept in a group (missing or null: the smallest key is kept).",
    )
    clusters: int | None = opt(None, "k-means clusters (default: about the square root of the count).", low=1)
    probes: int = opt(
        3,
        "Clusters each embedding is compared in: its nearest ones (more finds more pairs split by "
        "a cluster border, at more work).",
        low=1,
    )
    sample: int = opt(200_000, "Embeddings k-means is fitted on (a seeded sample).", low=1)
    iterations: int = opt(20, "k-means iterations.", low=1)
    partitions: int = opt(16, "Work units of the per-cluster pass (each a set of clusters).", low=1)
    exact: bool = opt(True, "Also group byte-identical images (sha256 of the image bytes; needs --images).")
    seed: int = opt(0, "Seed of the k-means sample and initialisation.")


# --- inputs -------------------------------------------------------------------------------------------------


def score_shards(scores: Path) -> list[Path]:
    """Finished score shards whose embeddings were saved (../embeddings/{shard}.npy)."""
    shards = sorted(p for p in scores.glob("*.parquet") if (scores / f"{p.stem}.stats.json").exists())
    if not shards:
        raise InputError(
            f"{scores}: no finished score shards. Run `latentmill score --save-embeddings` first."
        )
    missing = [p.stem for p in shards if not embeddings_path(p).exists()]
    if missing:
        raise InputError(
            f"{scores}: no embeddings for shard(s) {', '.join(missing[:5])} in "
            f"{embeddings_folder(scores)}. Score with --save-embeddings."
        )
    return shards


def check_inputs(shards: list[Path], keep: str) -> None:
    """Everything the passes will read, checked before the first one starts (nothing is written for a bad
    input): per score shard, string keys without nulls, unique over every shard, a numeric `keep` column
    where there is one; its embeddings file 2-d float of the same width everywhere, one row per key."""
    import pyarrow as pa
    import xxhash

    width, hashes = None, []
    for shard in shards:
        schema = parquet_schema(shard)
        key_type = schema.field("key").type if "key" in schema.names else None
        if key_type is None or not (pa.types.is_string(key_type) or pa.types.is_large_string(key_type)):
            raise InputError(
                f"{shard}: the key column is {key_type or 'missing'}, expected strings (a score shard's keys)."
            )
        if keep in schema.names and not (
            pa.types.is_integer(schema.field(keep).type) or pa.types.is_floating(schema.field(keep).type)
        ):
            raise InputError(
                f"--keep {keep}: in {shard} that column is {schema.field(keep).type}, not a number; keep by "
                f"a score column (aesthetic, clip_similarity, ...)."
            )
        keys = read_parquet(shard, columns=["key"]).column("key")
        if keys.null_count:
            raise InputError(f"{shard}: {keys.null_count} row(s) without a key; score that shard again.")
        keys = keys.to_pylist()
        _, width = checked_embeddings(embeddings_path(shard), rows=len(keys), width=width)
        hashes.append(np.array([xxhash.xxh3_64_intdigest(k.encode()) for k in keys], dtype=np.uint64))
    hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    values, counts = np.unique(hashes, return_counts=True)
    if (counts > 1).any():
        repeated = set(values[counts > 1][:5].tolist())
        where = [
            (shard.stem, k)
            for shard in shards
            for k in read_parquet(shard, columns=["key"]).column("key").to_pylist()
            if xxhash.xxh3_64_intdigest(k.encode()) in repeated
        ]
        repeats = Counter(k for _, k in where)
        key, times = repeats.most_common(1)[0]
        if times > 1:  # not two keys sharing a 64-bit hash
            shards_of = sorted({s for s, k in where if k == key})
            raise InputError(
                f"key {key!r} is on {times} rows (shard(s) {', '.join(shards_of)}): keys must be unique to "
                f"name what dedup keeps. Were two downloads scored into one folder?"
            )


# --- exact duplicates ---------------------------------------------------------------------------------------


def exact_pairs(images: Path) -> list[tuple[str, str, float]]:
    """Pairs of keys whose image bytes are identical (sha256), each linked to the first key of its hash."""
    import hashlib

    from latentmill.curate.imageshards import iter_image_shard, list_image_shards

    first: dict[str, str] = {}
    pairs = []
    for shard in list_image_shards(images):
        for sample in iter_image_shard(shard):
            digest = hashlib.sha256(sample.image_bytes).hexdigest()
            if digest in first:
                pairs.append((first[digest], sample.key, 1.0))
            else:
                first[digest] = sample.key
    return pairs


# --- pass 4: groups and the kept image ----------------------------------------------------------------------


def groups_from_pairs(pairs) -> dict[str, str]:
    """key -> its group's root (union-find over the pairs)."""
    parent: dict[str, str] = {}

    def find(k):
        while parent.setdefault(k, k) != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for a, b, _ in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {k: find(k) for k in parent}


def choose_kept(members: list[str], scores: dict[str, float]) -> str:
    """The documented rule: the highest `keep` score where there is one, else the smallest key."""
    scored = [m for m in members if scores.get(m) is not None and np.isfinite(scores[m])]
    if scored:
        return min(scored, key=lambda m: (-scores[m], m))
    return min(members)


def dedup(
    scores: str | Path,
    output: str | Path,
    config: DedupConfig | None = None,
    images: str | Path | None = None,
    executor=None,
    progress=None,
) -> dict:
    """Find near-duplicate (and byte-identical) images; write `output/{shard}.parquet` (key, duplicate_of,
    similarity) for every score shard and `output/funnel.json`; return the funnel.

    The passes: k-means centroids from a sample, each embedding assigned to its nearest clusters
    (per score shard), exact pairs above the threshold within each cluster part, then groups."""
    from latentmill.curate.executors import ExecutorConfig, run_shards

    config = (config or DedupConfig()).validate()
    scores, output = location(scores), location(output)
    shards = score_shards(scores)
    check_inputs(shards, config.keep)
    work = _work_folder(output, config, shards)
    remove_stale_temporaries(output)  # of an earlier run killed mid-write (the passes' files included)
    clock = _PassClock()
    if not (work / "centroids.npy").exists():
        with atomic_path(work / "centroids.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, fit_centroids(shards, config))
    clock.lap("kmeans")
    executor = executor or ExecutorConfig()
    tick = (lambda s: progress(1)) if progress else None
    run_shards(AssignStage(work, config), shards, executor, progress=tick)
    clock.lap("assign")
    parts = sorted(p for p in (work / "parts").iterdir() if p.is_dir()) if (work / "parts").exists() else []
    part_stats = run_shards(PairStage(work, config), parts, executor, progress=tick)
    clock.lap("pairs")
    semantic = _read_pairs(work, parts)
    exact = exact_pairs(location(images)) if config.exact and images else []
    duplicate_of, best, members = _groups(semantic + exact, shards, config.keep)
    total = sum(_write_shard_duplicates(shard, output, duplicate_of, best) for shard in shards)
    sizes = Counter(len(g) for g in members.values())
    funnel = {
        "input": total,
        "duplicates": len(duplicate_of),
        "kept": total - len(duplicate_of),
        "groups": len(members),
        "group_sizes": {str(k): v for k, v in sorted(sizes.items())},
        "pairs": len(semantic),
        "exact_pairs": len(exact),
        "clusters": int(load_npy(work / "centroids.npy", mmap=True).shape[0]),
        "largest_cluster": max((s["largest_cluster"] for s in part_stats.values()), default=0),
        "threshold": config.threshold,
        "keep": config.keep,
    }
    clock.lap("groups")
    funnel["passes"] = clock.laps
    if warning := implausible_share(funnel, scores):
        warn(warning)
        funnel["warning"] = warning
    write_json(output / "funnel.json", funnel)
    write_json(record_path(output), make_record("dedup", config, inputs={"scores": scores, "images": images}))
    return funnel


def _work_folder(output: Path, config: DedupConfig, shards: list[Path]) -> Path:
    """OUTPUT/_work, holding the passes' intermediate files; emptied when the settings that shape them
    changed since they were written."""
    work = output / WORK
    make_folder(work)
    settings = {
        "threshold": config.threshold,
        "clusters": config.clusters,
        "probes": config.probes,
        "sample": config.sample,
        "iterations": config.iterations,
        "partitions": config.partitions,
        "seed": config.seed,
        "shards": [s.stem for s in shards],
        # scored again (other embeddings): the passes again
        "scores": input_fingerprint(shards[0].parent) if shards else None,
    }
    saved = work / "settings.json"
    if saved.exists() and _saved_settings(saved) != settings:  # other settings (or damaged): the passes over
        from latentmill.curate.storage import remove

        remove(work)
        make_folder(work)
    write_json(saved, settings)
    return work


def _read_pairs(work: Path, parts: list[Path]) -> list[tuple[str, str, float]]:
    """(a, b, similarity) of every pair the cluster parts found."""

    pairs = []
    for part in parts:
        table = read_parquet(work / "pairs" / f"{part.name}.parquet").to_pydict()
        pairs += list(zip(table["a"], table["b"], table["similarity"], strict=True))
    return pairs


def _groups(pairs: list, shards: list[Path], keep: str) -> tuple[dict, dict, dict]:
    """From the pairs: (key -> the key kept in its place, key -> its best similarity, group root ->
    members). One member of each group is kept, chosen by the `keep` rule."""
    roots = groups_from_pairs(pairs)
    best: dict[str, float] = {}
    for a, b, similarity in pairs:
        best[a], best[b] = max(best.get(a, -1.0), similarity), max(best.get(b, -1.0), similarity)
    members: dict[str, list[str]] = {}
    for key, root in roots.items():
        members.setdefault(root, []).append(key)
    keep_scores = _keep_scores(shards, keep, set(roots))
    duplicate_of = {}
    for group in members.values():
        kept = choose_kept(group, keep_scores)
        duplicate_of.update({m: kept for m in group if m != kept})
    return duplicate_of, best, members


def _write_shard_duplicates(shard: Path, output: Path, duplicate_of: dict, best: dict) -> int:
    """OUTPUT/{shard}.parquet: key, duplicate_of (or null), similarity; returns the shard's row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = read_parquet(shard, columns=["key"]).column("key").to_pylist()
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "duplicate_of": pa.array([duplicate_of.get(k) for k in keys], pa.string()),
            "similarity": pa.array([best.get(k) if k in duplicate_of else None for k in keys], pa.float32()),
        }
    )
    with atomic_path(output / shard.name) as tmp:
        pq.write_table(table, tmp)
    return len(keys)


class _PassClock:
    """Seconds of each pass, and this process's peak memory (MiB) when it ended."""

    def __init__(self):
        import time

        self.laps: dict[str, dict] = {}
        self.start = time.perf_counter()

    def lap(self, name: str) -> None:
        import resource
        import time

        now = time.perf_counter()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        self.laps[name] = {"seconds": round(now - self.start, 2), "peak_rss_mib": round(peak, 1)}
        self.start = now


def _keep_scores(shards: list[Path], column: str, wanted: set[str]) -> dict[str, float]:

    out = {}
    for shard in shards:
        names = parquet_schema(shard).names
        if column not in names:
            continue
        table = read_parquet(shard, columns=["key", column]).to_pydict()
        out.update(
            {k: v for k, v in zip(table["key"], table[column], strict=True) if k in wanted and v is not None}
        )
    return out


def duplicate_keys(folder: str | Path) -> set[str]:
    """The keys a dedup folder marks as duplicates (what `select --dedup` drops)."""
    import pyarrow.compute as pc

    folder = location(folder)
    if not (folder / "funnel.json").exists():
        raise InputError(
            f"{folder}: not a finished dedup folder (no funnel.json). Run `latentmill dedup` first."
        )
    keys: set[str] = set()
    for path in sorted(folder.glob("*.parquet")):
        table = read_parquet(path, columns=["key", "duplicate_of"])
        keys.update(table.filter(pc.is_valid(table.column("duplicate_of"))).column("key").to_pylist())
    return keys


def format_dedup_funnel(funnel: dict) -> str:
    sizes = ", ".join(f"{n} of {size}" for size, n in funnel["group_sizes"].items())
    return (
        f"{funnel['input']:,} images: {funnel['duplicates']:,} duplicates in {funnel['groups']:,} groups "
        f"(groups by size: {sizes or 'none'}), {funnel['kept']:,} kept\n"
        f"{funnel['clusters']} clusters (largest {funnel['largest_cluster']:,}), {funnel['pairs']:,} pairs at "
        f"cosine >= {funnel['threshold']}, {funnel['exact_pairs']:,} byte-identical"
    )


def _saved_settings(path: Path) -> dict | None:
    """The settings the passes in the work folder were made with (None for a damaged record: made anew)."""
    from latentmill.curate.records import read_record

    try:
        return read_record(path)
    except InputError:
        return None
