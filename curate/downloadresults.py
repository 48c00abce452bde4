"""What a download folder holds, read back from img2dataset's own files: the done shards, the failed rows
with their reasons (for `download --retry-failed`), and the summary the command prints."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from latentmill.curate.storage import arrow_file, parquet_schema, read_parquet
from latentmill.errors import InputError

# latentmill's bookkeeping inside an image-shard folder: not a *.json at top level, which img2dataset
# reads as shards
STATE_DIR = "_latentmill"


def done_shards(output: Path) -> list[str]:
    """Shard names whose `_stats.json` exists (img2dataset's own completion marker)."""
    return sorted(p.name[: -len("_stats.json")] for p in output.glob("*_stats.json"))


def _shard_tables(output: Path, columns: list[str]) -> list[pa.Table]:
    tables = []
    for shard in done_shards(output):
        path = output / f"{shard}.parquet"
        if path.exists():
            present = parquet_schema(path).names
            tables.append(read_parquet(path, columns=[c for c in columns if c in present]))
    return tables


def failed_rows(output: Path, extras: list[str]) -> pa.Table:
    """The latest failure of every URL in the shards that never succeeded, with its `reason`."""
    base = ["url", "caption", "status", "error_message"]
    tables = _shard_tables(output, base + extras)
    if not tables:
        return pa.table({"url": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
    rows = pa.concat_tables(tables, promote_options="default").to_pylist()
    succeeded = {r["url"] for r in rows if r["status"] == "success"}
    latest: dict[str, dict] = {}
    for row in rows:
        if row["status"] != "success" and row["url"] not in succeeded:
            latest[row["url"]] = row
    out = [
        {k: v for k, v in r.items() if k not in ("status", "error_message")}
        | {"reason": failure_reason(r["error_message"])}
        for r in latest.values()
    ]
    return (
        pa.Table.from_pylist(out)
        if out
        else pa.table({"url": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
    )


_REASONS = [
    (re.compile(r"private_address:"), lambda m: "private_address"),  # the connect-time guard (netguard)
    (re.compile(r"HTTP Error (\d{3})"), lambda m: f"http_{m.group(1)}"),
    (re.compile(r"timed? ?out", re.I), lambda m: "timeout"),
    (re.compile(r"X-Robots-Tag", re.I), lambda m: "opted_out"),
    (re.compile(r"image too small", re.I), lambda m: "too_small"),
    (re.compile(r"aspect ratio too large", re.I), lambda m: "aspect_too_large"),
    (
        re.compile(r"image area too large|CV_IO_MAX_IMAGE_PIXELS|DecompressionBomb", re.I),
        lambda m: "too_large",
    ),
    (
        re.compile(
            r"Connection refused|Name or service not known|nodename nor servname|getaddrinfo|No route", re.I
        ),
        lambda m: "unreachable",
    ),
    (re.compile(r"SSL|certificate", re.I), lambda m: "tls_error"),
    (
        re.compile(r"decod|NoneType|cannot identify|imread|image file|shape|channel|empty", re.I),
        lambda m: "undecodable",
    ),
]


REASONS = ("private_address", "timeout", "opted_out", "too_small", "aspect_too_large", "too_large")
REASONS += ("unreachable", "tls_error", "undecodable", "unknown")  # and http_NNN, and "other: ..." by text


def check_reasons(asked: set[str], present: list[str]) -> None:
    """--only-reason names: each a reason latentmill gives (or one this folder's failures have), else an
    InputError with the nearest name and the reasons in the folder with their counts."""
    import difflib
    from collections import Counter

    counts = Counter(present)
    for name in sorted(asked):
        if name in REASONS or name in counts or re.fullmatch(r"http_[1-5]\d\d", name):
            continue
        near = difflib.get_close_matches(name, [*REASONS, *counts], n=1, cutoff=0.6)
        found = ", ".join(f"{r} ({n})" for r, n in counts.most_common()) or "none"
        raise InputError(
            f"--only-reason {name}: not a failure reason.{f' Did you mean {near[0]}?' if near else ''} "
            f"Reasons: {', '.join(REASONS)}, http_NNN; failed in this folder: {found}."
        )


def failure_reason(message: str | None) -> str:
    """img2dataset's error message mapped to a short reason (the raw text is kept in the shard parquet)."""
    if not message:
        return "unknown"
    for pattern, name in _REASONS:
        match = pattern.search(message)
        if match:
            return name(match)
    return "other: " + message.strip().splitlines()[0][:60]


def summarize(output: Path) -> dict:
    """Successes, failures grouped by reason and totals over every finished shard of `output`."""
    tables = _shard_tables(output, ["url", "status", "error_message"])
    success, failures = 0, {}
    if tables:
        rows = pa.concat_tables(tables).to_pylist()
        succeeded = {r["url"] for r in rows if r["status"] == "success"}
        success = len(succeeded)
        latest = {r["url"]: r for r in rows if r["status"] != "success" and r["url"] not in succeeded}
        for row in latest.values():
            reason = failure_reason(row["error_message"])
            failures[reason] = failures.get(reason, 0) + 1
    state = output / STATE_DIR
    if (state / "dropped.parquet").exists():
        for reason in (
            pq.read_table(arrow_file(state / "dropped.parquet"), columns=["reason"])
            .column("reason")
            .to_pylist()
        ):
            failures[reason] = failures.get(reason, 0) + 1
    return {
        "success": success,
        "failed": sum(failures.values()),
        "failures": dict(sorted(failures.items(), key=lambda kv: -kv[1])),
    }


def format_summary(summary: dict) -> str:
    lines = [
        f"images {summary['success']:,} downloaded, {summary['failed']:,} failed, in {summary['shards']} shard(s)"
    ]
    for reason, count in summary["failures"].items():
        lines.append(f"  {reason:<22}{count:>8,}")
    if summary["new_shards"]:
        lines.append(
            f"this run: {summary['new_images']:,} images in {summary['new_shards']} new shard(s), "
            f"{summary['seconds']:.1f} s, {summary['images_per_s']:.1f} images/s"
        )
    elif "nothing_to_retry" in summary:
        which = ", ".join(summary["nothing_to_retry"])
        lines.append(f"this run: nothing to retry (no URL failed{' with ' + which if which else ''})")
    else:
        lines.append("this run: nothing to download, every shard was already done")
    return "\n".join(lines)
