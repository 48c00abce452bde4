"""`download`: img2dataset into WebDataset image shards, with defaults for diffusion training.

The URL table is first normalised into `OUT/_latentmill/input.parquet` (columns `url`, `caption` and every
other column, carried into each sample's JSON), with private addresses removed and recorded. img2dataset
then runs in its incremental mode: a shard counts as done when its `_stats.json` exists, so a killed
download re-run redoes only unfinished shards (their partial tars are overwritten) and a finished one
downloads nothing. `retry_failed` collects the rows that failed and downloads them into new shards.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from latentmill.curate.addresses import private_address_mask
from latentmill.curate.downloadresults import STATE_DIR, check_reasons, done_shards, failed_rows, summarize
from latentmill.curate.lineage import make_record, record_path
from latentmill.curate.netguard import allow_hosts_field, parse_allow_hosts
from latentmill.curate.quietchild import quiet
from latentmill.curate.records import read_record
from latentmill.curate.storage import (
    arrow_file,
    atomic_path,
    is_remote,
    location,
    make_folder,
    remove,
    storage_environment,
    write_json,
)
from latentmill.curate.storageoptions import bounded_fsspec_environment
from latentmill.curate.tables import UrlTable, columns_field
from latentmill.errors import InputError, NothingLeft, nothing_left
from latentmill.schema import StageConfig, opt

DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")
# names img2dataset writes itself: a table column with one of these is carried as `source_{name}`
RESERVED = {
    "key",
    "url",
    "caption",
    "status",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
    "exif",
    "sha256",
    "md5",
}


@dataclass
class DownloadConfig(StageConfig):
    """How to download. The defaults suit diffusion training, not img2dataset's own (256 px, border, files)."""

    SECTION = "download"
    RUNTIME = (
        "processes",
        "http_threads",
        "distributor",
        "ray_address",
        "ray_timeout",
        "retries",
        "timeout",
        "resolver",
    )
    image_size: int = opt(
        1024,
        "Cap on the smaller side in px (ratio kept, never upscaled); set above your largest bucket side.",
        low=1,
        old_key="image_size_px",
    )
    min_image_size: int = opt(
        256, "Drop images whose smaller side is below this (px).", low=0, old_key="min_image_size_px"
    )
    max_aspect: float = opt(
        4.0,
        "Drop images more elongated than this (long/short side).",
        low=1.0,
        old=("--max-aspect-ratio",),
        old_key="max_aspect_ratio",
    )
    processes: int = opt(
        max(1, min(16, os.cpu_count() or 1)), "Download processes (default: CPU count, at most 16).", low=1
    )
    http_threads: int = opt(64, "Download threads per process.", low=1, old=("--threads",), old_key="threads")
    distributor: str = opt("multiprocessing", "img2dataset's distributor.", choices=DISTRIBUTORS)
    ray_address: str | None = opt(
        None,
        "With --distributor ray: the cluster to join ('auto', or ray://HOST:10001); default: a local Ray.",
    )
    ray_timeout: float = opt(
        30.0,
        "Ray: seconds to wait for the cluster to answer before giving up with exit 2.",
        low=1.0,
        since="0.3",
    )
    retries: int = opt(2, "Retries per URL.", low=0)
    timeout: int = opt(10, "Per-request timeout in seconds.", low=1, old_key="timeout_s")
    user_agent_token: str | None = opt(
        "latentmill", "Token added to the User-Agent, so site owners can identify and opt out."
    )
    shard_size: int = opt(10_000, "Samples per shard.", low=1)
    encode_quality: int = opt(95, "JPEG quality of the stored images.", low=1, high=100)
    ignore_opt_out: bool = opt(False, "Do not honour X-Robots-Tag noai/noimageai/noindex headers.")
    allow_hosts: list[str] = allow_hosts_field("Allow", "stays refused")
    resolver: str | None = opt(
        None, "module:function with getaddrinfo's signature, for the guard (tests).", cli=False
    )
    columns: dict[str, str | None] = columns_field()

    def check_more(self) -> None:
        parse_allow_hosts(self.allow_hosts)
        if self.distributor == "ray" and self.ray_address:  # before any download: a wrong address ends here
            from latentmill.curate.raycluster import checked_address

            checked_address(self.ray_address, "--ray-address", self.ray_timeout)
        if self.distributor != "multiprocessing":
            import importlib.util

            if importlib.util.find_spec(self.distributor) is None:
                raise InputError(
                    f"--distributor {self.distributor} needs the {self.distributor} package: "
                    f"pip install {self.distributor}{'[default]' if self.distributor == 'ray' else ''}."
                )


def prepare_input(source: str | Path, state: Path, config: DownloadConfig) -> tuple[Path, list[str], dict]:
    """Write the normalised input table; return its path, the extra columns and the drop counts."""
    table = UrlTable.open(source, config.columns)
    url_col, caption_col = table.columns["url"], table.columns.get("caption")
    extras = [c for c in table.schema.names if c not in (url_col, caption_col)]
    renamed = {c: (f"source_{c}" if c in RESERVED else c) for c in extras}
    names = ["url"] + (["caption"] if caption_col else []) + [renamed[c] for c in extras]
    columns = [url_col] + ([caption_col] if caption_col else []) + extras
    dropped = {"private_address": 0, "invalid_url": 0}
    path = state / "input.parquet"
    dropped_rows = []
    allowed = parse_allow_hosts(config.allow_hosts)
    with atomic_path(path) as tmp:
        writer = None
        for batch in table.batches(columns=columns):
            batch = pa.RecordBatch.from_arrays(batch.columns, names=names)
            urls = batch.column(0)
            valid = pc.fill_null(pc.match_substring_regex(urls, r"^https?://", ignore_case=True), False)
            private = pc.and_(valid, private_address_mask(urls, allowed))
            keep = pc.and_(valid, pc.invert(private))
            dropped["private_address"] += pc.sum(private).as_py() or 0
            dropped_rows += [(u, "private_address") for u in urls.filter(private).to_pylist()]
            dropped["invalid_url"] += pc.sum(pc.invert(valid)).as_py() or 0
            dropped_rows += [(u, "invalid_url") for u in urls.filter(pc.invert(valid)).to_pylist()]
            writer = writer or pq.ParquetWriter(tmp, batch.schema)
            writer.write_batch(batch.filter(keep))
        if writer is None:
            raise InputError(f"{source}: the table has no rows to download.")
        writer.close()
    with atomic_path(state / "dropped.parquet") as tmp:
        pq.write_table(
            pa.table(
                {
                    "url": pa.array([u for u, _ in dropped_rows], pa.string()),
                    "reason": pa.array([r for _, r in dropped_rows], pa.string()),
                }
            ),
            tmp,
        )
    return path, names[1 + bool(caption_col) :], dropped


def run_img2dataset(
    input_path: Path,
    output: Path,
    extras: list[str],
    has_caption: bool,
    config: DownloadConfig,
    incremental_mode: str = "incremental",
) -> None:
    """Call img2dataset with the diffusion defaults on a normalised input parquet."""
    import os

    # img2dataset imports albumentations, which otherwise checks PyPI for updates in every worker (offline: a
    # warning per process); the workers inherit this
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import importlib

    from img2dataset import download as img2dataset_download

    from latentmill.curate.guarded_downloader import guarded_downloader

    # every connection the workers open is checked after name resolution and on every redirect hop
    # (the module by its full name: the package's `main` attribute is img2dataset's main *function*)
    importlib.import_module("img2dataset.main").Downloader = guarded_downloader(
        config.allow_hosts, config.resolver
    )

    # img2dataset opens the output folder with fsspec itself: the storage options reach it as the standard
    # variables, and the S3 bounds as fsspec's own configuration (its processes inherit both)
    os.environ.update(storage_environment() | bounded_fsspec_environment())
    if config.distributor == "ray":
        from latentmill.curate.raycluster import connect

        # the address checked (form, a GCS answering) within --ray-timeout; without one, Ray on loopback
        connect(config.ray_address, "--ray-address", config.ray_timeout, num_cpus=config.processes)
    before = len(done_shards(output))
    rows = pq.read_metadata(arrow_file(input_path)).num_rows
    log = _log_path(output)
    with quiet(
        log, -(-rows // config.shard_size), "download", "shard", lambda: len(done_shards(output)) - before
    ):
        try:
            _call_img2dataset(
                img2dataset_download, input_path, output, extras, has_caption, config, incremental_mode
            )
        except Exception as err:
            err.add_note(f"img2dataset's own output: {log}")
            raise


def _log_path(output) -> Path:
    """Where img2dataset's own output goes: beside latentmill's state in a local output, in the scratch
    folder for one in an object store."""
    if not is_remote(output):
        return Path(output) / STATE_DIR / "img2dataset.log"
    import hashlib

    from latentmill.curate.scratch import root

    return root() / f"img2dataset-{hashlib.sha256(str(output).encode()).hexdigest()[:16]}.log"


def _call_img2dataset(
    img2dataset_download, input_path, output, extras, has_caption, config, incremental_mode
):
    img2dataset_download(
        url_list=str(input_path),
        input_format="parquet",
        url_col="url",
        caption_col="caption" if has_caption else None,
        save_additional_columns=extras or None,
        output_folder=str(output),
        output_format="webdataset",
        image_size=config.image_size,
        resize_mode="keep_ratio",
        resize_only_if_bigger=True,
        skip_reencode=True,
        encode_quality=config.encode_quality,
        min_image_size=config.min_image_size,
        max_aspect_ratio=config.max_aspect,
        processes_count=config.processes,
        thread_count=config.http_threads,
        distributor=config.distributor,
        retries=config.retries,
        timeout=config.timeout,
        user_agent_token=config.user_agent_token,
        disallowed_header_directives=None if not config.ignore_opt_out else [],
        number_sample_per_shard=config.shard_size,
        incremental_mode=incremental_mode,
        enable_wandb=False,
    )


def download(source: str | Path, output: str | Path, config: DownloadConfig, overwrite: bool = False) -> dict:
    """Download the URL table `source` into image shards under `output`; return the summary. An `output`
    downloaded from another table or with other settings is refused, or with `overwrite` emptied first."""
    from latentmill.curate.lineage import LINEAGE, claim, remove_files

    config.validate()
    output = location(output)
    state = output / STATE_DIR
    created = not output.exists()
    if not created:

        def clear():
            remove_files(output, ("*.tar", "*.parquet", "*_stats.json"))
            for path in state.glob("*"):
                if path.is_file() and path.name != LINEAGE:
                    remove(path)

        make_folder(state)
        claim(output, make_record("download", config, inputs={"table": source}), overwrite, clear)
    make_folder(state)
    try:
        input_path, extras, dropped = prepare_input(source, state, config)
        rows = pq.read_metadata(arrow_file(input_path)).num_rows
        if not rows:
            raise nothing_left(f"download {source}", sum(dropped.values()), dropped)
    except (InputError, NothingLeft):
        if created:  # a table refused before any download leaves nothing behind
            remove(output)
        raise
    write_json(state / "download.json", {"source": str(source), "extras": extras, "config": asdict(config)})
    if created:
        write_json(record_path(output), make_record("download", config, inputs={"table": source}))
    before = done_shards(output)
    started = time.perf_counter()
    run_img2dataset(
        input_path,
        output,
        extras,
        has_caption="caption" in pq.read_schema(arrow_file(input_path)).names,
        config=config,
    )
    summary = _finish(output, state, before, time.perf_counter() - started)
    if not summary["success"]:
        raise nothing_left(f"download {source}", summary["failed"], summary["failures"])
    return summary


def retry_failed(output: str | Path, config: DownloadConfig, reasons: set[str] | None = None) -> dict:
    """Download again the rows of `output`'s shards that failed (optionally only these reasons) into new shards."""
    output = location(output)
    state = output / STATE_DIR
    if not (state / "download.json").exists():
        raise InputError(
            f"{output}: not a latentmill download folder (no {STATE_DIR}/download.json). "
            f"Run `latentmill download TABLE -o {output}` first."
        )
    config.validate()
    fix = f"download again into a new folder (or with --overwrite: {output} is cleared)"
    saved = read_record(state / "download.json", fix=fix, fields={"extras": list})
    extras = saved["extras"]
    failed = failed_rows(output, extras)
    if reasons:
        check_reasons(reasons, failed.column("reason").to_pylist())
        failed = failed.filter(pc.is_in(failed.column("reason"), value_set=pa.array(sorted(reasons))))
    before = done_shards(output)
    if failed.num_rows == 0:
        return _finish(output, state, before, 0.0) | {"nothing_to_retry": sorted(reasons or [])}
    attempt = len(list(state.glob("retry-*.parquet"))) + 1
    input_path = state / f"retry-{attempt}.parquet"
    with atomic_path(input_path) as tmp:
        pq.write_table(failed.drop(["reason"]), tmp)
    started = time.perf_counter()
    run_img2dataset(
        input_path, output, extras, "caption" in failed.schema.names, config, incremental_mode="extend"
    )
    return _finish(output, state, before, time.perf_counter() - started)


def _finish(output: Path, state: Path, shards_before: list[str], seconds: float) -> dict:
    shards_after = done_shards(output)
    new = sorted(set(shards_after) - set(shards_before))
    fix = "delete it (and its shard) and run `latentmill download --retry-failed` again"
    new_images = sum(
        read_record(output / f"{s}_stats.json", fix=fix, fields={"successes": int})["successes"] for s in new
    )
    summary = summarize(output) | {
        "shards": len(shards_after),
        "new_shards": len(new),
        "new_images": new_images,
        "seconds": round(seconds, 3),
        "images_per_s": round(new_images / seconds, 2) if seconds > 0 else 0.0,
    }
    write_json(state / "summary.json", summary)
    return summary
