"""The clustered pair search behind `dedup` (passes 1 to 3): k-means on a sample, every embedding into the
partitions of its nearest clusters, then every pair at or above the threshold within each cluster."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from latentmill.curate.storage import atomic_path, load_npy, make_folder, read_parquet, write_json
from latentmill.errors import InputError
from latentmill.filters.embeddings import embeddings_path

if TYPE_CHECKING:
    from latentmill.filters.dedup import DedupConfig


def unit_rows(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def valid_rows(matrix: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.isfinite(matrix).all(axis=1))


# --- pass 1: k-means ----------------------------------------------------------------------------------------


def fit_centroids(shards: list[Path], config: DedupConfig) -> np.ndarray:
    """Spherical k-means on a seeded sample of the embeddings (at most `config.sample` rows)."""
    import faiss

    counts = [load_npy(embeddings_path(s), mmap=True).shape[0] for s in shards]
    total = sum(counts)
    rng = np.random.default_rng(config.seed)
    share = min(1.0, config.sample / max(total, 1))
    parts = []
    for shard, count in zip(shards, counts, strict=True):
        matrix = load_npy(embeddings_path(shard), mmap=True)
        picked = np.sort(rng.choice(count, size=min(count, math.ceil(count * share)), replace=False))
        rows = np.asarray(matrix[picked])
        parts.append(rows[valid_rows(rows)])
    x = unit_rows(np.concatenate(parts))
    if len(x) == 0:
        raise InputError(
            "every embedding is missing (NaN rows for images that did not decode): nothing to de-duplicate."
        )
    k = config.clusters or max(1, round(math.sqrt(total)))
    k = max(1, min(k, len(x) // 39 or 1))  # faiss wants about 39 points per centroid
    kmeans = faiss.Kmeans(
        x.shape[1], k, niter=config.iterations, seed=config.seed, spherical=True, verbose=False
    )
    kmeans.train(x)
    return kmeans.centroids.astype(np.float32)


# --- pass 2: assignment -------------------------------------------------------------------------------------


@dataclass
class AssignStage:
    """One score shard's embeddings into the partitions of their nearest clusters."""

    work: Path
    config: DedupConfig

    def setup(self):
        import faiss

        centroids = load_npy(self.work / "centroids.npy")
        index = faiss.IndexFlatIP(centroids.shape[1])
        index.add(centroids)
        return index

    def stats_path(self, shard: Path) -> Path:
        return self.work / "assign" / f"{shard.stem}.stats.json"

    def process(self, shard: Path, index) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        matrix = load_npy(embeddings_path(shard))  # one shard: read once, whole
        keys = read_parquet(shard, columns=["key"]).column("key").to_pylist()
        if len(keys) != matrix.shape[0]:
            raise InputError(
                f"{embeddings_path(shard)}: {matrix.shape[0]} rows for {len(keys)} keys in {shard}; "
                f"score that shard again."
            )
        rows = valid_rows(matrix)
        x = unit_rows(matrix[rows])
        probes = min(self.config.probes, index.ntotal)
        _, nearest = index.search(x, probes)
        clusters = nearest.reshape(-1)
        local = np.repeat(np.arange(len(rows)), probes)  # the row of x each (row, cluster) entry stands for
        parts = clusters % self.config.partitions
        for part in np.unique(parts):
            pick = np.flatnonzero(parts == part)
            pick = pick[np.argsort(clusters[pick], kind="stable")]
            folder = self.work / "parts" / f"{part:05d}"
            make_folder(folder)
            with atomic_path(folder / f"{shard.stem}.npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, x[local[pick]].astype(np.float16))
            table = pa.table(
                {
                    "key": pa.array([keys[r] for r in rows[local[pick]]], pa.string()),
                    "cluster": pa.array(clusters[pick], pa.int32()),
                }
            )
            with atomic_path(folder / f"{shard.stem}.parquet") as tmp:
                pq.write_table(table, tmp)
        stats = {"shard": shard.stem, "rows": len(keys), "embedded": int(len(rows))}
        write_json(self.stats_path(shard), stats)
        return stats


# --- pass 3: pairs within clusters --------------------------------------------------------------------------


@dataclass
class PairStage:
    """One partition, cluster by cluster: every pair at or above the threshold."""

    work: Path
    config: DedupConfig

    def setup(self):
        return None

    def stats_path(self, part: Path) -> Path:
        return self.work / "pairs" / f"{part.name}.stats.json"

    def process(self, part: Path, state) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pieces = sorted(part.glob("*.parquet"))
        tables = [read_parquet(p) for p in pieces]
        arrays = [load_npy(p.with_suffix(".npy"), mmap=True) for p in pieces]
        found: dict[tuple[str, str], float] = {}
        sizes = []
        clusters = sorted(set().union(*(set(t.column("cluster").to_pylist()) for t in tables)))
        columns = [(t.column("cluster").to_numpy(), t.column("key").to_pylist()) for t in tables]
        for cluster in clusters:
            keys, rows = [], []
            for (ids, names), matrix in zip(columns, arrays, strict=True):
                lo, hi = np.searchsorted(ids, cluster, "left"), np.searchsorted(ids, cluster, "right")
                if hi > lo:
                    keys += names[lo:hi]
                    rows.append(np.asarray(matrix[lo:hi], dtype=np.float32))
            sizes.append(len(keys))
            if len(keys) > 1:
                for a, b, similarity in pairs_above(np.concatenate(rows), self.config.threshold):
                    pair = (keys[a], keys[b]) if keys[a] < keys[b] else (keys[b], keys[a])
                    if pair[0] != pair[1]:
                        found[pair] = max(found.get(pair, -1.0), similarity)
        table = pa.table(
            {
                "a": pa.array([p[0] for p in found], pa.string()),
                "b": pa.array([p[1] for p in found], pa.string()),
                "similarity": pa.array(list(found.values()), pa.float32()),
            }
        )
        (self.work / "pairs").mkdir(exist_ok=True)
        with atomic_path(self.work / "pairs" / f"{part.name}.parquet") as tmp:
            pq.write_table(table, tmp)
        stats = {
            "partition": part.name,
            "clusters": len(clusters),
            "pairs": len(found),
            "largest_cluster": max(sizes, default=0),
        }
        write_json(self.stats_path(part), stats)
        return stats


def pairs_above(x: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """(i, j, cosine) for i < j with cosine >= threshold, exactly (faiss range search on unit rows)."""
    import faiss

    x = np.ascontiguousarray(unit_rows(x))
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, similarities, ids = index.range_search(x, float(threshold) - 1e-6)  # range search is strict (>)
    rows = np.repeat(np.arange(len(x)), np.diff(lims).astype(np.int64))
    keep = (ids > rows) & (similarities >= threshold - 1e-6)
    return list(
        zip(
            rows[keep].tolist(), ids[keep].tolist(), np.minimum(similarities[keep], 1.0).tolist(), strict=True
        )
    )
