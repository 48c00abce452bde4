"""Metadata-only filtering of a URL table before download, with a funnel that says what each rule dropped.

Rules run in a fixed order and a row is dropped by the first one it fails: invalid_url, private_address,
short_caption, min_side, max_aspect, min_similarity, max_pwatermark, max_punsafe, min_aesthetic,
duplicate_url (last, so the first copy of a URL that survives the other rules is the one kept).
A row whose value is missing (null) for a requested threshold fails that rule.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from latentmill.curate.addresses import private_address_mask
from latentmill.curate.funnel import format_funnel, funnel_steps
from latentmill.curate.lineage import make_record, record_path
from latentmill.curate.netguard import allow_hosts_field, parse_allow_hosts
from latentmill.curate.storage import (
    atomic_path,
    is_remote,
    location,
    remove_stale_temporaries,
    temporary_name,
    write_json,
)
from latentmill.curate.tables import UrlTable, columns_field
from latentmill.curate.urldedup import SpilledDedup
from latentmill.curate.urlhash import hash_urls
from latentmill.errors import InputError, invariant, nothing_left
from latentmill.schema import StageConfig, opt


@dataclass
class PrefilterConfig(StageConfig):
    """Thresholds (None: rule off) and switches for `prefilter`."""

    SECTION = "prefilter"
    RUNTIME = ("batch_rows",)
    min_side: int | None = opt(
        None,
        "Drop rows whose smaller side (WIDTH/HEIGHT) is below this, in px.",
        low=1,
        old_key="min_side_px",
    )
    max_aspect: float | None = opt(None, "Drop rows whose long/short side ratio exceeds this.", low=1.0)
    min_similarity: float | None = opt(None, "Drop rows whose CLIP similarity is below this.")
    max_pwatermark: float | None = opt(None, "Drop rows whose watermark probability exceeds this.")
    max_punsafe: float | None = opt(None, "Drop rows whose unsafe probability exceeds this.")
    min_aesthetic: float | None = opt(None, "Drop rows whose aesthetic score is below this.")
    min_caption_chars: int = opt(
        3, "Drop captions shorter than this after trimming (0: keep empty captions).", low=0
    )
    keep_duplicates: bool = opt(False, "Do not drop repeated URLs.")
    allow_hosts: list[str] = allow_hosts_field("Keep URLs of", "is still dropped")
    columns: dict[str, str | None] = columns_field()
    batch_rows: int = opt(262_144, "Rows read per batch.", low=1, cli=False)

    def check_more(self) -> None:
        parse_allow_hosts(self.allow_hosts)


# threshold option -> (rule name, roles it needs)
THRESHOLDS = {
    "min_side": ("width", "height"),
    "max_aspect": ("width", "height"),
    "min_similarity": ("similarity",),
    "max_pwatermark": ("pwatermark",),
    "max_punsafe": ("punsafe",),
    "min_aesthetic": ("aesthetic",),
}

Rule = Callable[[pa.RecordBatch], pa.Array]  # -> boolean "passes" mask


def _col(batch: pa.RecordBatch, name: str) -> pa.Array:
    return batch.column(batch.schema.get_field_index(name))


def build_rules(config: PrefilterConfig, table: UrlTable) -> list[tuple[str, Rule]]:
    """The ordered (name, passes) rules this config asks for; a missing column is an error now."""
    cols = table.columns
    for key, roles in THRESHOLDS.items():
        option = "--" + key.replace("_", "-")
        if getattr(config, key) is not None and any(r not in cols for r in roles):
            raise InputError(
                f"{table.path}: {option} needs the {' and '.join(roles)} column(s), which this table lacks. "
                f"Columns found: {', '.join(table.schema.names)}. Name them with "
                f"{', '.join('--' + r + '-col' for r in roles)}, or drop {option}."
            )
    url = cols["url"]
    rules: list[tuple[str, Rule]] = [
        (
            "invalid_url",
            lambda b: pc.fill_null(
                pc.match_substring_regex(_col(b, url), r"^https?://[^/?#\s]+", ignore_case=True), False
            ),
        ),
    ]
    allowed = parse_allow_hosts(config.allow_hosts)
    rules.append(("private_address", lambda b: pc.invert(private_address_mask(_col(b, url), allowed))))
    if "caption" in cols and config.min_caption_chars > 0:
        cap, n = cols["caption"], config.min_caption_chars
        rules.append(
            (
                "short_caption",
                lambda b: pc.fill_null(
                    pc.greater_equal(pc.utf8_length(pc.utf8_trim_whitespace(_col(b, cap))), n), False
                ),
            )
        )
    w, h = cols.get("width"), cols.get("height")

    def sides(b):
        """(short, long, both finite) in float64; NaN, inf and null sizes fail the size rules (arrow's
        element-wise min/max would otherwise skip a NaN and compare the other side with itself)."""
        fw, fh = (pc.cast(_col(b, c), pa.float64(), safe=False) for c in (w, h))
        finite = pc.fill_null(pc.and_(pc.is_finite(fw), pc.is_finite(fh)), False)
        return pc.min_element_wise(fw, fh), pc.max_element_wise(fw, fh), finite

    if config.min_side is not None:

        def side_ok(b):
            short_side, _, finite = sides(b)
            return pc.and_(finite, pc.fill_null(pc.greater_equal(short_side, config.min_side), False))

        rules.append(("min_side", side_ok))
    if config.max_aspect is not None:

        def aspect_ok(b):
            short_side, long_side, finite = sides(b)
            ok = pc.and_(
                pc.greater(short_side, 0),
                pc.less_equal(long_side, pc.multiply(short_side, config.max_aspect)),
            )
            return pc.and_(finite, pc.fill_null(ok, False))

        rules.append(("max_aspect", aspect_ok))
    for key, compare in (
        ("min_similarity", pc.greater_equal),
        ("max_pwatermark", pc.less_equal),
        ("max_punsafe", pc.less_equal),
        ("min_aesthetic", pc.greater_equal),
    ):
        limit = getattr(config, key)
        if limit is not None:
            column = cols[THRESHOLDS[key][0]]
            rules.append((key, lambda b, c=column, f=compare, v=limit: pc.fill_null(f(_col(b, c), v), False)))
    return rules


def prefilter(source: str | Path, output: str | Path, config: PrefilterConfig, progress=None) -> dict:
    """Filter `source` into `output` (parquet, every column kept) and return the funnel.

    Also writes `OUTPUT.dropped.parquet` (dropped rows with a `reason` column) and
    `OUTPUT.funnel.json`, all atomically. `progress(rows)` is called after each batch. Repeated URLs are
    found in bounded memory (curate/urldedup.py): the rows that pass every other rule are spilled beside
    the output, and a second pass over them drops the later copies.
    """
    output = location(output)
    table = UrlTable.open(source, config.columns)
    rules = build_rules(config, table)
    names = [name for name, _ in rules] + (["duplicate_url"] if not config.keep_duplicates else [])
    dropped = dict.fromkeys(names, 0)
    input_rows = kept_rows = 0
    dropped_schema = table.schema.append(pa.field("reason", pa.string()))
    dropped_path = output.with_name(output.stem + ".dropped.parquet")

    def drop(writer, batch, mask, reason):
        if mask.any():
            lost = batch.filter(pa.array(mask))
            reasons = pa.array(reason[mask] if isinstance(reason, np.ndarray) else [reason] * lost.num_rows)
            writer.write_batch(
                pa.RecordBatch.from_arrays([*lost.columns, reasons.cast(pa.string())], schema=dropped_schema)
            )

    with (
        atomic_path(output) as tmp_kept,
        atomic_path(dropped_path) as tmp_dropped,
        _spill_folder(output, not config.keep_duplicates) as spill,
    ):
        with (
            pq.ParquetWriter(tmp_kept, table.schema) as kept_writer,
            pq.ParquetWriter(tmp_dropped, dropped_schema) as dropped_writer,
        ):
            dedup = SpilledDedup(spill) if spill else None
            candidates = pq.ParquetWriter(spill / "candidates.parquet", table.schema) if spill else None
            passed = 0  # rows that passed every other rule: the candidates' row numbers
            for batch in table.batches(batch_rows=config.batch_rows):
                input_rows += batch.num_rows
                alive = np.ones(batch.num_rows, dtype=bool)
                reason = np.full(batch.num_rows, None, dtype=object)
                for name, passes in rules:
                    ok = pc.fill_null(passes(batch), False).to_numpy(zero_copy_only=False).astype(bool)
                    fails = alive & ~ok  # a null verdict fails: a count is never taken from garbage
                    dropped[name] += int(fails.sum())
                    reason[fails] = name
                    alive &= ~fails
                drop(dropped_writer, batch, ~alive, reason)
                survivors = batch.filter(pa.array(alive))
                if dedup is None:
                    kept_rows += survivors.num_rows
                    kept_writer.write_batch(survivors)
                elif survivors.num_rows:
                    hashes = hash_urls(_col(survivors, table.columns["url"]))
                    dedup.add(hashes, np.arange(passed, passed + survivors.num_rows))
                    candidates.write_batch(survivors)
                    passed += survivors.num_rows
                if progress:
                    progress(batch.num_rows)
            if dedup is not None:  # pass 2: the later copies out, in the order the rows came
                candidates.close()
                dropped["duplicate_url"] = dedup.finish()
                start = 0
                for batch in pq.ParquetFile(spill / "candidates.parquet").iter_batches(config.batch_rows):
                    later = np.zeros(batch.num_rows, dtype=bool)
                    later[dedup.duplicates(start, start + batch.num_rows) - start] = True
                    start += batch.num_rows
                    drop(dropped_writer, batch, later, "duplicate_url")
                    kept = batch.filter(pa.array(~later))
                    kept_rows += kept.num_rows
                    kept_writer.write_batch(kept)
    steps = funnel_steps(input_rows, {name: dropped[name] for name in names})
    funnel = {
        "source": str(source),
        "output": str(output),
        "input_rows": input_rows,
        "steps": steps,
        "kept_rows": kept_rows,
        "columns": table.columns,
    }
    invariant(
        steps[-1]["remaining"] == kept_rows,
        f"prefilter funnel ends at {steps[-1]['remaining']}, kept {kept_rows}",
    )
    write_json(output.with_name(output.stem + ".funnel.json"), funnel)
    write_json(record_path(output), make_record("prefilter", config, inputs={"table": source}))
    return check_kept(funnel)


@contextmanager
def _spill_folder(output, needed: bool):
    """Where the de-duplication spills: beside a local output (the disk the user chose for it, named as
    a temporary a later run clears if this one is killed), or the scratch folder for one in a store."""
    if not needed:
        yield None
        return
    if is_remote(output):
        from latentmill.curate.scratch import temporary_folder

        with temporary_folder(f"prefilter {output}") as folder:
            yield Path(folder)
        return
    folder = temporary_name(Path(output).with_name(Path(output).name + ".dedup"))
    remove_stale_temporaries(folder.parent, recursive=False)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_kept(funnel: dict) -> dict:
    """The funnel, or NothingLeft (exit 3, each rule's count and its fix) when it kept no row: the same
    outcome on the run that filtered and on every run that reads its funnel again."""
    if funnel["input_rows"] and not funnel["kept_rows"]:
        dropped = {
            step["rule"]: step["dropped"] for step in funnel.get("steps") or [] if isinstance(step, dict)
        }
        raise nothing_left(f"prefilter {funnel.get('source', '')}", funnel["input_rows"], dropped)
    return funnel


def format_prefilter_funnel(funnel: dict) -> str:
    return format_funnel("input rows", funnel["input_rows"], funnel["steps"], funnel["kept_rows"])
