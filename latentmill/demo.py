"""The offline demo: a sample URL table served on loopback, run through the stages that exist so far
(prefilter, download, image-shard check, CLIP scores, selection, bucket chart, latent encoding), into one
work folder. The models are tiny and random: the point is the data flow, not the scores."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from latentmill.curate.atomic import write_json
from latentmill.curate.buckets import make_buckets
from latentmill.curate.bucketstats import bucket_distribution, plot_distribution
from latentmill.curate.download import DownloadConfig, download
from latentmill.curate.encode import EncodeConfig, encode
from latentmill.curate.imageserver import ImageServer, prerender, sample_rows
from latentmill.curate.imageshards import inspect_image_shards
from latentmill.curate.prefilter import PrefilterConfig, prefilter
from latentmill.filters.score import ScoreConfig, score
from latentmill.filters.select import select


def run_demo(work: str | Path, log=print, processes: int = 2) -> dict:
    """Run the demo into `work`; return what each stage reported. Safe to re-run: finished work is kept."""
    work = Path(work)
    (work / "urls").mkdir(parents=True, exist_ok=True)
    with ImageServer(slow_s=4) as server:
        table = work / "urls" / "sample.parquet"
        rows = sample_rows(server.url(""))
        prerender(row["URL"] for row in rows)
        pq.write_table(pa.Table.from_pylist(rows), table)
        log(f"[1/7] sample URL table: {table} (served on {server.url('/')})")
        funnel = prefilter(table, work / "urls" / "kept.parquet",
                           PrefilterConfig(min_side_px=256, max_pwatermark=0.5, allow_private_addresses=True))
        log(f"[2/7] prefilter: {funnel['input_rows']} rows -> {funnel['kept_rows']} kept")
        summary = download(work / "urls" / "kept.parquet", work / "images",
                           DownloadConfig(processes=processes, threads=16, timeout_s=2, retries=0, shard_size=16,
                                          allow_private_addresses=True))
        log(f"[3/7] download: {summary['success']} images, {summary['failed']} failed {summary['failures']}")
    shards = inspect_image_shards(work / "images", decode=True)
    scored = score(work / "images", work / "scores", ScoreConfig(clip_model="latentmill-tiny", pretrained="none",
                                                                workers=0, batch_size=16, save_embeddings=True))
    log(f"[4/7] score: {scored['scored']} images embedded with a tiny CLIP model (random weights)")
    funnel_selected = select(work / "scores", work / "selection", thresholds={"min_side": 384, "max_aspect": 2.5})
    log(f"[5/7] select: {funnel_selected['kept']} of {funnel_selected['input']} kept (decoded min side 384, max aspect 2.5)")
    buckets = make_buckets(256)
    distribution = bucket_distribution(work / "images", buckets, work / "selection")
    chart = plot_distribution(distribution, work / "report" / "buckets.png")
    log(f"[6/7] buckets: {distribution['images']} images in "
        f"{sum(r['count'] > 0 for r in distribution['buckets'])} of {len(buckets)} buckets at 256 px ({chart})")
    manifest = encode(work / "images", work / "latents", EncodeConfig(resolution=256, vae="tiny", max_upscale=1.0),
                      selection=work / "selection")
    log(f"[7/7] encode: {manifest['samples']} latents in {len(manifest['shards'])} shard(s), dropped {manifest['dropped']}")
    result = {"prefilter": funnel, "download": summary, "image_shards": shards, "score": scored,
              "select": funnel_selected, "buckets": distribution,
              "latents": {k: manifest[k] for k in ("samples", "per_bucket", "shards", "dropped")}}
    write_json(work / "report" / "demo.json", result)
    return result
