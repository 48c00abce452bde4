"""URL de-duplication at LAION-2B scale: peak memory and rows/s against the row count, bounded (spilled)
beside the in-memory set prefilter used before.

    python -m bench.bench_urldedup --rows 10000000,30000000,100000000

Each (method, rows) runs in a process of its own, so its peak RSS is its own. The rows are generated as
prefilter reads them (arrow batches of LAION-like URLs, about 3% repeated), hashed as prefilter hashes
them, and de-duplicated:
  spilled:   curate/urldedup.py (pass 1 spills (hash, row) pairs to disk, pass 2 streams the later copies
             back in row order), spilling into bench/out/
  in-memory: curate/urlhash.py's SeenUrls (8 bytes per distinct URL, held for the whole stream)
Both must find the same number of later copies.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "out"
BATCH = 262_144  # prefilter's batch_rows


def batches(rows: int):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(0)
    for start in range(0, rows, BATCH):
        n = min(BATCH, rows - start)
        ids = np.arange(start, start + n)
        ids = np.where(rng.random(n) < 0.03, rng.integers(0, start + n, n), ids)  # ~3% repeated URLs
        hosts = pc.cast(pa.array(ids % 5000), pa.string())
        yield pc.binary_join_element_wise(
            "https://img", hosts, ".example.com/i/", pc.cast(pa.array(ids), pa.string()), ".jpg", ""
        )


def run(method: str, rows: int) -> dict:
    import numpy as np

    from latentmill.curate.urldedup import SpilledDedup
    from latentmill.curate.urlhash import SeenUrls, hash_urls

    started = time.perf_counter()
    later = 0
    if method == "in-memory":
        seen = SeenUrls()
        for urls in batches(rows):
            later += int((~seen.first_seen(hash_urls(urls))).sum())
    else:
        folder = OUT / f"urldedup-{rows}"
        shutil.rmtree(folder, ignore_errors=True)
        dedup, row = SpilledDedup(folder), 0
        for urls in batches(rows):
            dedup.add(hash_urls(urls), np.arange(row, row + len(urls)))
            row += len(urls)
        dedup.finish()
        for start in range(0, rows, BATCH):  # pass 2, as prefilter asks for it
            later += len(dedup.duplicates(start, min(rows, start + BATCH)))
        shutil.rmtree(folder, ignore_errors=True)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
    return {"method": method, "rows": rows, "seconds": round(seconds, 1), "rows_per_s": int(rows / seconds),
            "peak_rss_mib": int(peak), "later_copies": later}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="10000000,30000000,100000000")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run(args.one[0], int(args.one[1]))))
        return
    OUT.mkdir(exist_ok=True)
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        for method in ("spilled", "in-memory"):
            line = subprocess.run(
                [sys.executable, "-m", "bench.bench_urldedup", "--one", method, str(rows)],
                check=True, capture_output=True, text=True,
            ).stdout.strip().splitlines()[-1]  # fmt: skip
            results.append(json.loads(line))
            print(json.dumps(results[-1]), flush=True)
    print("| rows | method | seconds | rows/s | peak RSS | later copies |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['rows']:,} | {r['method']} | {r['seconds']} | {r['rows_per_s']:,} | {r['peak_rss_mib']:,} MiB "
              f"| {r['later_copies']:,} |")  # fmt: skip
    for rows in {r["rows"] for r in results}:
        counts = {r["later_copies"] for r in results if r["rows"] == rows}
        assert len(counts) == 1, f"{rows} rows: the methods disagree ({counts})"


if __name__ == "__main__":
    main()
