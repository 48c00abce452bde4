"""Semantic de-duplication at scale: a million 768-d float16 embeddings on this machine, against brute force.

    python bench/bench_dedup.py --rows 1000000 --subset 50000

Writes planted embeddings once (cached in bench/out/dedup-N/): base vectors with 1 to 5 near-copies each
(small noise or a small rotation), among random unit vectors, in 100 score shards as `score
--save-embeddings` writes them. Then, each in its own process so peak memory is its own:
  latentmill: `dedup` on all rows (k-means, assignment, pairs per cluster, groups), seconds and peak RSS
              per pass, recall and precision against the planted pairs' exact cosines
  subset:     `dedup` on the first `subset` rows
  baseline:   exact all-pairs cosines on the same subset (blocked float32 matmul, numpy), the pairs it
              finds being the ground truth for the subset's recall
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "out"
THRESHOLD = 0.95


def generate(root: Path, rows: int, dim: int, shards: int = 100, seed: int = 0) -> None:
    """Planted families spread over the shards; families.npy lists each row's family (-1: none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (root / "done").exists():
        return
    rng = np.random.default_rng(seed)
    (root / "scores").mkdir(parents=True, exist_ok=True)
    (root / "embeddings").mkdir(exist_ok=True)
    family = np.full(rows, -1, np.int64)
    bases = rows // 200
    sizes = rng.integers(2, 7, bases)  # the base and 1 to 5 copies
    slots = rng.choice(rows, int(sizes.sum()), replace=False)
    family[slots] = np.repeat(np.arange(bases), sizes)
    base = rng.standard_normal((bases, dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    per_shard = -(-rows // shards)
    for s in range(shards):
        lo, hi = s * per_shard, min(rows, (s + 1) * per_shard)
        x = rng.standard_normal((hi - lo, dim)).astype(np.float32)
        fam = family[lo:hi]
        planted = np.flatnonzero(fam >= 0)
        for i in planted:
            b = base[fam[i]]
            kind = rng.integers(0, 3)
            if kind == 0:  # the base itself (re-encoded: tiny noise)
                v = b + rng.normal(0, 0.005, dim)
            elif kind == 1:  # noise
                v = b + rng.normal(0, rng.uniform(0.005, 0.01), dim)
            else:  # a small rotation in a random plane
                u = rng.standard_normal(dim).astype(np.float32)
                u -= u @ b * b
                u /= np.linalg.norm(u)
                angle = rng.uniform(0.05, 0.35)
                v = np.cos(angle) * b + np.sin(angle) * u
            x[i] = v
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        name = f"{s:05d}"
        np.save(root / "embeddings" / f"{name}.npy", x.astype(np.float16))
        keys = pa.array([f"{i:09d}" for i in range(lo, hi)])
        pq.write_table(pa.table({"key": keys}), root / "scores" / f"{name}.parquet")
        (root / "scores" / f"{name}.stats.json").write_text(json.dumps({"shard": name}))
    np.save(root / "families.npy", family)
    (root / "done").write_text("ok")


def subset(root: Path, rows: int) -> Path:
    """The first `rows` rows as a folder of their own (whole shards)."""
    import shutil

    target = root.parent / f"{root.name}-first{rows}"
    if (target / "done").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    (target / "scores").mkdir(parents=True)
    (target / "embeddings").mkdir()
    count = 0
    for npy in sorted((root / "embeddings").glob("*.npy")):
        if count >= rows:
            break
        shutil.copy(npy, target / "embeddings" / npy.name)
        for suffix in (".parquet", ".stats.json"):
            shutil.copy(root / "scores" / f"{npy.stem}{suffix}", target / "scores" / f"{npy.stem}{suffix}")
        count += np.load(npy, mmap_mode="r").shape[0]
    np.save(target / "families.npy", np.load(root / "families.npy")[:count])
    (target / "done").write_text(str(count))
    return target


def all_rows(root: Path) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted((root / "embeddings").glob("*.npy"))]).astype(
        np.float32
    )


def exact_pairs_among(x: np.ndarray, rows: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    """Exact pairs at or above the threshold among `rows` (indices into x)."""
    sims = x[rows] @ x[rows].T
    i, j = np.nonzero(np.triu(sims >= threshold, 1))
    return {(int(rows[a]), int(rows[b])) for a, b in zip(i, j, strict=True)}


def run_latentmill(root: Path, threshold: float) -> dict:
    """dedup, then recall and precision of its pairs against exact cosines."""
    import pyarrow.parquet as pq

    from latentmill.filters.dedup import DedupConfig, dedup

    out = root / "dedup"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    funnel = dedup(root / "scores", out, DedupConfig(threshold=threshold, partitions=32))
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    found = set()
    for path in (out / "_work" / "pairs").glob("*.parquet"):
        table = pq.read_table(path).to_pydict()
        found |= {(int(a), int(b)) for a, b in zip(table["a"], table["b"], strict=True)}
    x = all_rows(root)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    family = np.load(root / "families.npy")[: len(x)] if (root / "families.npy").exists() else None
    truth: set[tuple[int, int]] = set()
    if family is not None:  # every pair at or above the threshold lies within a planted family
        order = np.argsort(family, kind="stable")
        fam_sorted = family[order]
        starts = np.flatnonzero(np.r_[True, fam_sorted[1:] != fam_sorted[:-1]])
        for a, b in zip(starts, np.r_[starts[1:], len(order)], strict=True):
            if fam_sorted[a] >= 0 and b - a > 1:
                truth |= exact_pairs_among(x, order[a:b], threshold)
    wrong = [p for p in found if float(x[p[0]] @ x[p[1]]) < threshold - 1e-5]
    return {
        "rows": len(x),
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak),
        "passes": funnel["passes"],
        "clusters": funnel["clusters"],
        "largest_cluster": funnel["largest_cluster"],
        "pairs_found": len(found),
        "planted_pairs": len(truth),
        "recall": round(len(found & truth) / max(len(truth), 1), 4),
        "precision": round(1 - len(wrong) / max(len(found), 1), 4),
        "found": sorted(found),
    }


def run_baseline(root: Path, threshold: float) -> dict:
    """Exact all pairs, blocked float32 matmul."""
    start = time.perf_counter()
    x = all_rows(root)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    found = []
    for lo in range(0, len(x), 4096):
        sims = x[lo : lo + 4096] @ x.T
        i, j = np.nonzero(sims >= threshold)
        found += [(lo + int(a), int(b)) for a, b in zip(i, j, strict=True) if lo + a < b]
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": len(x), "wall_s": round(wall, 1), "peak_rss_mib": round(peak), "pairs": sorted(found)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--subset", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--child", choices=["latentmill", "baseline"])
    parser.add_argument("--root")
    args = parser.parse_args()
    if args.child:
        run = run_latentmill if args.child == "latentmill" else run_baseline
        print(json.dumps(run(Path(args.root), THRESHOLD)))
        return
    root = OUT / f"dedup-{args.rows}x{args.dim}"
    start = time.perf_counter()
    generate(root, args.rows, args.dim)
    print(
        f"embeddings: {args.rows:,} x {args.dim} float16 in {root} ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    small = subset(root, args.subset)

    def child(kind: str, folder: Path) -> dict:
        done = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--root", str(folder)],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(done.stdout.strip().splitlines()[-1])

    full = child("latentmill", root)
    ours = child("latentmill", small)
    brute = child("baseline", small)
    truth = {tuple(p) for p in brute.pop("pairs")}
    found = {tuple(p) for p in ours.pop("found")}
    full.pop("found")
    ours["recall_vs_brute_force"] = round(len(found & truth) / max(len(truth), 1), 4)
    ours["precision_vs_brute_force"] = round(len(found & truth) / max(len(found), 1), 4)
    print(
        json.dumps(
            {
                "full": full,
                "subset": ours,
                "brute_force_subset": brute,
                "subset_speedup": round(brute["wall_s"] / ours["wall_s"], 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
