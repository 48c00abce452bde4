"""The download wrapper's overhead against calling img2dataset directly, on the same loopback URLs.

    python bench/bench_download.py --urls 2000

Both runs use the same img2dataset settings (webdataset, keep_ratio, skip_reencode, ...); latentmill adds
reading the table, the private-address guard, the normalised input and the summary. Runs alternate
(who goes first alternates) and the best of each is compared.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

OUT = Path(__file__).parent / "out" / "download"


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from latentmill.curate.download import DownloadConfig, download, run_img2dataset
    from latentmill.curate.imageserver import ImageServer, prerender

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    with ImageServer() as server:
        config = DownloadConfig(
            processes=args.processes,
            http_threads=32,
            timeout=30,
            retries=0,
            shard_size=500,
            allow_hosts=(f"127.0.0.1:{server.port}",),
            min_image_size=64,
        )
        sizes = [(320, 256), (256, 320), (384, 256), (288, 288)]
        urls = [
            server.url(f"/gen/{i % 200}/{sizes[i % 4][0]}x{sizes[i % 4][1]}.jpg?v={i}")
            for i in range(args.urls)
        ]
        prerender(urls)
        table = OUT / "urls.parquet"
        pq.write_table(
            pa.table(
                {
                    "URL": urls,
                    "TEXT": [f"picture {i}" for i in range(args.urls)],
                    "WIDTH": [sizes[i % 4][0] for i in range(args.urls)],
                }
            ),
            table,
        )
        # img2dataset called directly on the user's table, as a hand-written script would
        direct_input = OUT / "direct-input.parquet"
        pq.write_table(pq.read_table(table).rename_columns(["url", "caption", "WIDTH"]), direct_input)
        times = {"img2dataset": [], "latentmill": []}
        successes = {"img2dataset": [], "latentmill": []}

        def direct(target):
            run_img2dataset(direct_input, target, ["WIDTH"], True, config)
            return sum(json.loads(p.read_text())["successes"] for p in target.glob("*_stats.json"))

        def wrapper(target):
            return download(table, target, config)["success"]

        runs = [("img2dataset", direct), ("latentmill", wrapper)]
        for r in range(args.repeats):
            for name, run in runs if r % 2 == 0 else runs[::-1]:  # alternate who goes first
                start = time.perf_counter()
                successes[name].append(run(OUT / f"{name}-{r}"))
                times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    print(
        json.dumps(
            {
                "urls": args.urls,
                "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
                "successes": successes,
                "images_per_s": {k: round(args.urls / v, 1) for k, v in best.items()},
                "overhead_ratio": round(best["latentmill"] / best["img2dataset"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
