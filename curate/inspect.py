"""`urls inspect`: what a URL table holds, computed in one streaming pass with bounded memory.

Counts (rows, nulls, duplicate URLs) are exact. Percentiles come from a seeded uniform reservoir of at
most `sample_rows` rows per column, exact when the table is smaller than that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from latentmill.curate.tables import NUMERIC_ROLES, UrlTable
from latentmill.curate.urlhash import SeenUrls, hash_urls
from latentmill.errors import InputError

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


@dataclass
class Reservoir:
    """Uniform sample of a numeric stream (Algorithm R, vectorised per batch) plus exact min/max/mean."""

    capacity: int
    rng: np.random.Generator
    values: np.ndarray = field(default_factory=lambda: np.empty(0))
    count: int = 0
    total: float = 0.0
    low: float = np.inf
    high: float = -np.inf

    def add(self, batch: np.ndarray) -> None:
        batch = batch[np.isfinite(batch)]
        if not len(batch):
            return
        self.total += float(batch.sum())
        self.low, self.high = min(self.low, float(batch.min())), max(self.high, float(batch.max()))
        room = self.capacity - len(self.values)
        if room > 0:
            self.values = np.concatenate([self.values, batch[:room]])
        rest = batch[max(room, 0) :]
        if len(rest):
            seen_before = self.count + max(room, 0)
            slots = (self.rng.random(len(rest)) * (seen_before + np.arange(1, len(rest) + 1))).astype(
                np.int64
            )
            take = slots < self.capacity
            self.values[slots[take]] = rest[take]
        self.count += len(batch)

    def summary(self) -> dict:
        if not self.count:
            return {"count": 0}
        return {
            "count": self.count,
            "mean": self.total / self.count,
            "min": self.low,
            "max": self.high,
            "percentiles": {
                f"p{p}": float(v)
                for p, v in zip(PERCENTILES, np.percentile(self.values, PERCENTILES), strict=True)
            },
            "sampled": self.count > self.capacity,
        }


def inspect_table(
    path: str | Path, columns: dict | None = None, sample_rows: int = 200_000, seed: int = 0, progress=None
) -> dict:
    """Rows, columns and types, nulls, duplicate URLs and the metadata distributions of a URL table."""
    table = UrlTable.open(path, columns)
    rng = np.random.default_rng(seed)
    roles = {role: col for role, col in table.columns.items() if role in NUMERIC_ROLES}
    reservoirs = {name: Reservoir(sample_rows, rng) for name in [*roles, "aspect_ratio"]}
    nulls = dict.fromkeys(table.schema.names, 0)
    seen = SeenUrls()
    rows = duplicates = non_http = 0
    for batch in table.batches():
        rows += batch.num_rows
        for name in table.schema.names:
            nulls[name] += batch.column(batch.schema.get_field_index(name)).null_count
        urls = batch.column(batch.schema.get_field_index(table.columns["url"]))
        duplicates += int((~seen.first_seen(hash_urls(urls))).sum())
        non_http += batch.num_rows - (
            pc.sum(pc.match_substring_regex(urls, r"^https?://", ignore_case=True)).as_py() or 0
        )
        for role, col in roles.items():
            reservoirs[role].add(column_values(batch, col))
        if "width" in roles and "height" in roles:
            w = column_values(batch, roles["width"])
            h = column_values(batch, roles["height"])
            with np.errstate(divide="ignore", invalid="ignore"):
                reservoirs["aspect_ratio"].add(np.maximum(w, h) / np.minimum(w, h))
        if progress:
            progress(batch.num_rows)
    return {
        "path": str(path),
        "files": [str(f) for f in table.files],
        "rows": rows,
        "columns": {f.name: str(f.type) for f in table.schema},
        "roles": table.columns,
        "nulls": nulls,
        "distinct_urls": len(seen),
        "duplicate_urls": duplicates,
        "non_http_urls": non_http,
        "distributions": {name: r.summary() for name, r in reservoirs.items() if r.count},
    }


def column_values(batch: pa.RecordBatch, column: str) -> np.ndarray:
    """A numeric column as float64 (nulls NaN; integers past 2**53 rounded, not refused)."""
    values = batch.column(batch.schema.get_field_index(column))
    try:
        values = values.cast(pa.float64(), safe=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise InputError(
            f"column {column!r} holds {values.type}, not numbers; name the right column (--width-col, --height-col, ...)."
        ) from None
    return values.fill_null(np.nan).to_numpy(zero_copy_only=False)


def format_report(report: dict) -> str:
    """`inspect_table`'s result as text for a terminal."""
    out = [f"{report['path']}: {report['rows']:,} rows in {len(report['files'])} file(s)", "", "columns:"]
    roles_by_col = {c: r for r, c in report["roles"].items()}
    for name, kind in report["columns"].items():
        role = f" [{roles_by_col[name]}]" if name in roles_by_col else ""
        out.append(f"  {name:<24}{kind:<14}nulls {report['nulls'][name]:>10,}{role}")
    out += [
        "",
        f"distinct URLs {report['distinct_urls']:,}, duplicate URLs {report['duplicate_urls']:,}, "
        f"non-http(s) URLs {report['non_http_urls']:,}",
    ]
    if report["distributions"]:
        out += [
            "",
            f"{'':<14}{'mean':>9}{'min':>9}"
            + "".join(f"{'p' + str(p):>9}" for p in PERCENTILES)
            + f"{'max':>9}",
        ]
        for name, d in report["distributions"].items():
            pct = "".join(f"{d['percentiles']['p' + str(p)]:>9.3g}" for p in PERCENTILES)
            out.append(f"{name:<14}{d['mean']:>9.3g}{d['min']:>9.3g}{pct}{d['max']:>9.3g}")
        if any(d.get("sampled") for d in report["distributions"].values()):
            out.append(
                "(percentiles estimated from a uniform sample of rows; counts, min, max and mean are exact)"
            )
    return "\n".join(out)
