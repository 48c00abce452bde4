"""Exact URL de-duplication by hash, over a stream, in bounded memory: 8 bytes per distinct URL (prefilter
and inspect; near-duplicate images are filters/dedup.py).

URLs are hashed to 64 bits (pandas' SipHash-based `hash_array`); the seen hashes live in a few sorted
arrays merged like a binary counter, so lookups and merges stay O(n log n) over the whole stream.
At 10 million URLs the chance that two different URLs share a hash is about 3e-6.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa


def hash_urls(urls: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hashes of the URL strings (nulls hash as the empty string)."""
    values = np.asarray(urls.fill_null("").to_numpy(zero_copy_only=False), dtype=object)
    return pd.util.hash_array(values, categorize=False)


class SeenUrls:
    """Remembers URL hashes; `first_seen` marks the URLs of a batch that were not seen before."""

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []  # sorted, sizes roughly halving

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs)

    def _contains(self, hashes: np.ndarray) -> np.ndarray:
        found = np.zeros(len(hashes), dtype=bool)
        for run in self._runs:
            pos = np.searchsorted(run, hashes)
            pos[pos == len(run)] = 0
            found |= run[pos] == hashes
        return found

    def first_seen(self, hashes: np.ndarray) -> np.ndarray:
        """True for each hash neither seen in earlier batches nor earlier in this batch; records them."""
        unique, first_index = np.unique(hashes, return_index=True)
        is_first = np.zeros(len(hashes), dtype=bool)
        is_first[first_index] = True
        is_first &= ~self._contains(hashes)
        new = unique[~self._contains(unique)]
        if len(new):
            self._runs.append(new)
            while len(self._runs) > 1 and len(self._runs[-1]) * 2 >= len(self._runs[-2]):
                last = self._runs.pop()
                self._runs[-1] = np.sort(np.concatenate([self._runs[-1], last]))
        return is_first
