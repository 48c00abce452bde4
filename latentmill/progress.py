"""The progress bar of long work, for the commands and the runner alike: tqdm on stderr, with a rate."""

from __future__ import annotations


def progress_bar(total: int | None, desc: str, unit: str = "rows"):
    """A tqdm bar (a context manager); `update(n)` advances it."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, leave=False)
