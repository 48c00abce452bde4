"""Prefilter throughput and peak memory on a generated LAION-like parquet, against a pandas script.

    python bench/bench_prefilter.py --rows 10000000

Writes the table once (cached in bench/out/), then runs, each in its own process so peak RSS is its own:
  latentmill: `prefilter` (streamed by row group, every rule, URL de-duplication)
  baseline:   the hand-written way, pandas.read_parquet + boolean masks + drop_duplicates
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "out"
RULES = dict(
    min_side=512, max_aspect=2.0, max_pwatermark=0.5, max_punsafe=0.5, min_aesthetic=5.0, min_similarity=0.28
)


def generate(path: Path, rows: int, chunk: int = 1_000_000) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(
        tmp,
        pa.schema(
            [
                ("URL", pa.string()),
                ("TEXT", pa.string()),
                ("WIDTH", pa.int64()),
                ("HEIGHT", pa.int64()),
                ("similarity", pa.float64()),
                ("pwatermark", pa.float64()),
                ("punsafe", pa.float64()),
                ("AESTHETIC_SCORE", pa.float64()),
            ]
        ),
    ) as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            ids = np.arange(start, start + n)
            ids = np.where(rng.random(n) < 0.03, rng.integers(0, start + n, n), ids)  # ~3% repeated URLs
            hosts = pc.cast(pa.array(ids % 5000), pa.string())
            urls = pc.binary_join_element_wise(
                "https://img", hosts, ".example.com/i/", pc.cast(pa.array(ids), pa.string()), ".jpg", ""
            )
            captions = pc.binary_join_element_wise(
                "a photo of item number ", pc.cast(pa.array(ids), pa.string()), ""
            )
            writer.write_table(
                pa.table(
                    {
                        "URL": urls,
                        "TEXT": captions,
                        "WIDTH": rng.integers(128, 2048, n),
                        "HEIGHT": rng.integers(128, 2048, n),
                        "similarity": rng.uniform(0.2, 0.45, n),
                        "pwatermark": rng.beta(1, 4, n),
                        "punsafe": rng.beta(1, 20, n),
                        "AESTHETIC_SCORE": rng.normal(5.2, 0.7, n),
                    }
                ),
                row_group_size=131_072,
            )
    tmp.rename(path)


def run_latentmill(table: str, out: str) -> None:
    from latentmill.curate.prefilter import PrefilterConfig, prefilter

    prefilter(table, out, PrefilterConfig(**RULES))


def run_pandas(table: str, out: str) -> None:
    import pandas as pd

    df = pd.read_parquet(table)
    w, h = df["WIDTH"], df["HEIGHT"]
    keep = (
        df["URL"].str.match(r"^https?://")
        & (df["TEXT"].str.strip().str.len() >= 3)
        & (pd.concat([w, h], axis=1).min(axis=1) >= RULES["min_side"])
        & (
            pd.concat([w, h], axis=1).max(axis=1)
            <= RULES["max_aspect"] * pd.concat([w, h], axis=1).min(axis=1)
        )
        & (df["similarity"] >= RULES["min_similarity"])
        & (df["pwatermark"] <= RULES["max_pwatermark"])
        & (df["punsafe"] <= RULES["max_punsafe"])
        & (df["AESTHETIC_SCORE"] >= RULES["min_aesthetic"])
    )
    df[keep].drop_duplicates("URL").to_parquet(out, index=False)


def measure(which: str, table: Path) -> dict:
    """Run one implementation in a child process; wall seconds and the child's peak RSS."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_prefilter as b; b.run_{which}({str(table)!r}, {str(OUT / (which + '.parquet'))!r})"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(max(peak_kib, before) / 1024),
        "rss_grew": peak_kib > before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    table = OUT / f"laion-like-{args.rows}.parquet"
    if not table.exists():
        print(f"generating {table} ...", flush=True)
        generate(table, args.rows)
    # latentmill first: RUSAGE_CHILDREN's maxrss is the max over children so far
    ours = measure("latentmill", table)
    base = measure("pandas", table)
    import pyarrow.parquet as pq

    kept_ours = pq.ParquetFile(OUT / "latentmill.parquet").metadata.num_rows
    kept_base = pq.ParquetFile(OUT / "pandas.parquet").metadata.num_rows
    result = {
        "rows": args.rows,
        "latentmill": ours | {"rows_per_s": round(args.rows / ours["seconds"]), "kept": kept_ours},
        "pandas_baseline": base | {"rows_per_s": round(args.rows / base["seconds"]), "kept": kept_base},
        "speed_ratio": round(base["seconds"] / ours["seconds"], 2),
    }
    if not base["rss_grew"]:
        result["pandas_baseline"]["peak_rss_mib"] = f"<= {ours['peak_rss_mib']} (did not exceed latentmill's)"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
