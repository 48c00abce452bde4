"""Global URL de-duplication in bounded memory, for tables of any length (LAION-2B-en: 2.3 billion rows).

The first copy of each URL is kept, as an in-memory set over the stream would keep it, but nothing grows
with the row count:

1. `add(hashes, rows)`: each surviving row's (URL hash, row number) pair is buffered and spilled into one
   of 256 partition files by the hash's top byte (raw binary, appended).
2. `finish()`: each partition alone (1/256 of the pairs) is sorted by (hash, row); every pair whose hash
   equals the one before it is a later copy. Those row numbers are spilled again, into files by row range.
3. `duplicates(start, stop)`: the later copies among rows [start, stop), read back range by range in row
   order as the second pass over the candidates asks for them.

Memory: the spill buffer (SPILL_PAIRS pairs, 16 bytes each), one partition, one row range. At 2.3 billion
rows a partition holds about 9 million pairs (144 MB) and a range at most ROWS_PER_RANGE row numbers.
Disk: 16 bytes per row in pass 1, 8 bytes per later copy in pass 2, in the scratch folder given.

URLs are compared by a 64-bit hash (urlhash.hash_urls): over 2.3 billion distinct URLs about 0.15 pairs of
different URLs are expected to share one (one URL wrongly taken for a copy), as with the in-memory set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PARTITION_BITS = 8
SPILL_PAIRS = 4_000_000  # buffered pairs before a spill (64 MB)
ROWS_PER_RANGE = 1 << 24  # 16 M rows: a range file holds at most 128 MB of row numbers
PAIR = np.dtype([("hash", "<u8"), ("row", "<i8")])


class SpilledDedup:
    """Later copies of URL hashes over a stream of (hash, row) pairs, spilled under `folder`."""

    def __init__(self, folder: Path, spill_pairs: int = SPILL_PAIRS, rows_per_range: int = ROWS_PER_RANGE):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.spill_pairs, self.rows_per_range = spill_pairs, rows_per_range
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._range: tuple[int, np.ndarray] | None = None  # (range index, its sorted later copies)
        self.pairs = 0

    def _partition_file(self, part: int) -> Path:
        return self.folder / f"pairs-{part:03d}.bin"

    def _range_file(self, index: int) -> Path:
        return self.folder / f"later-{index:06d}.bin"

    def add(self, hashes: np.ndarray, rows: np.ndarray) -> None:
        """Pass 1: the URL hashes of rows (row numbers in stream order) that passed every other rule."""
        pairs = np.empty(len(hashes), PAIR)
        pairs["hash"], pairs["row"] = hashes, rows
        self._buffer.append(pairs)
        self._buffered += len(pairs)
        self.pairs += len(pairs)
        if self._buffered >= self.spill_pairs:
            self._spill()

    def _spill(self) -> None:
        if not self._buffer:
            return
        pairs = np.concatenate(self._buffer)
        self._buffer, self._buffered = [], 0
        parts = (pairs["hash"] >> np.uint64(64 - PARTITION_BITS)).astype(np.int64)
        order = np.argsort(parts, kind="stable")
        pairs, parts = pairs[order], parts[order]
        bounds = np.searchsorted(parts, np.arange((1 << PARTITION_BITS) + 1))
        for part in range(1 << PARTITION_BITS):
            chunk = pairs[bounds[part] : bounds[part + 1]]
            if len(chunk):
                with open(self._partition_file(part), "ab") as f:
                    chunk.tofile(f)

    def finish(self) -> int:
        """Pass 1 ends: each partition sorted, its later copies spilled by row range. Returns their count."""
        self._spill()
        later_total = 0
        for part in range(1 << PARTITION_BITS):
            path = self._partition_file(part)
            if not path.exists():
                continue
            pairs = np.fromfile(path, PAIR)
            path.unlink()
            pairs.sort(order=("hash", "row"))
            later = pairs["row"][1:][pairs["hash"][1:] == pairs["hash"][:-1]]
            later_total += len(later)
            if not len(later):
                continue
            later.sort()
            ranges = later // self.rows_per_range
            cuts = np.flatnonzero(np.diff(ranges)) + 1
            for chunk in np.split(later, cuts):
                with open(self._range_file(int(chunk[0] // self.rows_per_range)), "ab") as f:
                    chunk.tofile(f)
        return later_total

    def duplicates(self, start: int, stop: int) -> np.ndarray:
        """Pass 2: the sorted row numbers in [start, stop) that are later copies (rows asked in order)."""
        out = []
        for index in range(start // self.rows_per_range, (stop - 1) // self.rows_per_range + 1):
            if self._range is None or self._range[0] != index:
                path = self._range_file(index)
                rows = np.sort(np.fromfile(path, "<i8")) if path.exists() else np.empty(0, "<i8")
                self._range = (index, rows)
            rows = self._range[1]
            out.append(rows[np.searchsorted(rows, start) : np.searchsorted(rows, stop)])
        return np.concatenate(out) if out else np.empty(0, "<i8")
